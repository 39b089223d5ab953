"""BLOOM and OPT as families: a tiny random BloomForCausalLM / OPTForCausalLM saved with a tokenizer,
converted by `released.convert_folder`, against transformers (logits, greedy generate, export back)
and against itself (cached decoding = full recomputation, LoRA, INT4); the released names without
the `transformer.` / `model.` prefix; the refused variants; which attention runs for ALiBi."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import hf_checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from glm_jax import layers  # noqa: E402
from glm_jax.config import PRESETS, GLMConfig  # noqa: E402
from glm_jax.convert import ConversionError  # noqa: E402
from glm_jax.export import ExportError, export_tensors  # noqa: E402
from glm_jax.quant import dequantize_params, quantize_params  # noqa: E402
from glm_jax.released import convert_folder  # noqa: E402

VOCAB = 512  # above the test tokenizers' ~400 ids
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 8, 250, 61, 9, 33, 140, 77]]
STEPS = 5


def _random(cls, config, seed: int):
    """A `cls` model of `config` with seeded weights, every one moved off transformers' init (zero
    biases, unit LayerNorms) so that each tensor's place in the conversion matters."""
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model.eval()


def _bloom(**kw):
    # 6 heads: ALiBi's slopes for the 4 of the largest power of two, then 2 of the sequence for 8
    cfg = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, seq_length=64, hidden_dropout=0.0)
    return _random(transformers.BloomForCausalLM, transformers.BloomConfig(**{**cfg, **kw}), 0)


def _opt(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=80,
        max_position_embeddings=64,
        dropout=0.0,
    )
    return _random(transformers.OPTForCausalLM, transformers.OPTConfig(**{**cfg, **kw}), 1)


FAMILIES = {
    "bloom": (_bloom, transformers.BloomForCausalLM, "transformer."),
    "opt": (_opt, transformers.OPTForCausalLM, "model."),
}


class Case:
    """One family's tiny torch model, its saved folder and our conversion of it."""

    def __init__(self, name: str, folder):
        build, self.cls, self.prefix = FAMILIES[name]
        self.name, self.model = name, build()
        self.folder = hf_checks.save_tiny(self.model, folder, style=name)
        self.converted = convert_folder(self.folder, dtype="float32")
        self.config = self.converted.config
        self.params = jax.tree_util.tree_map(jnp.asarray, self.converted.params)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def _ids(seed: int, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, shape)


def test_detected_with_tokenizer(case):
    got = case.converted
    assert (got.layout, got.family) == (case.name, case.name)
    assert got.tokenizer_file == os.path.join(case.folder, "tokenizer.json")
    assert case.config.dtype == "float32" and case.config.vocab_size == VOCAB


def test_same_logits_as_transformers(case):
    ids = _ids(0)
    np.testing.assert_allclose(
        hf_checks.our_logits(case.config, case.params, ids), hf_checks.torch_logits(case.model, ids), atol=1e-4
    )


def test_greedy_matches_generate(case):
    hf_checks.assert_greedy_matches(case.config, case.params, case.model, PROMPTS, STEPS)


def test_cached_decoding_equals_full(case):
    hf_checks.assert_cached_equals_full(case.config, case.params, PROMPTS, STEPS)


def test_export_reloads_in_transformers(case, tmp_path):
    back = hf_checks.export_reload(case.config, case.params, case.name, case.cls, tmp_path / "out")
    ids = _ids(1)
    np.testing.assert_allclose(hf_checks.torch_logits(back, ids), hf_checks.torch_logits(case.model, ids), atol=1e-5)


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_lora_step(case):
    losses = hf_checks.lora_step(case.config, case.params)
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0], losses


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_int4_decoding(case):
    """INT4 weights (biases, norms and embeddings kept 16-bit) decode as the float model does on
    the dequantized tree (the same numbers), and close to the float model itself."""
    int4 = case.config.override(quantization="int4")
    grid = dequantize_params(quantize_params(case.params, int4), int4)
    q_tokens, f_tokens, q_first, f_first = hf_checks.int4_greedy(case.config, grid, PROMPTS, STEPS)
    assert q_tokens == f_tokens and [len(t) for t in q_tokens] == [STEPS] * len(PROMPTS)
    np.testing.assert_allclose(q_first, f_first, atol=1e-4)
    for got, prompt in zip(q_first, PROMPTS):  # and near transformers' float model
        assert np.corrcoef(got, hf_checks.torch_logits(case.model, [prompt])[0, -1])[0, 1] > 0.98


def _bigscience_config(cfg: dict) -> dict:
    """A save_pretrained BloomConfig as bigscience's config.json spells it (bigscience/bloom:
    n_embed, num_attention_heads, pretraining_tp 4, no seq_length)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("hidden_size", "n_head", "seq_length")}
    return {**cfg, "n_embed": 48, "num_attention_heads": 6, "pretraining_tp": 4}


def test_released_names_without_prefix_convert(case, tmp_path):
    """bigscience's files name `h.0...` and facebook's `decoder.layers...`: the same model."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(case.folder, "model.safetensors"))
    assert all(n.startswith((case.prefix, "lm_head.")) for n in tensors)
    save_file({n.removeprefix(case.prefix): x for n, x in tensors.items()}, str(tmp_path / "model.safetensors"))
    with open(os.path.join(case.folder, "config.json")) as f:
        cfg = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(_bigscience_config(cfg) if case.name == "bloom" else cfg))
    released = convert_folder(str(tmp_path), dtype="float32")
    want = case.config.override(max_sequence_length=2048) if case.name == "bloom" else case.config
    assert released.config == want
    flat = lambda tree: {k: np.asarray(v) for k, v in _flatten(tree)}  # noqa: E731
    ours, theirs = flat(case.params), flat(released.params)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def _flatten(tree, path=()):
    for k, v in tree.items():
        yield from _flatten(v, path + (k,)) if isinstance(v, dict) else [(path + (k,), v)]


def _with_config(case, tmp_path, **changes) -> str:
    """The case's folder with config.json fields changed."""
    folder = tmp_path / "changed"
    shutil.copytree(case.folder, folder)
    with open(case.folder + "/config.json") as f:
        cfg = {**json.load(f), **changes}
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


REFUSED = {
    "bloom": [
        dict(apply_residual_connection_post_layernorm=True),
        dict(slow_but_exact=True, pretraining_tp=2),  # transformers then drops two biases
    ],
    "opt": [
        dict(do_layer_norm_before=False),  # OPT-350m's post-LN
        dict(word_embed_proj_dim=16),  # OPT-350m's project_in / project_out
        dict(activation_function="gelu"),
        dict(layer_norm_elementwise_affine=False),
    ],
}


def test_other_blocks_are_refused(case, tmp_path):
    for changes in REFUSED[case.name]:
        with pytest.raises(ConversionError, match=next(iter(changes))):
            convert_folder(_with_config(case, tmp_path / next(iter(changes)), **changes))


def test_export_refuses_another_block(case):
    with pytest.raises(ExportError, match="ffn_kind"):
        export_tensors(case.params, case.config.override(ffn_kind="gelu"), case.name, "float32")


def test_opt_variants(tmp_path):
    """No biases, no final LayerNorm (`_remove_final_layer_norm`), an untied head: converted and
    exported back with the same logits."""
    model = _opt(enable_bias=False, _remove_final_layer_norm=True, tie_word_embeddings=False)
    config, params = hf_checks.convert(hf_checks.save_tiny(model, tmp_path / "in"))
    assert (config.qkv_bias, config.ffn_bias, config.final_norm, config.tie_word_embeddings) == (False,) * 4
    ids = _ids(2)
    want = hf_checks.torch_logits(model, ids)
    np.testing.assert_allclose(hf_checks.our_logits(config, params, ids), want, atol=1e-4)
    back = hf_checks.export_reload(config, params, "opt", transformers.OPTForCausalLM, tmp_path / "out")
    np.testing.assert_allclose(hf_checks.torch_logits(back, ids), want, atol=1e-5)


def test_alibi_attention_is_the_xla_reference():
    """ALiBi has no fused kernel: on CPU `auto` picks XLA silently; asking for cuDNN warns once."""
    config = GLMConfig(**{**_bloom_fields(), "attention_impl": "auto"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert layers.choose_attention(config, False) == "xla"
    assert not caught
    layers._warn_fallback.cache_clear()
    cudnn = config.override(attention_impl="cudnn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [layers.choose_attention(cudnn, False) for _ in range(2)] == ["xla", "xla"]
    assert [w.category for w in caught] == [UserWarning]
    assert "ALiBi" in str(caught[0].message) and "XLA reference runs" in str(caught[0].message)


def _bloom_fields() -> dict:
    return dict(PRESETS["bloom-560m"], num_layers=2, hidden_size=48, num_attention_heads=6, vocab_size=VOCAB)
