"""LoRA, P-tuning v2 and freezing (peft.py) against the plain model, and training with a frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward
from test_generate import assert_cached_decoding_is_full_recomputation

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.config import get_config
from glm_jax.generate import cached_forward, init_cache, serving_params, write_prefix
from glm_jax.losses import token_loss
from glm_jax.model import GLM, init_params
from glm_jax.optim import FINETUNE_LOSS_SCALE, OptimConfig
from glm_jax.peft import PeftConfig, combine, merge_lora, split, unmerge_lora
from glm_jax.quant import quantize_params
from glm_jax.tokenizer import GMASK, MASK
from glm_jax.train import Trainer

ALL_TARGETS = "query,key,value,dense,dense_h_to_4h,dense_4h_to_h"


def base_config(**kw):
    return get_config("glm-tiny", **{"dtype": "float32", "num_layers": 2, "vocab_size": 256, **kw})


@pytest.fixture(scope="module")
def base():
    c = base_config()
    return c, init_params(c, jax.random.key(0))


def batch_of(seq=12, rows=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 200, (rows, seq))
    prefix = (np.arange(seq)[None] < 5).repeat(rows, 0)
    b = dict(
        tokens=tokens,
        targets=rng.integers(5, 200, (rows, seq)),
        loss_mask=1 - prefix,
        position_ids=np.broadcast_to(np.arange(seq), (rows, seq)),
        block_position_ids=np.zeros((rows, seq)),
        segment_ids=np.ones((rows, seq)),
        prefix_mask=prefix,
    )
    return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}


def with_adapter(peft, c, params, key=1):
    """The base plus fresh adapter leaves."""
    config = peft.model_config(c)
    adapter = split(init_params(config, jax.random.key(key)), peft, config)[0]
    return config, adapter, combine(adapter, split(params, peft, config)[1], peft)


def logits(config, params, batch):
    return np.asarray(forward(config, params, batch))


def test_lora_zero_b_is_the_base_exactly_and_merged_equals_unmerged(base):
    c, params = base
    peft = PeftConfig("lora", lora_targets=ALL_TARGETS)
    config, adapter, full = with_adapter(peft, c, params)
    b = batch_of()
    np.testing.assert_array_equal(logits(config, full, b), logits(c, params, b))
    adapter = jax.tree_util.tree_map_with_path(  # B away from zero
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape) if "lora_b" in str(p) else x, adapter
    )
    full = combine(adapter, params, peft)
    unmerged = logits(config, full, b)
    assert np.abs(unmerged - logits(c, params, b)).max() > 1e-3  # the adapter does something
    merged, plain = merge_lora(full, config)
    assert plain.lora_rank == 0 and "lora_a" not in merged["layers"]["attention"]["query"]
    np.testing.assert_allclose(logits(plain, merged, b), unmerged, atol=2e-5, rtol=1e-5)
    restored = unmerge_lora(merged, adapter, config)
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_split_and_combine_are_inverse_for_every_method(base):
    c, params = base
    adapters = PeftConfig("lora"), PeftConfig("ptuning", pre_seq_len=3)
    with_both = adapters[1].model_config(adapters[0].model_config(c))
    p = init_params(with_both, jax.random.key(2))
    for peft in adapters + (PeftConfig("freeze", trainable_layers=1, train_head=True), PeftConfig("full")):
        config = peft.model_config(c)
        trainable, frozen = split(p, peft, config)
        back = combine(trainable, frozen, peft)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
        assert all(bool((x == y).all()) for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)))
    trainable, _ = split(params, PeftConfig("freeze", trainable_layers=1), c)
    assert trainable["layers"]["attention"]["query"]["kernel"].shape[0] == 1 and set(trainable) == {"layers"}


def test_prefix_equals_the_same_keys_values_as_an_explicit_cache(base):
    c, params = base
    config, _, full = with_adapter(PeftConfig("ptuning", pre_seq_len=4), c, params)
    b = batch_of(seq=8, rows=1)
    b["prefix_mask"] = jnp.ones_like(b["prefix_mask"])  # all bidirectional: the cached prefill's mask
    want = logits(config, full, b)
    served = serving_params(full, config.num_layers)
    cache = write_prefix(config, served, init_cache(config, 1, 16, jnp.float32))
    mask = (jnp.arange(16) < 4 + 8)[None, None, None, :] & jnp.ones((1, 1, 8, 1), bool)
    got, _ = cached_forward(config, served, b["tokens"], b["position_ids"], b["block_position_ids"], mask, cache, 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # and the prefix is seen: without it the logits differ
    assert np.abs(want - logits(c, params, b)).max() > 1e-3


def test_cached_generation_with_a_prefix_equals_full_recomputation(base):
    c, params = base
    config, _, full = with_adapter(PeftConfig("ptuning", pre_seq_len=5), c, params)
    assert_cached_decoding_is_full_recomputation(config, full, [[11, 12, 13, 14, GMASK], [31, 32, MASK, 33]], 3)


def test_pipelined_prefix_equals_the_plain_model():
    c = base_config(num_layers=3)
    params = init_params(c, jax.random.key(4))
    config, _, full = with_adapter(PeftConfig("ptuning", pre_seq_len=3, prefix_projection=True), c, params)
    b = batch_of(rows=4)
    plan = pipeline.PipelinePlan(3, 2)
    mesh = sh.make_mesh("1x2x1", jax.devices()[:2])
    with jax.set_mesh(mesh):
        got = jax.jit(lambda p, x: pipeline.forward(pipeline.params_to_slots(p, plan), x, config, plan, 2))(full, b)
    np.testing.assert_allclose(np.asarray(got), logits(config, full, b), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method", ["lora", *(pytest.param(m, marks=pytest.mark.slow) for m in ("ptuning", "adapter", "ia3"))]
)
def test_adapter_gradients_through_1f1b_equal_the_plain_model(method):
    """The adapter's gradients on 2 pipeline stages (1F1B: trainable leaves beside frozen ones,
    a P-tuning prefix recomputed per tick) equal jax.grad of the plain model's mean loss."""
    c = base_config(num_layers=2)
    peft = PeftConfig(method, pre_seq_len=3, prefix_projection=True, lora_dropout=0.0, prefix_dropout=0.0)
    config, adapter, full = with_adapter(peft, c, init_params(c, jax.random.key(4)))
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), adapter)
    b = batch_of(rows=4)
    frozen = split(full, peft, config)[1]
    trainer = Trainer(config, OptimConfig(), sh.make_mesh("1x2x1", jax.devices()[:2]), 4, peft=peft)
    assert trainer.schedule == "1f1b"
    trainer.set_frozen(frozen)
    with trainer.context():
        slots = jax.jit(
            lambda a: pipeline.params_to_slots(a, trainer.plan), out_shardings=trainer.state_shardings.params
        )(adapter)
        grads, loss_sum, n = trainer.grad_pass(
            slots, trainer.place_batch(b), jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0)
        )
        grads = jax.device_get(trainer.plain_params(grads))

    def mean_loss(a):
        return token_loss(GLM(config).apply({"params": combine(a, frozen, peft)}, b), b)[0]

    loss, want = jax.jit(jax.value_and_grad(mean_loss))(adapter)
    np.testing.assert_allclose(float(loss_sum / n), float(loss), rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g / float(n), r, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def _train(config, peft, base_params, steps=4, lr=1e-2):
    mesh = sh.make_mesh("1x1", jax.devices()[:1])
    trainer = Trainer(config, OptimConfig(peak_lr=lr, init_lr=lr, warmup_fraction=0.0), mesh, 2, peft=peft)
    trainable, frozen = split(base_params, peft, config)
    trainer.set_frozen(frozen)
    state = trainer.init_state(0, None if peft.is_adapter else trainable)
    b = batch_of()
    losses = []
    with trainer.context():
        for _ in range(steps):
            state, m = trainer.fused_step(state, b, jnp.float32(lr), jnp.float32(1.0))
            losses.append(float(m["loss"]))
    return trainer, state, losses


@pytest.mark.parametrize(
    "method", ["lora", "ptuning", "freeze", *(pytest.param(m, marks=pytest.mark.slow) for m in ("adapter", "ia3"))]
)
def test_training_leaves_the_frozen_base_bitwise_unchanged(base, method):
    c, params = base
    peft = PeftConfig(method, pre_seq_len=4, trainable_layers=1)
    config = peft.model_config(c)
    frozen_before = jax.device_get(split(params, peft, config)[1])
    trainer, state, losses = _train(config, peft, params)
    assert losses[-1] < losses[0]
    after = jax.device_get(trainer.frozen)
    assert all(
        bool((x == y).all()) for x, y in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(frozen_before))
    )
    # optimizer state exists for the trainable leaves only
    mu = state.opt_state.inner_state[1].mu
    assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state.params)
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(mu)[0]}
    expected = {"lora": {"lora_a", "lora_b"}, "ptuning": {"embedding"}}.get(method)
    assert expected is None or names == expected
    if method == "freeze":
        assert jax.tree_util.tree_leaves(mu)[0].shape[0] == 1  # one trainable layer's moments


def test_lora_trains_on_an_int4_base(base):
    c, params = base
    q = c.override(quantization="int4")
    qparams = quantize_params(params, q)
    _, _, losses = _train(PeftConfig("lora").model_config(q), PeftConfig("lora"), qparams, steps=5, lr=2e-2)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("method", ["lora", pytest.param("ptuning", marks=pytest.mark.slow)])
def test_an_fp16_base_trains_fp32_adapters_without_skipping_and_with_their_dropout(method):
    """A released fp16 base (weights and compute): the adapter and its Adam moments are fp32, no
    step is skipped, the loss falls; the adapter's dropout is on (released bases set their own to
    0), so two dropout keys give two gradients."""
    c = base_config(dtype="float16", param_dtype="float16")
    peft = PeftConfig(method, pre_seq_len=4)
    config = peft.model_config(c)
    trainer = Trainer(
        config,
        OptimConfig(peak_lr=5e-3, init_lr=5e-3, min_lr_ratio=1.0, **FINETUNE_LOSS_SCALE),  # as finetune.py
        sh.make_mesh("1x1", jax.devices()[:1]),
        2,
        peft=peft,
    )
    assert trainer.uses_dropout and c.hidden_dropout == c.attention_dropout == 0
    trainer.set_frozen(split(init_params(c, jax.random.key(0)), peft, config)[1])
    batch, lr, alpha = batch_of(), jnp.float32(5e-3), jnp.float32(1.0)
    with trainer.context():
        state = trainer.init_state(0)
        held = jax.tree_util.tree_leaves(state.params) + jax.tree_util.tree_leaves(state.opt_state)
        assert {x.dtype for x in held if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
        grads = [trainer.grad_pass(state.params, batch, jax.random.key(k), alpha, 1.0)[0] for k in (1, 2)]
        differ = [not np.allclose(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, grads))]
        assert any(differ)  # (a fresh LoRA's B is 0: its dropout shows in the gradients, not the loss)
        losses = []
        for _ in range(4):
            state, metrics = trainer.fused_step(state, batch, lr, alpha)
            losses.append(float(metrics["loss"]))
        assert int(state.skipped) == 0 and losses[-1] < losses[0], losses
