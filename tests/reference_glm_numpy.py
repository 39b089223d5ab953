"""A float64 numpy forward of the original GLM (Du et al. 2022), written from its paper and THUDM/GLM
(commit 4f61ed7, mpu/transformer.py GPT2ParallelTransformer and model/modeling_glm.py GLMModel)
on THUDM's own state-dict names: no code of ours. Tests compare the converted model to it.

    logits = glm_logits(state, tokens, position_ids, sep, num_heads)

- embeddings: word_embeddings[token] + position_embeddings[position] + block_position_embeddings[block]
  (`position_ids` is [B, 2, S]: positions, then block positions);
- attention mask from `sep` (THUDM's `build_mask_matrix`): lower-triangular ones, and every query
  sees keys j < sep (part A, bidirectional);
- each layer, pre-LN: h + Attn(LN(h)), then h + MLP(LN(h)); query_key_value output rows are
  [q | k | v], each split into heads; scores q.k / sqrt(d) (or THUDM's attention_scale form),
  multiplied by the 0/1 mask, -65504 added where the mask is 0; GeLU (OpenAI's tanh form in the
  training code; transformers' erf gelu in the Hub's remote code);
- final LayerNorm, logits against the word embeddings.
"""

from __future__ import annotations

from math import erf, sqrt

import numpy as np

_erf = np.vectorize(erf)
EPS = 1e-5  # GPT2ParallelTransformer / GLMStack layernorm_epsilon


def gelu(x: np.ndarray, approximate: str = "tanh") -> np.ndarray:
    """tanh: THUDM's gelu_impl (OpenAI's); erf: torch's exact GeLU (transformers.activations.gelu)."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
    return 0.5 * x * (1.0 + _erf(x / sqrt(2.0)))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """torch.nn.Linear: weight [out, in]."""
    return x @ weight.T + bias


def sep_mask(seq_len: int, sep: np.ndarray) -> np.ndarray:
    """THUDM's mask from the part-A length `sep` [B] -> [B, 1, S, S] of 0/1 (1 = visible)."""
    m = np.tril(np.ones((seq_len, seq_len)))[None].repeat(len(sep), 0)
    for b, s in enumerate(sep):
        m[b, :, : int(s)] = 1.0
    return m[:, None]


def self_attention(x, mask, qkv_w, qkv_b, dense_w, dense_b, num_heads: int, attention_scale: float = 1.0):
    """x [B, S, E], mask [B, 1, S, S] -> [B, S, E]."""
    b, s, e = x.shape
    d = e // num_heads
    q, k, v = np.split(linear(x, qkv_w, qkv_b), 3, axis=-1)
    q, k, v = (t.reshape(b, s, num_heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    if attention_scale > 1.0:
        scores = (q / sqrt(attention_scale)) @ (k.transpose(0, 1, 3, 2) / sqrt(d * attention_scale))
    else:
        scores = q @ (k.transpose(0, 1, 3, 2) / sqrt(d))
    scores = scores * mask
    if attention_scale > 1.0:
        scores = (scores - scores.max(-1, keepdims=True)) * attention_scale
    scores = scores + (-65504.0) * (1.0 - mask)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, e)
    return linear(context, dense_w, dense_b)


def glm_logits(
    state: dict,
    tokens: np.ndarray,
    position_ids: np.ndarray,
    sep: np.ndarray,
    num_heads: int,
    approximate: str = "tanh",
    attention_scale: float = 1.0,
    eps: float = EPS,
) -> np.ndarray:
    """GLMModel's logits [B, S, V] (float64) for tokens [B, S], position_ids [B, 2, S] and part-A
    lengths sep [B]; `state` holds THUDM's names, bare or under `glm.`."""
    w = {name.removeprefix("glm."): np.asarray(t, np.float64) for name, t in state.items()}
    tokens, position_ids = np.asarray(tokens), np.asarray(position_ids)
    h = (
        w["word_embeddings.weight"][tokens]
        + w["transformer.position_embeddings.weight"][position_ids[:, 0]]
        + w["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    )
    mask = sep_mask(tokens.shape[1], np.asarray(sep))
    i = 0
    while f"transformer.layers.{i}.input_layernorm.weight" in w:
        p = f"transformer.layers.{i}."
        x = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        h = h + self_attention(
            x,
            mask,
            w[p + "attention.query_key_value.weight"],
            w[p + "attention.query_key_value.bias"],
            w[p + "attention.dense.weight"],
            w[p + "attention.dense.bias"],
            num_heads,
            attention_scale,
        )
        x = layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
        x = gelu(linear(x, w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"]), approximate)
        h = h + linear(x, w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"])
        i += 1
    h = layer_norm(h, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], eps)
    return h @ w["word_embeddings.weight"].T


def blank_infilling(part_a: list[int], spans: list[tuple[int, list[int]]], sop: int):
    """GLM's pretraining input (blocklm_utils): part A (text with mask tokens in place of spans),
    then each span as sop + its tokens at the position of its mask with block positions 1, 2, ...

    spans: (index of the span's mask token in part_a, the span's tokens).
    -> tokens [S], position_ids [2, S], sep (= len(part_a))."""
    tokens, positions, blocks = list(part_a), list(range(len(part_a))), [0] * len(part_a)
    for mask_index, span in spans:
        tokens += [sop] + list(span)
        positions += [mask_index] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    return np.array(tokens), np.array([positions, blocks]), len(part_a)
