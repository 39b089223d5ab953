"""A float64 numpy GLM forward written straight from docs/reference.md sections 1-2, on the reference's
own weight layout (torch Linear [out, in], fused per-head QKV). Tests compare the model to it."""

from math import erf, sqrt

import numpy as np

_erf = np.vectorize(erf)


def gelu_exact(x):
    return 0.5 * x * (1.0 + _erf(x / sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rotate_half_rope(x, pos, base=10000.0, fp16_inv_freq=False):
    """x [S, H, d], rotate-half pairing over all d dims at integer positions pos [S]; with
    fp16_inv_freq the inverse frequencies are rounded to fp16 first (SAT < 0.3, ChatGLM-6B)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    if fp16_inv_freq:
        inv = inv.astype(np.float16).astype(np.float64)
    ang = pos[:, None] * inv[None]  # [S, d/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def rope(x, pos, block_pos, two_d, fp16_inv_freq=False):
    if not two_d:
        return rotate_half_rope(x, pos, fp16_inv_freq=fp16_inv_freq)
    half = x.shape[-1] // 2
    return np.concatenate(
        [
            rotate_half_rope(x[..., :half], pos, fp16_inv_freq=fp16_inv_freq),
            rotate_half_rope(x[..., half:], block_pos, fp16_inv_freq=fp16_inv_freq),
        ],
        -1,
    )


def glm_mask(seg, prefix):
    s = len(seg)
    q, k = np.arange(s)[:, None], np.arange(s)[None]
    return (seg[:, None] == seg[None]) & (seg[:, None] != 0) & ((prefix[None] != 0) | (k <= q))


def glm_forward(sd, c, tokens, pos, block_pos, seg, prefix):
    """One sequence. sd: GLM-130B-layout float64 state dict; c: GLMConfig -> logits [S, vocab]."""
    n, h, d = c.num_layers, c.num_attention_heads, c.head_dim
    alpha = sqrt(2 * (c.deepnorm_alpha_layers or n))  # ChatGLM-6B: sqrt(2 x 28) whatever the depth
    eps = c.layernorm_epsilon
    act = gelu_exact if c.ffn_kind in ("geglu", "gelu") else gelu_tanh
    mask = glm_mask(seg, prefix)
    x = sd["transformer.word_embeddings.weight"][tokens]
    for i in range(n):
        p = lambda name: sd[f"transformer.layers.{i}.{name}"]
        a = layernorm(x, p("input_layernorm.weight"), p("input_layernorm.bias"), eps)
        qkv = a @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")
        qkv = qkv.reshape(len(tokens), h, 3, d)  # per head, then q/k/v
        q = rope(qkv[:, :, 0], pos, block_pos, c.position_encoding_2d, c.rotary_fp16_inv_freq)
        k = rope(qkv[:, :, 1], pos, block_pos, c.position_encoding_2d, c.rotary_fp16_inv_freq)
        v = qkv[:, :, 2]
        scores = np.einsum("qhd,khd->hqk", q, k) / sqrt(d)
        scores = np.where(mask[None], scores, -10000.0)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("hqk,khd->qhd", probs, v).reshape(len(tokens), h * d)
        attn = ctx @ p("attention.dense.weight").T + p("attention.dense.bias")
        x = alpha * a + attn
        y = layernorm(x, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), eps)
        u = y @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias")
        if c.gated_ffn:
            first, second = np.split(u, 2, -1)
            u = first * act(second)
        else:
            u = act(u)
        x = alpha * y + (u @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias"))
    x = layernorm(x, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], eps)
    head = sd["transformer.word_embeddings.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head.T


def random_glm130b_state_dict(c, rng, scale=0.05):
    """Random float64 tensors in the GLM-130B reference layout for config c."""
    e, h, d, f, v = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size, c.vocab_size
    ffn_out = 2 * f if c.gated_ffn else f
    shapes = {
        "transformer.word_embeddings.weight": (v, e),
        "transformer.final_layernorm.weight": (e,),
        "transformer.final_layernorm.bias": (e,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    for i in range(c.num_layers):
        p = f"transformer.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (e,),
                p + "input_layernorm.bias": (e,),
                p + "attention.query_key_value.weight": (3 * h * d, e),
                p + "attention.query_key_value.bias": (3 * h * d,),
                p + "attention.dense.weight": (e, h * d),
                p + "attention.dense.bias": (e,),
                p + "post_attention_layernorm.weight": (e,),
                p + "post_attention_layernorm.bias": (e,),
                p + "mlp.dense_h_to_4h.weight": (ffn_out, e),
                p + "mlp.dense_h_to_4h.bias": (ffn_out,),
                p + "mlp.dense_4h_to_h.weight": (e, f),
                p + "mlp.dense_4h_to_h.bias": (e,),
            }
        )
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight"):
            sd[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            sd[name] = scale * rng.standard_normal(shape)
    return sd


# ---- GLM-130B's quantized tensor-parallel checkpoints (tools/convert_tp.py --quantization-bit-width) ------
_SEQUENTIAL = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_4h_to_h.bias",
    "final_layernorm.weight",
    "final_layernorm.bias",
)
_GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
_QUANTIZED = (
    "attention.dense.weight",
    "attention.query_key_value.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)
_CONCAT_DIM = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def _quantize_rows(w, bits):
    """The reference's per-rank quantization of a torch [out, in] weight: absmax per row, fp16
    scales, round, INT4 packed two per byte (even column in the high nibble). -> (stored, values)."""
    scale = (np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float16)
    q = np.round(w / scale.astype(np.float64)[:, None]).astype(np.int8)
    values = q.astype(np.float64) * scale.astype(np.float64)[:, None]
    if bits == 4:
        q = ((q[:, 0::2].astype(np.uint8) << 4) | (q[:, 1::2].astype(np.uint8) & 0xF)).view(np.int8)
    return q, scale, values


def glm130b_quantized_ranks(sd, tp, bits=4):
    """A merged float state dict -> (the `tp` per-rank state dicts the reference writes, the float
    state dict those ranks compute with: every quantized weight replaced by its per-rank
    dequantized values). bits None: float ranks (the split alone)."""
    ranks = [{} for _ in range(tp)]
    dequantized = dict(sd)
    for key, w in sd.items():
        name = ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1 :])
        if name in _SEQUENTIAL:
            for r in ranks:
                r[key] = w
            continue
        dim = _CONCAT_DIM.get(name, 0)
        if name in _GLU:
            chunks = np.split(w, 2 * tp, axis=dim)
            pieces = [np.concatenate([chunks[i], chunks[tp + i]], axis=dim) for i in range(tp)]
        else:
            pieces = np.split(w, tp, axis=dim)
        if name not in _QUANTIZED or bits is None:
            for r, p in zip(ranks, pieces):
                r[key] = p
            continue
        values = []
        for r, p in zip(ranks, pieces):
            r[key], r[key + "_scale"], v = _quantize_rows(p, bits)
            values.append(v)
        if name in _GLU:
            halves = [np.split(v, 2, axis=0) for v in values]
            dequantized[key] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            dequantized[key] = np.concatenate(values, axis=dim)
    return ranks, dequantized


# ---- ChatGLM2-6B / ChatGLM3-6B (docs/reference.md section 2), on its released names ------------------
def rmsnorm(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def interleaved_half_rope(x, pos, base=10000.0):
    """x [S, H, D]: the first D/2 dims rotate in adjacent pairs (2i, 2i+1); the rest pass through."""
    d = x.shape[-1]
    r = d // 2
    inv = 1.0 / base ** (np.arange(0, r, 2) / r)
    ang = pos[:, None] * inv[None]  # [S, r/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
    rot = np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(x.shape[:-1] + (r,))
    return np.concatenate([rot, x[..., r:]], -1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def chatglm2_forward(sd, c, tokens):
    """One causal sequence (positions 0..S-1). sd: ChatGLM2-layout float64 state dict -> logits [S, V]."""
    s, h, kv, d = len(tokens), c.num_attention_heads, c.num_kv_heads, c.head_dim
    eps = c.layernorm_epsilon
    causal = np.tril(np.ones((s, s), bool))
    pos = np.arange(s)
    x = sd["transformer.embedding.word_embeddings.weight"][tokens]
    for i in range(c.num_layers):
        p = lambda name: sd[f"transformer.encoder.layers.{i}.{name}"]
        a = rmsnorm(x, p("input_layernorm.weight"), eps)
        qkv = a @ p("self_attention.query_key_value.weight").T + p("self_attention.query_key_value.bias")
        q = qkv[:, : h * d].reshape(s, h, d)  # [all q | k groups | v groups]
        k = qkv[:, h * d : (h + kv) * d].reshape(s, kv, d)
        v = qkv[:, (h + kv) * d :].reshape(s, kv, d)
        q, k = interleaved_half_rope(q, pos, c.rotary_base), interleaved_half_rope(k, pos, c.rotary_base)
        group = np.arange(h) // (h // kv)  # head -> its KV group
        scores = np.einsum("qhd,khd->hqk", q, k[:, group]) / sqrt(d)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("hqk,khd->qhd", probs, v[:, group]).reshape(s, h * d)
        x = x + ctx @ p("self_attention.dense.weight").T
        y = rmsnorm(x, p("post_attention_layernorm.weight"), eps)
        u = y @ p("mlp.dense_h_to_4h.weight").T
        gate, up = np.split(u, 2, -1)  # the FIRST half goes through SiLU
        x = x + (silu(gate) * up) @ p("mlp.dense_4h_to_h.weight").T
    x = rmsnorm(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return x @ sd["transformer.output_layer.weight"].T


def random_chatglm2_state_dict(c, rng, scale=0.05):
    e, h, kv, d, f, v = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads,
        c.head_dim,
        c.inner_hidden_size,
        c.vocab_size,
    )
    shapes = {
        "transformer.embedding.word_embeddings.weight": (v, e),
        "transformer.output_layer.weight": (v, e),
        "transformer.encoder.final_layernorm.weight": (e,),
    }
    for i in range(c.num_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (e,),
                p + "post_attention_layernorm.weight": (e,),
                p + "self_attention.query_key_value.weight": ((h + 2 * kv) * d, e),
                p + "self_attention.query_key_value.bias": ((h + 2 * kv) * d,),
                p + "self_attention.dense.weight": (e, h * d),
                p + "mlp.dense_h_to_4h.weight": (2 * f, e),
                p + "mlp.dense_4h_to_h.weight": (e, f),
            }
        )
    return {
        n: (1.0 + 0.1 * rng.standard_normal(sh)) if n.endswith("layernorm.weight") else scale * rng.standard_normal(sh)
        for n, sh in shapes.items()
    }
