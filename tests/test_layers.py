"""Layers: the GLM mask, rotary, DeepNorm block, GeGLU/SwiGLU halves, attention implementations."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_numpy import gelu_exact, glm_mask, layernorm, random_glm130b_state_dict, rope

from glm_jax import layers
from glm_jax.config import get_config
from glm_jax.convert import from_glm130b_state_dict
from glm_jax.layers import (
    FeedForward,
    GLMBlock,
    SelfAttention,
    apply_rotary,
    choose_attention,
    glm_attention_mask,
    recording_attention,
    rotary_tables,
    xla_attention,
)

F32 = dict(dtype="float32", hidden_dropout=0.0, attention_dropout=0.0)


def test_mask_matches_brute_force():
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3, 0, 0]])
    prefix = np.array([[1, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 1]])
    mask = np.asarray(glm_attention_mask(jnp.asarray(seg), jnp.asarray(prefix)))
    assert mask.shape == (2, 1, 8, 8)
    for b in range(2):
        for q in range(8):
            for k in range(8):
                want = seg[b, q] == seg[b, k] != 0 and (prefix[b, k] == 1 or k <= q)
                assert mask[b, 0, q, k] == want, (b, q, k)
        np.testing.assert_array_equal(mask[b, 0], glm_mask(seg[b], prefix[b]))


# ---- rotary -------------------------------------------------------------------------------------
def _scores(config, q, k, pos_q, pos_k, block_q=None, block_k=None):
    zeros = jnp.zeros((1, 1), jnp.int32)
    tq = rotary_tables(jnp.array([[pos_q]]), zeros if block_q is None else jnp.array([[block_q]]), config)
    tk = rotary_tables(jnp.array([[pos_k]]), zeros if block_k is None else jnp.array([[block_k]]), config)
    return float(jnp.sum(apply_rotary(q, tq, config) * apply_rotary(k, tk, config)))


@pytest.mark.parametrize(
    "extra", [{}, dict(rotary_fraction=0.5, rotary_interleaved=True), dict(rotary_interleaved=True)]
)
def test_rotary_scores_depend_only_on_relative_position(extra):
    c = get_config("glm-tiny", **F32, **extra)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, c.head_dim)), jnp.float32) for _ in range(2))
    base = _scores(c, q, k, 7, 3)
    for shift in (1, 5, 100, 1000):
        assert _scores(c, q, k, 7 + shift, 3 + shift) == pytest.approx(base, rel=1e-4, abs=1e-5)
    assert abs(_scores(c, q, k, 9, 3) - base) > 1e-3


def test_partial_rotary_leaves_the_other_dims_alone():
    c = get_config("glm-tiny", rotary_fraction=0.5, rotary_interleaved=True, **F32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 2, c.head_dim)), jnp.float32)
    out = apply_rotary(x, rotary_tables(jnp.array([[5]]), jnp.zeros((1, 1), jnp.int32), c), c)
    np.testing.assert_array_equal(out[..., c.head_dim // 2 :], x[..., c.head_dim // 2 :])
    assert not np.allclose(out[..., : c.head_dim // 2], x[..., : c.head_dim // 2])


def test_2d_rotary_uses_block_position_in_second_half():
    c = get_config("glm-tiny", position_encoding_2d=True, **F32)
    x = np.random.default_rng(0).standard_normal((1, 3, 2, c.head_dim))
    pos, block = np.array([[0, 4, 4]]), np.array([[0, 1, 2]])
    out = np.asarray(
        apply_rotary(jnp.asarray(x, jnp.float32), rotary_tables(jnp.asarray(pos), jnp.asarray(block), c), c)
    )
    ref = rope(x[0], pos[0], block[0], two_d=True)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    # changing only the block position changes only the second half
    out2 = np.asarray(
        apply_rotary(jnp.asarray(x, jnp.float32), rotary_tables(jnp.asarray(pos), jnp.asarray(block + 3), c), c)
    )
    half = c.head_dim // 2
    np.testing.assert_array_equal(out2[..., :half], out[..., :half])
    assert not np.allclose(out2[..., 1:, :, half:], out[..., 1:, :, half:])


def test_fp16_angle_option_changes_angles_slightly():
    c = get_config("glm-tiny", **F32)
    c16 = c.override(rotary_fp16_angles=True)
    pos = jnp.array([[1000, 2047]])
    ((cos32, _),) = rotary_tables(pos, pos, c)
    ((cos16, _),) = rotary_tables(pos, pos, c16)
    diff = float(jnp.abs(cos32 - cos16).max())
    assert 0 < diff < 0.5


# ---- DeepNorm block and FFN halves -------------------------------------------------------------
def test_deepnorm_block_equals_spec_formula():
    """One block through GLMBlock vs the formula of docs/reference.md#1-glm-130b-architecture in
    float64 numpy (via a 1-layer model whose embedding is the identity on the tokens' one-hot rows
    and final LN/logits are skipped)."""
    c = get_config("glm-130b", num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=128, **F32)
    rng = np.random.default_rng(0)
    sd = random_glm130b_state_dict(c, rng, scale=0.2)
    params = from_glm130b_state_dict(sd, c)
    layer = jax.tree_util.tree_map(lambda x: x[0], params["layers"])
    s = 6
    h = rng.standard_normal((1, s, 32))
    seg, prefix = np.ones((1, s), int), np.array([[1, 1, 1, 0, 0, 0]])
    pos = np.arange(s)[None]
    tables = rotary_tables(jnp.asarray(pos), jnp.zeros_like(jnp.asarray(pos)), c)
    out, _ = GLMBlock(c).apply(
        {"params": layer},
        jnp.asarray(h, jnp.float32),
        glm_attention_mask(jnp.asarray(seg), jnp.asarray(prefix)),
        tables,
    )
    # by hand: x = LN_in(h); h = alpha*x + Attn(x); y = LN_post(h); out = alpha*y + FFN(y)
    p = lambda n: sd[f"transformer.layers.0.{n}"]
    alpha, d = np.sqrt(2.0), c.head_dim
    x = layernorm(h[0], p("input_layernorm.weight"), p("input_layernorm.bias"), 1e-5)
    qkv = (x @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")).reshape(s, 2, 3, d)
    q, k, v = rope(qkv[:, :, 0], pos[0], None, False, True), rope(qkv[:, :, 1], pos[0], None, False, True), qkv[:, :, 2]
    sc = np.where(glm_mask(seg[0], prefix[0])[None], np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d), -1e4)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", pr, v).reshape(s, -1) @ p("attention.dense.weight").T + p("attention.dense.bias")
    hh = alpha * x + attn
    y = layernorm(hh, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), 1e-5)
    u = y @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias")
    a, b = np.split(u, 2, -1)
    want = alpha * y + (a * gelu_exact(b)) @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias")
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=2e-5, rtol=1e-5)


def _ffn_with_halves(kind):
    c = get_config(
        "glm-tiny", ffn_kind=kind, hidden_size=8, num_attention_heads=2, inner_hidden_size=4, ffn_bias=False, **F32
    )
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 2, 4))
    w2 = rng.standard_normal((4, 8))
    x = rng.standard_normal((1, 3, 8))
    params = {
        "dense_h_to_4h": {"kernel": jnp.asarray(w1, jnp.float32)},
        "dense_4h_to_h": {"kernel": jnp.asarray(w2, jnp.float32)},
    }
    out = np.asarray(FeedForward(c).apply({"params": params}, jnp.asarray(x, jnp.float32)))
    first, second = x @ w1[:, 0], x @ w1[:, 1]
    return out, first, second, w2


def test_geglu_gates_with_the_second_half():
    out, first, second, w2 = _ffn_with_halves("geglu")
    np.testing.assert_allclose(out, (first * gelu_exact(second)) @ w2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, (second * gelu_exact(first)) @ w2, atol=1e-3)


def test_swiglu_gates_with_the_first_half():
    out, first, second, w2 = _ffn_with_halves("swiglu")
    silu = lambda z: z / (1 + np.exp(-z))
    np.testing.assert_allclose(out, (silu(first) * second) @ w2, rtol=1e-5, atol=1e-5)


# ---- attention implementations -----------------------------------------------------------------
def test_grouped_attention_equals_repeated_kv_heads():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(2))
    mask = glm_attention_mask(jnp.ones((2, 5), jnp.int32), jnp.asarray([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]))
    grouped = xla_attention(q, k, v, mask)
    full = xla_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
    np.testing.assert_allclose(grouped, full, atol=1e-6)


def test_cudnn_request_falls_back_cleanly_on_cpu():
    c = get_config("glm-tiny", attention_impl="cudnn", **F32)
    assert jax.default_backend() == "cpu"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert choose_attention(c, dropout_active=False) == "xla"
    assert choose_attention(c.override(attention_impl="auto"), dropout_active=False) == "xla"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, c.hidden_size)), jnp.float32)
    mask = glm_attention_mask(jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 6), jnp.int32))
    tables = rotary_tables(jnp.arange(6)[None], jnp.zeros((1, 6), jnp.int32), c)
    params = SelfAttention(c).init(jax.random.key(0), x, mask, tables)
    fused = SelfAttention(c).apply(params, x, mask, tables)[0]
    plain = SelfAttention(c.override(attention_impl="xla")).apply(params, x, mask, tables)[0]
    np.testing.assert_array_equal(fused, plain)


def test_a_fallback_from_cudnn_warns_once_per_reason():
    """Traced for a GPU with dropout on, cuDNN (asked for, or auto's choice) falls back to XLA and
    says so once per process and reason, not on every trace; without dropout auto picks cuDNN."""
    from types import SimpleNamespace

    from glm_jax.target import targeting

    layers._warn_fallback.cache_clear()
    c = get_config("glm-tiny", dtype="bfloat16")
    with targeting(SimpleNamespace(platform="gpu")), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for impl in ("cudnn", "cudnn", "auto", "auto"):
            assert choose_attention(c.override(attention_impl=impl), dropout_active=True) == "xla"
        assert choose_attention(c.override(attention_impl="auto"), dropout_active=False) == "cudnn"
    reason = "falls back to the XLA reference: attention dropout is active (cuDNN path has none)"
    assert [str(w.message) for w in caught] == [f"attention_impl={impl!r} {reason}" for impl in ("cudnn", "auto")]


def test_the_recorder_names_what_each_kind_of_attention_traced_to():
    """Full sequence, P-tuning prefix and KV cache, each traced inside `recording_attention`; a
    trace outside it, or a jitted function's cached trace, records nothing."""
    c = get_config("glm-tiny", **F32)
    b, s, kv, d = 1, 6, c.num_kv_heads, c.head_dim
    x = jnp.zeros((b, s, c.hidden_size), jnp.float32)
    mask = glm_attention_mask(jnp.ones((b, s), jnp.int32), jnp.zeros((b, s), jnp.int32))
    tables = rotary_tables(jnp.arange(s)[None], jnp.zeros((b, s), jnp.int32), c)
    params = jax.eval_shape(lambda: SelfAttention(c).init(jax.random.key(0), x, mask, tables))
    cache = (jnp.zeros((b, 8, kv, d)), jnp.zeros((b, 8, kv, d)))
    cached_mask = jnp.ones((b, 1, s, 8), bool)
    calls = {
        "self": lambda p: SelfAttention(c).apply(p, x, mask, tables),
        "prefix": lambda p: SelfAttention(c).apply(p, x, mask, tables, prefix=jnp.zeros((3, 2, kv, d))),
        "cached": lambda p: SelfAttention(c).apply(p, x, cached_mask, tables, cache, 0),
    }
    for kind, call in calls.items():
        with recording_attention() as used:
            jax.eval_shape(call, params)
        assert used == {kind: "xla"}
    jax.eval_shape(calls["self"], params)
    assert used == {"cached": "xla"}  # the recorder is closed
    step = jax.jit(calls["self"])
    step.lower(params)
    with recording_attention() as used:
        step.lower(params)
    assert used == {}


@pytest.mark.parametrize("heads", [6, 8, 112])  # 6 and 112: not powers of two (the extra slopes)
def test_alibi_slopes_and_bias_are_blooms(heads):
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from glm_jax.layers import alibi_bias

    want = build_alibi_tensor(torch.ones(1, 5), heads, torch.float32)[:, 0].numpy()  # [H, keys]
    mask = jnp.ones((1, 1, 5, 5), bool)
    got = np.asarray(alibi_bias(mask, heads))[0, :, -1]  # the last query sees every key
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a causal row sees keys 0..q: the bias counts only the keys it sees
    causal = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    np.testing.assert_allclose(np.asarray(alibi_bias(causal, heads))[0, :, 2, :3], want[:, :3], rtol=1e-6)


def test_llama3_rotary_scaling_is_transformers():
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from glm_jax.layers import scaled_inv_freq

    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=2, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **rope)
    )
    want = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].numpy()
    c = get_config(
        "llama-3-8b", head_dim=32, rotary_scaling="llama3", rotary_scaling_factor=8.0, rotary_original_length=64
    )
    base = 1.0 / (5e5 ** (np.arange(0, 32, 2, dtype=np.float32) / 32))
    np.testing.assert_allclose(scaled_inv_freq(base, c), want, rtol=1e-6)
    assert want[0] == base[0] and want[-1] == pytest.approx(base[-1] / 8)  # high frequencies kept, low divided
