"""OPT (Zhang et al. 2022) in transformers' `OPTForCausalLM` layout, both ways.

The block: word embeddings plus a learned position table whose row for position p is p + 2
(`OPTLearnedPositionalEmbedding`'s offset; the table has max_position_embeddings + 2 rows), pre-LN
layers (LayerNorm eps 1e-5, torch's default: OPT's config has no field for it) with separate
q/k/v/out projections, a ReLU FFN of `ffn_dim`, biases on every linear (`enable_bias`), a final
LayerNorm (none with `_remove_final_layer_norm`) and a head tied to the embeddings unless
`tie_word_embeddings` is false. Canonical names are `save_pretrained`'s (`model.decoder...`);
facebook's released files name `decoder...`.

Refused, naming the field: OPT-350m's post-LN block (`do_layer_norm_before` false) and its
projected embeddings (`word_embed_proj_dim` != hidden_size: project_in / project_out), an
activation other than relu, and LayerNorms without parameters (`layer_norm_elementwise_affine`
false).
"""

from __future__ import annotations

import numpy as np

from glm_jax.config import GLMConfig, get_config
from glm_jax.convert import (
    ConversionError,
    Rule,
    _embedding_rule,
    _layernorm_rules,
    _leaf,
    _linear,
    _linear_in,
    _output_layer_rule,
    _reshaped,
)
from glm_jax.layout import ExportError, Layout, check_block, leaf_at

PREFIX = "model.decoder."
OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
EPSILON = 1e-5  # nn.LayerNorm's default eps, which every OPT LayerNorm uses


def matches(cfg: dict) -> bool:
    return cfg.get("model_type") == "opt"


def _refuse(cfg: dict) -> None:
    hidden = cfg["hidden_size"]
    problems = []
    if not cfg.get("do_layer_norm_before", True):
        problems.append("do_layer_norm_before=false (OPT-350m's post-LN block)")
    if cfg.get("word_embed_proj_dim") not in (None, hidden):
        problems.append(
            f"word_embed_proj_dim={cfg['word_embed_proj_dim']} != hidden_size={hidden} "
            "(OPT-350m's project_in / project_out around the decoder)"
        )
    if cfg.get("activation_function", "relu") != "relu":
        problems.append(f"activation_function={cfg['activation_function']!r} (relu only)")
    if not cfg.get("layer_norm_elementwise_affine", True):
        problems.append("layer_norm_elementwise_affine=false (LayerNorms without weight and bias)")
    if hidden % cfg["num_attention_heads"]:
        problems.append(f"hidden_size={hidden} not divisible by num_attention_heads={cfg['num_attention_heads']}")
    if problems:
        raise ConversionError(
            "this OPT config is not a supported block (OPT-125m, 1.3b ... 175b are): " + "; ".join(problems)
        )


def config_from(cfg: dict, **overrides) -> GLMConfig:
    """Our GLMConfig for an OPTForCausalLM config.json; overrides (dtype, --set fields) win."""
    _refuse(cfg)
    bias = cfg.get("enable_bias", True)
    fields = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        vocab_pad_multiple=1,
        inner_hidden_size=cfg["ffn_dim"],
        max_sequence_length=cfg.get("max_position_embeddings", 2048),
        position_offset=OFFSET,
        layernorm_epsilon=EPSILON,
        final_norm=not cfg.get("_remove_final_layer_norm", False),
        qkv_bias=bias,
        attention_dense_bias=bias,
        ffn_bias=bias,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        hidden_dropout=float(cfg.get("dropout", 0.0)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
    )
    return get_config("opt-125m", **{**fields, **overrides})


def _check_block(c: GLMConfig, error=ConversionError) -> None:
    """OPT's block or `error` naming every field that differs."""
    want = dict(
        norm_kind="layernorm",
        norm_placement="pre",
        layernorm_epsilon=EPSILON,
        ffn_kind="relu",
        position_encoding="learned",
        position_encoding_2d=False,
        position_offset=OFFSET,
        learned_position_rows=c.max_sequence_length + OFFSET,
        embedding_norm=False,
        attention_dense_bias=c.qkv_bias,
        ffn_bias=c.qkv_bias,
        num_kv_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
    )
    check_block(c, want, error, "OPT's block (enable_bias sets all three biases)")


# (torch name after `layers.{i}.`, our leaf path, torch [out, in] <-> ours): the linear weights
def _linears(c: GLMConfig):
    e, h, d, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size
    qkv = [(f"self_attn.{n[0]}_proj", ("attention", n), (e, e), (h, d), "out") for n in ("query", "key", "value")]
    return qkv + [
        ("self_attn.out_proj", ("attention", "dense"), (e, e), (h, d), "in"),
        ("fc1", ("mlp", "dense_h_to_4h"), (f, e), (f,), "out"),
        ("fc2", ("mlp", "dense_4h_to_h"), (e, f), (e,), "out"),
    ]


NORMS = (("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "post_attention_layernorm"))


def rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) under save_pretrained's names."""
    _check_block(c)
    e = c.hidden_size
    p = PREFIX + "layers.{i}."
    layer = []
    for name, path, shape, split, side in _linears(c):
        kernel = path + ("kernel",)
        to_kernel = _linear(kernel, split) if side == "out" else _linear_in(kernel, split)
        layer.append(Rule(p + name + ".weight", shape, to_kernel))
        if c.qkv_bias:
            bias_shape = split if side == "out" else (e,)
            layer.append(Rule(p + name + ".bias", (shape[0],), _reshaped(path + ("bias",), bias_shape)))
    for theirs, ours in NORMS:
        layer += _layernorm_rules(p + theirs, (ours,), e)
    top = [
        _embedding_rule(PREFIX + "embed_tokens.weight", c),
        Rule(
            PREFIX + "embed_positions.weight", (c.learned_position_rows, e), _leaf("position_embeddings", "embedding")
        ),
    ]
    if c.final_norm:
        top += _layernorm_rules(PREFIX + "final_layer_norm", ("final_layernorm",), e)
    if not c.tie_word_embeddings:
        top.append(_output_layer_rule("lm_head.weight", c))
    return layer, top


def canonical(name: str) -> str:
    """facebook's released names (`decoder.layers.0...`) -> `model.` + name."""
    return "model." + name if name.startswith("decoder.") else name


def _layer_tensors(lay: dict, i: int, c: GLMConfig) -> dict[str, np.ndarray]:
    """Layer i of our stacked tree -> its torch [out, in] tensors (names after `layers.{i}.`)."""
    t = {}
    for name, path, shape, _, side in _linears(c):
        kernel = np.asarray(leaf_at(lay, path + ("kernel",))[i], np.float32)
        t[name + ".weight"] = (kernel.reshape(shape[1], -1) if side == "out" else kernel.reshape(-1, shape[0])).T
        if c.qkv_bias:
            t[name + ".bias"] = np.asarray(leaf_at(lay, path + ("bias",))[i], np.float32).reshape(-1)
    for theirs, ours in NORMS:
        t[theirs + ".weight"] = np.asarray(lay[ours]["scale"][i])
        t[theirs + ".bias"] = np.asarray(lay[ours]["bias"][i])
    return t


def export(params: dict, config: GLMConfig, np_dtype, special_ids) -> tuple[dict[str, np.ndarray], dict]:
    """Float params -> ({save_pretrained name: array}, config.json) that OPTForCausalLM loads."""
    c = config
    _check_block(c, ExportError)
    v = c.vocab_size
    tensors = {}
    for i in range(c.num_layers):
        tensors.update({f"{PREFIX}layers.{i}.{n}": x for n, x in _layer_tensors(params["layers"], i, c).items()})
    tensors[PREFIX + "embed_tokens.weight"] = np.asarray(params["word_embeddings"]["embedding"])[:v]
    tensors[PREFIX + "embed_positions.weight"] = np.asarray(params["position_embeddings"]["embedding"])
    if c.final_norm:
        tensors[PREFIX + "final_layer_norm.weight"] = np.asarray(params["final_layernorm"]["scale"])
        tensors[PREFIX + "final_layer_norm.bias"] = np.asarray(params["final_layernorm"]["bias"])
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["output_layer"]["kernel"])[:, :v].T
    cfg = {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": v,
        "hidden_size": c.hidden_size,
        "word_embed_proj_dim": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "ffn_dim": c.inner_hidden_size,
        "max_position_embeddings": c.max_sequence_length,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": not c.final_norm,
        "enable_bias": c.qkv_bias,
        "layer_norm_elementwise_affine": True,
        "dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "tie_word_embeddings": c.tie_word_embeddings,
        "dtype": np.dtype(np_dtype).name,
        "pad_token_id": None if special_ids is None else special_ids.pad,
        "eos_token_id": None if special_ids is None else special_ids.eos,
    }
    return tensors, cfg


LAYOUT = Layout(
    name="opt",
    families=("opt",),
    matches=matches,
    config_from=config_from,
    rules=rules,
    canonical=canonical,
    export=export,
    family_of=None,
)
