"""Load weights from the layouts users hold into our parameter tree.

- `from_glm130b_state_dict`: the GLM-130B reference (SwissArmyTransformer) layout, one merged
  tensor-parallel shard as a name -> array dict.
- `from_chatglm_state_dict`: ChatGLM-6B's released names (GLM-130B's plus `lm_head.weight`),
  `config_from_chatglm` for its config.json.
- `from_chatglm2_state_dict`: ChatGLM2-6B / ChatGLM3-6B (`transformer.encoder.layers.N...`, fused
  QKV as [all q | k groups | v groups] with a bias), `config_from_chatglm2` for its config.json.
- `from_hf_glm`: the transformers `GlmForCausalLM` layout (GLM-4 family, ChatGLM2/3's block).
  `config_from_hf_glm` builds the matching GLMConfig from that checkpoint's config.
- `from_glm130b_quantized`: GLM-130B's INT4/INT8 checkpoints (the reference's
  `tools/convert_tp.py --quantization-bit-width 4|8`), one state dict per tensor-parallel rank,
  loaded packed as they are: no dequantization, no re-quantization.

A layout is a table of `Rule`s: one source tensor (name template, torch [out, in] shape) and a
function that turns it into one or more of our leaves. Every name and shape is checked before
anything is converted, and the error lists each missing, unexpected or misshapen tensor. Adding a
layout means writing its table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from glm_jax.config import GLMConfig, get_config

Path = tuple[str, ...]


class ConversionError(ValueError):
    """The tensors do not match the layout for this config; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # name; per-layer rules contain "{i}"
    shape: tuple[int, ...]  # expected source shape
    convert: Callable[[np.ndarray], dict[Path, Any]]  # -> {our leaf path: array, or a Part of it}


@dataclasses.dataclass(frozen=True)
class Part:
    """What a rule returns for a leaf that several source tensors fill (LLaMA's gate_proj and
    up_proj: the two halves of our SwiGLU kernel [E, 2, F]): the whole leaf's shape (without the
    layer axis), where this part goes in it (a numpy index) and its values."""

    shape: tuple[int, ...]
    index: tuple
    value: np.ndarray


def _raw(x) -> np.ndarray:
    """A tensor (numpy, or torch of any dtype) as numpy in its own dtype (int8 stays int8; torch
    bf16, which numpy lacks, becomes float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()
    return np.asarray(x)


def _to_numpy(x) -> np.ndarray:
    """Float tensors keep their dtype (the cast to config.param_dtype happens once, into the
    output); anything else becomes float32."""
    x = _raw(x)
    return x if x.dtype.name in ("float16", "bfloat16", "float32", "float64") else x.astype(np.float32)


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad a [vocab, E] table to the config's padded vocab."""
    return np.concatenate([w, np.zeros((rows - w.shape[0],) + w.shape[1:], w.dtype)]) if rows > w.shape[0] else w


def _leaf(*path: str):
    return lambda w: {path: w}


def _linear(path: Path, out_shape: tuple[int, ...]):
    """torch [out, in] weight -> our kernel [in, *out_shape]."""
    return lambda w: {path: w.T.reshape((w.shape[1],) + out_shape)}


def _linear_in(path: Path, in_shape: tuple[int, ...]):
    """torch [out, in] weight whose input splits as in_shape -> our kernel [*in_shape, out]."""
    return lambda w: {path: w.T.reshape(in_shape + (w.shape[0],))}


def _halves(path: Path, f: int):
    """torch [2F, E] gated h_to_4h (first half first) -> our [E, 2, F]; a bias [2F] -> [2, F]."""
    return lambda w: {path: w.reshape(2, f, -1).transpose(2, 0, 1) if w.ndim == 2 else w.reshape(2, f)}


def _glm130b_qkv(c: GLMConfig, suffix: str):
    """GLM-130B's fused QKV: output rows ordered [heads, {q,k,v}, head_dim] (docs/reference.md section 1)."""
    h, d = c.num_attention_heads, c.head_dim

    def convert(w):
        if w.ndim == 2:
            w = w.reshape(h, 3, d, -1).transpose(3, 0, 1, 2)  # [E, H, 3, D]
            parts = w[:, :, 0], w[:, :, 1], w[:, :, 2]
        else:
            b = w.reshape(h, 3, d)
            parts = b[:, 0], b[:, 1], b[:, 2]
        return {("attention", name, suffix): p for name, p in zip(("query", "key", "value"), parts)}

    return convert


def glm130b_rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) of the GLM-130B reference layout for config `c`."""
    if c.num_kv_heads != c.num_attention_heads or c.norm_kind != "layernorm":
        raise ConversionError(
            "the GLM-130B layout has multi-head attention and LayerNorm; this config has "
            f"num_kv_heads={c.num_kv_heads}, norm_kind={c.norm_kind!r}"
        )
    e, h, d, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size
    p = "transformer.layers.{i}."
    ffn_out = 2 * f if c.gated_ffn else f
    layer = [
        *_layernorm_rules(p + "input_layernorm", ("input_layernorm",), e),
        Rule(p + "attention.query_key_value.weight", (3 * h * d, e), _glm130b_qkv(c, "kernel")),
        Rule(p + "attention.dense.weight", (e, h * d), _linear_in(("attention", "dense", "kernel"), (h, d))),
        *_layernorm_rules(p + "post_attention_layernorm", ("post_attention_layernorm",), e),
        Rule(
            p + "mlp.dense_h_to_4h.weight",
            (ffn_out, e),
            _halves(("mlp", "dense_h_to_4h", "kernel"), f)
            if c.gated_ffn
            else _linear(("mlp", "dense_h_to_4h", "kernel"), (f,)),
        ),
        Rule(p + "mlp.dense_4h_to_h.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
    ]
    if c.qkv_bias:
        layer.append(Rule(p + "attention.query_key_value.bias", (3 * h * d,), _glm130b_qkv(c, "bias")))
    if c.attention_dense_bias:
        layer.append(Rule(p + "attention.dense.bias", (e,), _leaf("attention", "dense", "bias")))
    if c.ffn_bias:
        layer.append(
            Rule(
                p + "mlp.dense_h_to_4h.bias",
                (ffn_out,),
                _halves(("mlp", "dense_h_to_4h", "bias"), f) if c.gated_ffn else _leaf("mlp", "dense_h_to_4h", "bias"),
            )
        )
        layer.append(Rule(p + "mlp.dense_4h_to_h.bias", (e,), _leaf("mlp", "dense_4h_to_h", "bias")))
    top = [_embedding_rule("transformer.word_embeddings.weight", c)]
    if c.final_norm:
        top += _layernorm_rules("transformer.final_layernorm", ("final_layernorm",), e)
    if not c.tie_word_embeddings:
        top.append(_output_layer_rule("lm_head.weight", c))
    return layer, top


def _embedding_rule(name: str, c: GLMConfig) -> Rule:
    """The word embedding [vocab, E] -> ours, its rows padded to the config's padded vocab."""
    pad = lambda w: {("word_embeddings", "embedding"): _pad_rows(w, c.padded_vocab_size)}  # noqa: E731
    return Rule(name, (c.vocab_size, c.hidden_size), pad)


def _layernorm_rules(name: str, path: tuple[str, ...], e: int) -> list[Rule]:
    """A LayerNorm's `name`.weight and `name`.bias [E] -> our scale and bias at `path`."""
    return [Rule(name + ".weight", (e,), _leaf(*path, "scale")), Rule(name + ".bias", (e,), _leaf(*path, "bias"))]


def _output_layer_rule(name: str, c: GLMConfig) -> Rule:
    return Rule(
        name, (c.vocab_size, c.hidden_size), lambda w: {("output_layer", "kernel"): _pad_rows(w, c.padded_vocab_size).T}
    )


def _self_attn_rules(p: str, c: GLMConfig) -> list[Rule]:
    """transformers' separate `self_attn.{q,k,v,o}_proj` (GlmForCausalLM, LlamaForCausalLM) after
    the layer prefix `p`: the four weights, q/k/v biases with `qkv_bias`, o's with
    `attention_dense_bias`."""
    e, h, kv, d = c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim
    heads = (("query", h), ("key", kv), ("value", kv))
    rules = [
        Rule(p + f"self_attn.{name[0]}_proj.weight", (n * d, e), _linear(("attention", name, "kernel"), (n, d)))
        for name, n in heads
    ]
    rules.append(Rule(p + "self_attn.o_proj.weight", (e, h * d), _linear_in(("attention", "dense", "kernel"), (h, d))))
    if c.qkv_bias:
        rules += [
            Rule(p + f"self_attn.{name[0]}_proj.bias", (n * d,), _reshaped(("attention", name, "bias"), (n, d)))
            for name, n in heads
        ]
    if c.attention_dense_bias:
        rules.append(Rule(p + "self_attn.o_proj.bias", (e,), _leaf("attention", "dense", "bias")))
    return rules


def _reshaped(path: Path, shape: tuple[int, ...]):
    return lambda w: {path: w.reshape(shape)}


def hf_glm_rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) of transformers' GlmForCausalLM for config `c`."""
    if c.norm_kind != "rmsnorm" or c.norm_placement != "pre" or c.ffn_kind != "swiglu":
        raise ConversionError(
            "GlmForCausalLM is a pre-RMSNorm SwiGLU model; build the config with config_from_hf_glm(hf_config)"
        )
    e, f = c.hidden_size, c.inner_hidden_size
    p = "model.layers.{i}."
    layer = [
        Rule(p + "input_layernorm.weight", (e,), _leaf("input_layernorm", "scale")),
        *_self_attn_rules(p, c),
        Rule(p + "post_attention_layernorm.weight", (e,), _leaf("post_attention_layernorm", "scale")),
        Rule(p + "mlp.gate_up_proj.weight", (2 * f, e), _halves(("mlp", "dense_h_to_4h", "kernel"), f)),
        Rule(p + "mlp.down_proj.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
    ]
    top = [
        _embedding_rule("model.embed_tokens.weight", c),
        Rule("model.norm.weight", (e,), _leaf("final_layernorm", "scale")),
    ]
    if not c.tie_word_embeddings:
        top.append(_output_layer_rule("lm_head.weight", c))
    return layer, top


def chatglm2_rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) of ChatGLM2-6B / ChatGLM3-6B's released names."""
    if c.norm_kind != "rmsnorm" or c.norm_placement != "pre" or c.ffn_kind != "swiglu" or c.tie_word_embeddings:
        raise ConversionError(
            "ChatGLM2/3 are pre-RMSNorm SwiGLU models with an output layer; build the config "
            "with config_from_chatglm2(config_json)"
        )
    e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim, c.inner_hidden_size
    p = "transformer.encoder.layers.{i}."
    splits = np.cumsum([h * d, kv * d])

    def qkv(suffix):
        def convert(w):
            q, k, v = np.split(w, splits, axis=0)  # [all q | k groups | v groups] (docs/reference.md section 2)
            shape = (lambda n: (n, d)) if w.ndim == 1 else (lambda n: (n, d, w.shape[1]))  # inputs: E, or a LoRA B's r
            out = [x.reshape(shape(n)) for x, n in ((q, h), (k, kv), (v, kv))]
            out = out if w.ndim == 1 else [x.transpose(2, 0, 1) for x in out]
            return {("attention", name, suffix): x for name, x in zip(("query", "key", "value"), out)}

        return convert

    layer = [
        Rule(p + "input_layernorm.weight", (e,), _leaf("input_layernorm", "scale")),
        Rule(p + "self_attention.query_key_value.weight", ((h + 2 * kv) * d, e), qkv("kernel")),
        Rule(p + "self_attention.dense.weight", (e, h * d), _linear_in(("attention", "dense", "kernel"), (h, d))),
        Rule(p + "post_attention_layernorm.weight", (e,), _leaf("post_attention_layernorm", "scale")),
        Rule(p + "mlp.dense_h_to_4h.weight", (2 * f, e), _halves(("mlp", "dense_h_to_4h", "kernel"), f)),
        Rule(p + "mlp.dense_4h_to_h.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
    ]
    if c.qkv_bias:
        layer.append(Rule(p + "self_attention.query_key_value.bias", ((h + 2 * kv) * d,), qkv("bias")))
    if c.attention_dense_bias or c.ffn_bias:
        raise ConversionError("ChatGLM2/3 checkpoints have no dense / FFN biases (add_bias_linear false)")
    top = [
        _embedding_rule("transformer.embedding.word_embeddings.weight", c),
        Rule("transformer.encoder.final_layernorm.weight", (e,), _leaf("final_layernorm", "scale")),
        _output_layer_rule("transformer.output_layer.weight", c),
    ]
    return layer, top


def config_from_chatglm(cfg: Mapping[str, Any], **overrides) -> GLMConfig:
    """Our GLMConfig for ChatGLM-6B's config.json (sizes from it; the residual alpha stays
    sqrt(2 x 28) and the rotary frequencies fp16-rounded, as its code does)."""
    fields = dict(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        vocab_pad_multiple=1,
        inner_hidden_size=cfg.get("inner_hidden_size") or 4 * cfg["hidden_size"],
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        max_sequence_length=cfg.get("max_sequence_length", 2048),
        position_encoding_2d=cfg.get("position_encoding_2d", True),
    )
    return get_config("chatglm-6b", **{**fields, **overrides})


def config_from_chatglm2(cfg: Mapping[str, Any], **overrides) -> GLMConfig:
    """Our GLMConfig for ChatGLM2-6B / ChatGLM3-6B's config.json (`rope_ratio` scales the base)."""
    if (
        not cfg.get("rmsnorm", True)
        or cfg.get("apply_residual_connection_post_layernorm", False)
        or not cfg.get("post_layer_norm", True)
    ):
        raise ConversionError(
            "only ChatGLM2/3's released block is supported: rmsnorm true, post_layer_norm true, "
            "apply_residual_connection_post_layernorm false"
        )
    heads = cfg["num_attention_heads"]
    fields = dict(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_kv_heads=cfg["multi_query_group_num"] if cfg.get("multi_query_attention", True) else heads,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        vocab_size=cfg["padded_vocab_size"],
        vocab_pad_multiple=1,
        inner_hidden_size=cfg["ffn_hidden_size"],
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        max_sequence_length=cfg.get("seq_length", 32768),
        rotary_base=10000.0 * float(cfg.get("rope_ratio", 1.0)),
        qkv_bias=cfg.get("add_qkv_bias", True),
    )
    if cfg.get("add_bias_linear", False):
        raise ConversionError("ChatGLM2/3 configs with add_bias_linear true are not a released layout")
    return get_config("chatglm2-6b", **{**fields, **overrides})


def config_from_hf_glm(hf_config: Mapping[str, Any] | Any, **overrides) -> GLMConfig:
    """Our GLMConfig for a GlmForCausalLM checkpoint config (dict or transformers config).

    Sizes, eps and the partial-rotary fraction come from the checkpoint, never from the family.
    """
    g = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    rope = g.get("rope_parameters") or {}
    fields = dict(
        num_layers=g["num_hidden_layers"],
        hidden_size=g["hidden_size"],
        num_attention_heads=g["num_attention_heads"],
        num_kv_heads=g.get("num_key_value_heads") or g["num_attention_heads"],
        head_dim=g.get("head_dim") or g["hidden_size"] // g["num_attention_heads"],
        vocab_size=g["vocab_size"],
        vocab_pad_multiple=1,
        max_sequence_length=g.get("max_position_embeddings", 2048),
        inner_hidden_size=g["intermediate_size"],
        ffn_kind="swiglu",
        norm_kind="rmsnorm",
        norm_placement="pre",
        layernorm_epsilon=g.get("rms_norm_eps", 1.5625e-07),
        rotary_fraction=rope.get("partial_rotary_factor", g.get("partial_rotary_factor", 0.5)),
        rotary_interleaved=True,
        rotary_base=rope.get("rope_theta", g.get("rope_theta", 10000.0)),
        qkv_bias=g.get("attention_bias", True),
        attention_dense_bias=False,
        ffn_bias=False,
        tie_word_embeddings=g.get("tie_word_embeddings", False),
        embedding_shrink_alpha=1.0,
        hidden_dropout=0.0,
        attention_dropout=float(g.get("attention_dropout", 0.0)),
    )
    if g.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"GlmForCausalLM with hidden_act={g['hidden_act']!r} is not supported (silu only)")
    return get_config("chatglm2-6b", **{**fields, **overrides})


IGNORED_SUFFIXES = ("inv_freq", "rotary_emb.inv_freq", "masked_bias", "attn.bias")


def convert_state_dict(tensors: Mapping[str, Any], config: GLMConfig, rules: tuple[list[Rule], list[Rule]]) -> dict:
    """Apply a layout's rules: check every name and shape first, then build the stacked tree.

    `tensors` may be lazy (a `released.ShardedTensors`): each source tensor is read, converted and
    written into its preallocated [layers, ...] slot one at a time, so the host holds one copy of
    the model (in config.param_dtype) plus one tensor, never two copies."""
    layer_rules, top_rules = rules
    wanted = {r.source: r for r in top_rules}
    for i in range(config.num_layers):
        wanted.update({r.source.format(i=i): r for r in layer_rules})
    shape_of = getattr(tensors, "shape_of", lambda n: tuple(tensors[n].shape))
    where = getattr(tensors, "where", lambda n: "")
    problems = []
    for name, rule in wanted.items():
        if name not in tensors:
            problems.append(f"missing {name} (expected shape {rule.shape})")
        elif tuple(shape_of(name)) != rule.shape:
            problems.append(f"{name}{where(name)} has shape {tuple(shape_of(name))}, expected {rule.shape}")
    tied_head = config.tie_word_embeddings and "lm_head.weight" in tensors
    extra = [
        n
        for n in tensors
        if n not in wanted and not n.endswith(IGNORED_SUFFIXES) and not (tied_head and n == "lm_head.weight")
    ]
    problems += [f"unexpected tensor {n}{where(n)} (shape {tuple(shape_of(n))})" for n in sorted(extra)]
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) converting to this config:\n  " + "\n  ".join(problems))

    params: dict = {}
    dtype = np.dtype(config.params_dtype)
    producers = {r.source: (r, None) for r in top_rules}
    producers.update({r.source.format(i=i): (r, i) for i in range(config.num_layers) for r in layer_rules})
    order = getattr(tensors, "read_order", lambda: list(tensors))()  # file by file for sharded folders
    stacked: dict[Path, np.ndarray] = {}
    for name in (n for n in order if n in producers):
        rule, i = producers[name]
        for path, arr in rule.convert(_to_numpy(tensors[name])).items():
            part = arr if isinstance(arr, Part) else Part(arr.shape, (), arr)
            full = path if i is None else ("layers",) + path
            if full not in stacked:
                stacked[full] = np.empty(part.shape if i is None else (config.num_layers,) + part.shape, dtype)
                _set(params, full, stacked[full])
            (stacked[full] if i is None else stacked[full][i])[part.index] = part.value
    return params


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_glm130b_state_dict(tensors: Mapping[str, Any], config: GLMConfig) -> dict:
    """GLM-130B reference layout (one merged TP shard, torch [out, in] weights) -> params."""
    return convert_state_dict(tensors, config, glm130b_rules(config))


def from_chatglm_state_dict(tensors: Mapping[str, Any], config: GLMConfig) -> dict:
    """ChatGLM-6B's released state dict (name -> array) -> params (config from `config_from_chatglm`)."""
    if config.tie_word_embeddings:
        raise ConversionError("ChatGLM-6B has a separate lm_head: the config must have tie_word_embeddings false")
    return convert_state_dict(tensors, config, glm130b_rules(config))


def from_chatglm2_state_dict(tensors: Mapping[str, Any], config: GLMConfig) -> dict:
    """ChatGLM2-6B / ChatGLM3-6B's released state dict -> params (config from `config_from_chatglm2`)."""
    return convert_state_dict(tensors, config, chatglm2_rules(config))


def from_hf_glm(tensors: Mapping[str, Any], config: GLMConfig) -> dict:
    """transformers GlmForCausalLM state dict -> params (config from `config_from_hf_glm`)."""
    return convert_state_dict(tensors, config, hf_glm_rules(config))


# ---- GLM-130B's quantized tensor-parallel checkpoints ---------------------------------------------------
# Each rank's file holds its slice of every weight. The four layer linears are quantized per rank,
# after the split: int8 values (INT4: two per byte, even input index in the high nibble) and an fp16
# `weight_scale` per output row of the rank's slice. Column-parallel tensors split their output rows,
# row-parallel ones (attention.dense, 4h->h) their inputs, the GeGLU h->4h each of its two halves.
ROW_PARALLEL = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
COLUMN_PARALLEL = ("attention.query_key_value.weight", "mlp.dense_h_to_4h.weight")
QUANTIZED = COLUMN_PARALLEL + ROW_PARALLEL
GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.weight_scale", "mlp.dense_h_to_4h.bias")
REPLICATED = ("layernorm.weight", "layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias", "inv_freq")
ROW_PARALLEL_SCALES = tuple(w + "_scale" for w in ROW_PARALLEL)
COLUMN_PARALLEL_SCALES = tuple(w + "_scale" for w in COLUMN_PARALLEL)


class MergedRanks(Mapping):
    """Tensor-parallel ranks as one state dict of the merged layout, merged per tensor on access
    (so a converter never holds a merged copy of the whole model). Packed weights are merged as
    bytes; `weight_scale` becomes [tp, out] for row-parallel weights (one scale per row per rank:
    tp groups along the input) and [1, out] for column-parallel ones. `pop` takes a tensor out."""

    def __init__(self, ranks: Sequence[Mapping[str, Any]]):
        self.ranks, self.tp = ranks, len(ranks)
        self.names = list(ranks[0])

    def _how(self, key: str) -> str:
        if key.endswith(REPLICATED):
            return "first"
        if key.endswith(ROW_PARALLEL_SCALES):
            return "stack"
        if key.endswith(ROW_PARALLEL):
            return "inputs"
        if key.endswith(GLU) and self.tp > 1:
            return "halves"
        return "outputs"

    def shape_of(self, key: str) -> tuple[int, ...]:
        shapes = [tuple(r[key].shape) for r in self.ranks]
        how, first = self._how(key), shapes[0]
        if how == "first":
            shape = first
        elif how == "stack":
            shape = (self.tp,) + first
        elif how == "inputs":
            shape = first[:1] + (sum(x[1] for x in shapes),) + first[2:]
        else:
            shape = (sum(x[0] for x in shapes),) + first[1:]
        return (1,) + shape if key.endswith(COLUMN_PARALLEL_SCALES) else shape

    def __getitem__(self, key: str) -> np.ndarray:
        parts = [_raw(r[key]) for r in self.ranks]
        how = self._how(key)
        if how == "first":
            out = parts[0]
        elif how == "stack":
            out = np.stack(parts)
        elif how == "inputs":
            out = np.concatenate(parts, axis=1)
        elif how == "halves":
            halves = [np.split(x, 2, axis=0) for x in parts]
            out = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out = np.concatenate(parts)
        return out[None] if key.endswith(COLUMN_PARALLEL_SCALES) else out

    def pop(self, key: str, default=None):
        if key not in self.names:
            return default
        out = self[key]
        self.names.remove(key)
        return out

    def __contains__(self, key) -> bool:
        return key in self.names

    def __iter__(self):
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)


def merge_glm130b_ranks(ranks: Sequence[Mapping[str, Any]]) -> MergedRanks:
    """Tensor-parallel ranks -> the merged layout's state dict (lazy: `MergedRanks`)."""
    return MergedRanks(ranks)


def _quantized_leaf(c: GLMConfig, name: str, packed: np.ndarray, scale: np.ndarray) -> dict[Path, np.ndarray]:
    """A merged torch-layout [out, in(/2)] weight and its [G, out] scales -> our q and scale leaves."""
    h, d, f, e = c.num_attention_heads, c.head_dim, c.inner_hidden_size, c.hidden_size
    q = packed.view(np.uint8) if c.quantization == "int4" else packed.view(np.int8)
    if name == "attention.query_key_value.weight":
        q = q.reshape(h, 3, d, -1).transpose(3, 0, 1, 2)  # [in, H, 3, D]: the fused per-head order
        scale = scale.reshape(-1, h, 3, d)
        return {
            ("attention", n, leaf): x[:, :, j]
            for j, n in enumerate(("query", "key", "value"))
            for leaf, x in (("q", q), ("scale", scale))
        }
    if name == "mlp.dense_h_to_4h.weight" and c.gated_ffn:
        return {
            ("mlp", "dense_h_to_4h", "q"): q.reshape(2, f, -1).transpose(2, 0, 1),
            ("mlp", "dense_h_to_4h", "scale"): scale.reshape(-1, 2, f),
        }
    path = {
        "attention.dense.weight": ("attention", "dense"),
        "mlp.dense_h_to_4h.weight": ("mlp", "dense_h_to_4h"),
        "mlp.dense_4h_to_h.weight": ("mlp", "dense_4h_to_h"),
    }[name]
    out = (e,) if path != ("mlp", "dense_h_to_4h") else (f,)
    return {path + ("q",): q.T.reshape((q.shape[1],) + out), path + ("scale",): scale.reshape((-1,) + out)}


def from_glm130b_quantized(ranks: Sequence[Mapping[str, Any]], config: GLMConfig) -> dict:
    """GLM-130B's INT4/INT8 tensor-parallel checkpoint (a list of per-rank state dicts, rank
    order) -> params for `config` (quantization int4/int8, quantization_groups = the number of
    ranks). Packed bytes and fp16 scales are kept as they are; everything else converts as in
    `from_glm130b_state_dict` (to config.param_dtype)."""
    c = config
    tp = len(ranks)
    if c.quantization not in ("int4", "int8"):
        raise ConversionError(f"a quantized checkpoint needs quantization=int4 or int8, not {c.quantization!r}")
    if tp > 1 and c.quantization_groups != tp:
        raise ConversionError(
            f"this checkpoint has {tp} tensor-parallel ranks, whose row-parallel weights carry "
            f"one scale per row per rank: set quantization_groups={tp}"
        )
    merged = merge_glm130b_ranks(ranks)
    layer_rules, top_rules = glm130b_rules(c)
    quantized = {
        r.source: r for r in layer_rules if r.source.endswith(".weight") and r.source.split("{i}.")[1] in QUANTIZED
    }
    per_in = 2 if c.quantization == "int4" else 1
    problems, layers = [], []
    for i in range(c.num_layers):
        leaves = {}
        for template, rule in quantized.items():
            name, key = template.split("{i}.")[1], template.format(i=i)
            out, k = rule.shape
            want = {key: ((out, k // per_in), "int8"), key + "_scale": ((c.scale_groups(k), out), "float16")}
            got = {n: merged.pop(n, None) for n in want}
            for n, (shape, dtype) in want.items():
                x = got[n]
                if x is None:
                    problems.append(f"missing {n} (expected {dtype} {shape})")
                elif x.shape != shape and not (n.endswith("_scale") and x.shape == (1, out)):
                    problems.append(f"{n} has shape {x.shape}, expected {shape}")
                elif x.dtype != np.dtype(dtype):
                    problems.append(f"{n} is {x.dtype}, expected {dtype}")
            if not problems:
                scale = np.broadcast_to(got[key + "_scale"], want[key + "_scale"][0])
                leaves.update(_quantized_leaf(c, name, got[key], np.ascontiguousarray(scale)))
        layers.append(leaves)
    if problems:
        raise ConversionError(
            f"{len(problems)} problem(s) loading this quantized checkpoint:\n  " + "\n  ".join(problems)
        )
    rest = [r for r in layer_rules if r.source not in quantized]
    params = convert_state_dict(merged, c, (rest, top_rules))
    for path in layers[0]:
        _set(params, ("layers",) + path, np.stack([leaves[path] for leaves in layers]))
    return params
