"""Prompt tuning and P-tuning v1 (prompts.py): the prefix pass equals the plain model on the
virtual tokens prepended, the encoders equal peft's, cached decoding, training, adapters on disk."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward
from test_finetune import probe_logits, run, setup  # noqa: F401 (setup: the tiny base fixture)
from test_generate import assert_cached_decoding_is_full_recomputation
from test_peft import _train, base_config, batch_of

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.adapters import attach, load_adapter, save_adapter
from glm_jax.config import ConfigError
from glm_jax.layers import glm_attention_mask, rotary_tables
from glm_jax.loading import load_model
from glm_jax.model import GLM, init_params
from glm_jax.optim import OptimConfig
from glm_jax.peft import PeftConfig, base_identity, check_base, split
from glm_jax.prompts import prompt_module
from glm_jax.tokenizer import GMASK, MASK
from glm_jax.train import Trainer

CONFIGS = {
    "chatglm-6b-like": dict(position_encoding_2d=True),  # DeepNorm, 2D rotary, a bidirectional part A
    "chatglm2-like": dict(
        norm_kind="rmsnorm",
        norm_placement="pre",
        ffn_kind="swiglu",
        num_kv_heads=2,
        rotary_fraction=0.5,
        rotary_interleaved=True,
    ),
}


@functools.partial(jax.jit, static_argnums=0)
def prepended_logits(config, params, batch):
    """The reference: the plain layers on [virtual tokens ; real tokens] [B, P+S, E], the virtual
    ones at positions 0..P-1 (block 0) and causal among themselves, the real ones shifted to P..
    and seeing every virtual token and each other by GLM's mask -> the real tokens' logits."""
    model = GLM(config)
    x = model.apply({"params": params}, method=lambda m: m.prompt_encoder())  # [P, E]
    real = model.apply({"params": params}, batch, method=GLM.embed)  # [B, S, E]
    (b, s), p = batch["tokens"].shape, x.shape[0]
    h = jnp.concatenate([jnp.broadcast_to(x, (b,) + x.shape), real], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), batch["position_ids"] + p], axis=1)
    blocks = jnp.concatenate([jnp.zeros((b, p), jnp.int32), batch["block_position_ids"]], axis=1)
    mask = jnp.zeros((b, p + s, p + s), bool)
    mask = mask.at[:, :p, :p].set(jnp.tril(jnp.ones((p, p), bool))).at[:, p:, :p].set(True)
    mask = mask.at[:, p:, p:].set(glm_attention_mask(batch["segment_ids"], batch["prefix_mask"])[:, 0])
    tables = rotary_tables(positions, blocks, config)

    def layers_and_head(m, h, mask, tables):
        return m.head(m.layers(h, mask, tables, None, None, None)[0])

    return model.apply({"params": params}, h, mask[:, None], tables, method=layers_and_head)[:, p:]


def prompted(peft, base_params=None, key=1, **config):
    """A tiny base (its config overridden by `config`; its params `base_params` or fresh) with a
    fresh `peft` prompt: (model config, params). Only the prompt module is initialised."""
    c = base_config(**config)
    model_config = peft.model_config(c)
    params = init_params(c, jax.random.key(0)) if base_params is None else base_params
    prompt = nn.meta.unbox(prompt_module(model_config).init(jax.random.key(key))["params"])
    return model_config, {**params, "prompt_encoder": prompt}


@pytest.fixture(scope="module")
def base():
    c = base_config()
    return c, init_params(c, jax.random.key(0))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_prefix_pass_equals_the_plain_model_on_prepended_virtual_tokens(family):
    config, params = prompted(PeftConfig("prompt", num_virtual_tokens=3), **CONFIGS[family])
    b = batch_of(seq=10)
    b["block_position_ids"] = jnp.where(b["prefix_mask"] == 0, jnp.arange(10) - 4, 0)  # part B's block positions
    want = np.asarray(prepended_logits(config, params, b))
    got = np.asarray(forward(config, params, b))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["mlp", pytest.param("lstm", marks=pytest.mark.slow)])
def test_the_prompt_encoder_equals_peft(encoder):
    """Our encoder with peft's PromptEncoder's weights (torch layout) gives its virtual tokens."""
    torch = pytest.importorskip("torch")
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning import PromptEncoder

    c = PeftConfig("ptuning-v1", num_virtual_tokens=4, prompt_encoder=encoder).model_config(base_config())
    module = prompt_module(c)
    enc = nn.meta.unbox(module.init(jax.random.key(1))["params"])
    theirs = PromptEncoder(
        PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            token_dim=c.hidden_size,
            num_transformer_submodules=1,
            num_attention_heads=c.num_attention_heads,
            num_layers=c.num_layers,
            encoder_reparameterization_type=encoder.upper(),
            encoder_hidden_size=c.hidden_size,
        )
    )
    state = {"embedding.weight": enc["embedding"]}
    for i in (0, 2) if encoder == "lstm" else (0, 2, 4):
        state[f"mlp_head.{i}.weight"] = np.asarray(enc[f"mlp_head_{i}"]["kernel"]).T
        state[f"mlp_head.{i}.bias"] = enc[f"mlp_head_{i}"]["bias"]
    state.update({f"lstm_head.{name}": value for name, value in enc.get("lstm_head", {}).items()})
    theirs.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    want = theirs(torch.arange(4)).detach().numpy()
    np.testing.assert_allclose(np.asarray(module.apply({"params": enc})), want, atol=1e-5, rtol=1e-5)


def test_cached_generation_with_virtual_tokens_equals_full_recomputation():
    """Generation's prefix (`prompts.layered_prefix` on per-layer weights, in cache slots 0..P-1)."""
    peft = PeftConfig("ptuning-v1", num_virtual_tokens=4, prompt_encoder="lstm")
    config, params = prompted(peft, position_encoding_2d=True)
    assert_cached_decoding_is_full_recomputation(config, params, [[11, 12, 13, 14, GMASK], [31, 32, MASK, 33]], 3)


@pytest.mark.slow
def test_training_moves_the_prompt_only(base):
    """(prompt tuning trains end to end in test_finetune_prompt_end_to_end)"""
    c, params = base
    peft = PeftConfig("ptuning-v1", num_virtual_tokens=4)
    config = peft.model_config(c)
    frozen_before = jax.device_get(split(params, peft, config)[1])
    trainer, state, losses = _train(config, peft, params)
    assert losses[-1] < losses[0], losses
    after = jax.device_get(trainer.frozen)
    for x, y in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(frozen_before)):
        np.testing.assert_array_equal(x, y)
    mu = state.opt_state.inner_state[1].mu
    assert set(mu) == {"prompt_encoder"}
    assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state.params)


@pytest.mark.slow
def test_an_adapter_saved_and_loaded_gives_the_same_logits(base, tmp_path):
    """What `--adapter` does (loading.load_model): read the folder, check its base, attach."""
    c, params = base
    peft = PeftConfig("prompt", num_virtual_tokens=3)
    config, full = prompted(peft, params)
    trainable = split(full, peft, config)[0]
    save_adapter(str(tmp_path), config, peft, trainable, 2, base_identity(c, params, 5), "glm", None)
    adapter = load_adapter(str(tmp_path))
    check_base(adapter.base, c, params, 5, adapter.path)
    loaded_config, loaded = attach(adapter, c, params)
    assert loaded_config == config and loaded_config.num_virtual_tokens == 3
    b = batch_of()
    np.testing.assert_array_equal(np.asarray(forward(loaded_config, loaded, b)), forward(config, full, b))


def test_a_pipelined_mesh_is_a_clear_error(base):
    config, params = prompted(PeftConfig("prompt", num_virtual_tokens=2), base[1])
    plan = pipeline.PipelinePlan(2, 2)
    mesh = sh.make_mesh("1x2x1", jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ConfigError, match="mesh without pipeline stages"):
        jax.jit(lambda p, x: pipeline.forward(pipeline.params_to_slots(p, plan), x, config, plan, 2))(
            params, batch_of(rows=4)
        )
    with pytest.raises(ConfigError, match="mesh without pipeline stages"):  # the trainer says so as it is built
        Trainer(config, OptimConfig(), mesh, 4, peft=PeftConfig("prompt", num_virtual_tokens=2))


def test_method_knobs_are_checked():
    v1 = PeftConfig("ptuning-v1")
    assert (v1.num_virtual_tokens, v1.prompt_encoder) == (20, "mlp")  # peft's examples, PromptEncoder's default
    assert PeftConfig("prompt").prompt_encoder == "none"
    with pytest.raises(ConfigError, match="ptuning-v1"):
        PeftConfig("prompt", prompt_encoder="lstm")
    with pytest.raises(ConfigError, match="prompt_encoder='gru'"):
        PeftConfig("ptuning-v1", prompt_encoder="gru")
    with pytest.raises(ConfigError, match="set one of them to 0"):
        base_config(num_virtual_tokens=4, pre_seq_len=4)


@pytest.mark.slow
def test_finetune_prompt_end_to_end(setup):  # noqa: F811
    root, bases, _ = setup
    summary = run(setup, "prompt", "prompt", 2, "--merge")
    assert summary["trainable_params"] == 20 * 128 and summary["lr"] == 3e-2
    with_adapter_ = load_model(bases[0], adapter=str(root / "prompt"))
    merged = load_model(str(root / "prompt" / "merged"))
    assert merged.config.num_virtual_tokens == 20 and "prompt_encoder" in merged.params
    np.testing.assert_allclose(probe_logits(merged), probe_logits(with_adapter_), atol=1e-5)
