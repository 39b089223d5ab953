"""Converters: GLM-130B reference layout vs a float64 numpy forward; transformers GlmForCausalLM parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward
from reference_numpy import glm_forward, random_glm130b_state_dict
from torch_models import tiny_glm4

from glm_jax.config import get_config
from glm_jax.convert import ConversionError, config_from_hf_glm, from_glm130b_state_dict, from_hf_glm
from glm_jax.model import abstract_params

SMALL_130B = dict(
    num_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=200,
    vocab_pad_multiple=128,
    dtype="float32",
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def _glm_batch(s=12):
    """Two sequences: a [gMASK]-style sample, and two packed samples plus padding, 2D block ids."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 200, (2, s))
    seg = np.array([[1] * s, [1] * 5 + [2] * 5 + [0] * (s - 10)])
    prefix = np.array([[1] * 7 + [0] * (s - 7), [1, 1, 1, 0, 0, 1, 1, 1, 1, 0] + [0] * (s - 10)])
    pos = np.array([list(range(7)) + [6] * (s - 7), [0, 1, 2, 2, 2, 0, 1, 2, 3, 3] + [0] * (s - 10)])
    block = np.array([[0] * 7 + list(range(1, s - 6)), [0, 0, 0, 1, 2, 0, 0, 0, 0, 1] + [0] * (s - 10)])
    b = dict(tokens=tokens, position_ids=pos, block_position_ids=block, segment_ids=seg, prefix_mask=prefix)
    return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}


def _tree_shapes(tree):
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("glm-130b", {}),
        ("chatglm-6b", dict(position_encoding_2d=True, tie_word_embeddings=False, ffn_kind="gelu_tanh")),
    ],
)
def test_glm130b_layout_matches_numpy_float64_forward(preset, extra):
    c = get_config(preset, **{**SMALL_130B, **extra})
    sd = random_glm130b_state_dict(c, np.random.default_rng(0))
    params = from_glm130b_state_dict(sd, c)
    assert _tree_shapes(params) == _tree_shapes(
        jax.tree_util.tree_map(lambda b: b.value, abstract_params(c), is_leaf=lambda x: hasattr(x, "value"))
    )
    batch = _glm_batch()
    logits = np.asarray(forward(c, params, batch))
    assert logits.shape == (2, 12, c.vocab_size)
    for i in range(2):
        nb = {k: np.asarray(v[i]) for k, v in batch.items()}
        ref = glm_forward(
            sd, c, nb["tokens"], nb["position_ids"], nb["block_position_ids"], nb["segment_ids"], nb["prefix_mask"]
        )
        real = nb["segment_ids"] != 0  # padded queries have no defined output
        np.testing.assert_allclose(logits[i][real], ref[real], atol=1e-5, rtol=1e-5)


def test_glm130b_converter_names_every_problem():
    c = get_config("glm-130b", **SMALL_130B)
    sd = random_glm130b_state_dict(c, np.random.default_rng(0))
    sd["transformer.layers.0.attention.rotary_emb.inv_freq"] = np.ones(8)  # a buffer: ignored
    from_glm130b_state_dict(sd, c)
    del sd["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    sd["transformer.layers.2.attention.dense.weight"] = np.zeros((64, 32))
    sd["transformer.layers.9.foo"] = np.zeros(3)
    with pytest.raises(ConversionError) as err:
        from_glm130b_state_dict(sd, c)
    msg = str(err.value)
    assert "missing transformer.layers.1.mlp.dense_4h_to_h.bias" in msg
    assert "transformer.layers.2.attention.dense.weight has shape (64, 32), expected (64, 64)" in msg
    assert "unexpected tensor transformer.layers.9.foo" in msg


def test_embedding_rows_are_zero_padded():
    c = get_config("glm-130b", **SMALL_130B)
    params = from_glm130b_state_dict(random_glm130b_state_dict(c, np.random.default_rng(0)), c)
    table = params["word_embeddings"]["embedding"]
    assert table.shape == (256, 64) and not table[200:].any() and table[:200].any()


# ---- transformers GlmForCausalLM (GLM-4 family) parity -------------------------------------------
@pytest.fixture(scope="module")
def hf_glm():
    return tiny_glm4(vocab_size=160, hidden_size=64, intermediate_size=96, head_dim=16)


def test_hf_glm_parity(hf_glm):
    import torch

    cfg, model = hf_glm
    c = config_from_hf_glm(cfg, dtype="float32")
    assert c.rotary_fraction == 0.5 and c.num_kv_heads == 2 and c.layernorm_epsilon == 1e-5
    params = from_hf_glm(model.state_dict(), c)
    tokens = np.random.default_rng(0).integers(0, 160, (2, 10))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    s = tokens.shape[1]
    batch = dict(
        tokens=tokens,
        position_ids=np.broadcast_to(np.arange(s), tokens.shape),
        segment_ids=np.ones_like(tokens),
        prefix_mask=np.zeros_like(tokens),
    )
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    ours = np.asarray(forward(c, params, batch))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_hf_glm_converter_rejects_wrong_shapes(hf_glm):
    cfg, model = hf_glm
    c = config_from_hf_glm(cfg, dtype="float32", num_kv_heads=4)
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(32, 64\)"):
        from_hf_glm(model.state_dict(), c)


@pytest.mark.parametrize("tp,bits", [(2, 4), (1, 8)])
def test_glm130b_quantized_checkpoint_loads_packed_and_computes_what_the_reference_does(tp, bits):
    """Per-rank INT4/INT8 state dicts as the reference's convert_tp.py writes them load without
    re-quantizing, and the model computes the reference forward over the dequantized weights."""
    from reference_numpy import glm130b_quantized_ranks

    from glm_jax.convert import from_glm130b_quantized

    c = get_config("glm-130b", **SMALL_130B)
    sd = random_glm130b_state_dict(c, np.random.default_rng(0))
    ranks, dequantized = glm130b_quantized_ranks(sd, tp, bits)
    cq = c.override(quantization=f"int{bits}", quantization_groups=tp if tp > 1 else 0)
    params = from_glm130b_quantized(ranks, cq)
    assert _tree_shapes(params) == _tree_shapes(
        jax.tree_util.tree_map(lambda b: b.value, abstract_params(cq), is_leaf=lambda x: hasattr(x, "value"))
    )
    dense = params["layers"]["attention"]["dense"]
    assert dense["q"].dtype == (np.uint8 if bits == 4 else np.int8) and dense["scale"].shape[1] == tp
    batch = _glm_batch()
    logits = np.asarray(forward(cq, params, batch))
    nb = {k: np.asarray(v[0]) for k, v in batch.items()}
    ref = glm_forward(
        dequantized, c, nb["tokens"], nb["position_ids"], nb["block_position_ids"], nb["segment_ids"], nb["prefix_mask"]
    )
    np.testing.assert_allclose(logits[0], ref, atol=1e-4, rtol=1e-4)


def test_glm130b_quantized_checkpoint_errors_say_what_to_fix():
    from reference_numpy import glm130b_quantized_ranks

    from glm_jax.convert import from_glm130b_quantized

    c = get_config("glm-130b", **SMALL_130B)
    ranks, _ = glm130b_quantized_ranks(random_glm130b_state_dict(c, np.random.default_rng(0)), 2)
    with pytest.raises(ConversionError, match="set quantization_groups=2"):
        from_glm130b_quantized(ranks, c.override(quantization="int4"))
    with pytest.raises(ConversionError, match="quantization=int4 or int8"):
        from_glm130b_quantized(ranks, c)
    for r in ranks:
        del r["transformer.layers.1.mlp.dense_4h_to_h.weight_scale"]
    with pytest.raises(ConversionError, match=r"missing transformer.layers.1.mlp.dense_4h_to_h.weight_scale"):
        from_glm130b_quantized(ranks, c.override(quantization="int8", quantization_groups=2))


@pytest.mark.parametrize("bits", [4, None])
def test_convert_glm130b_script_turns_reference_rank_files_into_a_serving_checkpoint(bits, tmp_path):
    """Rank files in the reference's folder layout (`latest`, <iteration>/mp_rank_XX_model_states.pt),
    INT4 or float, become a checkpoint that load_checkpoint serves with the converter's weights."""
    import importlib.util
    import pathlib

    import torch
    from reference_numpy import glm130b_quantized_ranks

    from glm_jax.convert import from_glm130b_quantized
    from glm_jax.loading import load_checkpoint

    small = {**SMALL_130B, "vocab_size": 150528, "vocab_pad_multiple": 768}  # icetk's ids must fit
    c = get_config("glm-130b", **small)
    sd = random_glm130b_state_dict(c, np.random.default_rng(0))
    sd = {k: v.astype(np.float16) for k, v in sd.items()}  # the reference stores fp16
    ranks, _ = glm130b_quantized_ranks(sd, 2, bits)
    (tmp_path / "sat" / "1000").mkdir(parents=True)
    (tmp_path / "sat" / "latest").write_text("1000")
    for i, r in enumerate(ranks):
        torch.save(
            {"module": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.items()}, "iteration": 1000},
            tmp_path / "sat" / "1000" / f"mp_rank_{i:02}_model_states.pt",
        )
    script_path = pathlib.Path(__file__).parent.parent / "experiments" / "convert.py"
    spec = importlib.util.spec_from_file_location("convert_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    overrides = [f"--set={k}={v}" for k, v in small.items()]
    r = script.main(["--input", str(tmp_path / "sat"), "--out", str(tmp_path / "serve")] + overrides)
    assert r["ranks"] == 2 and r["step"] == 1000 and r["quantization"] == ("int4" if bits else "none")
    assert r["layout"] == "glm130b-sat" and r["family"] == "glm-130b" and r["param_dtype"] == "float16"
    config, params, step = load_checkpoint(str(tmp_path / "serve"))
    assert step == 1000 and config.quantization_groups == (2 if bits else 0)
    want_config = c.override(
        param_dtype="float16", dtype="float16", **(dict(quantization="int4", quantization_groups=2) if bits else {})
    )
    want = (
        from_glm130b_quantized(ranks, want_config)
        if bits
        else from_glm130b_state_dict({k: v.astype(np.float32) for k, v in sd.items()}, want_config)
    )
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SystemExit):
        script.main(["--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
