"""transformers' `LlamaForCausalLM` layout (LLaMA-1/2/3, Llama-3.1/3.2, Alpaca, BELLE-LLaMA).

The block is pre-RMSNorm, SwiGLU (gate_proj is our kernel's index 0, the silu'd half; up_proj
index 1), rotate-half rotary over the whole head (transformers' default rope ignores
`partial_rotary_factor`), grouped KV heads; `attention_bias` puts biases on q, k, v and o,
`mlp_bias` on gate, up and down. Rope settings come from `rope_parameters` (transformers 5) or
`rope_theta` / `rope_scaling` (older files): types default, linear and llama3.

Canonical names are `LlamaForCausalLM.save_pretrained`'s (`model.layers.{i}...`, `lm_head.weight`);
a bare `LlamaModel` saves without `model.` (`layers.{i}...`, `embed_tokens.weight`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from glm_jax.config import GLMConfig, get_config
from glm_jax.convert import (
    ConversionError,
    Part,
    Rule,
    _embedding_rule,
    _leaf,
    _linear,
    _output_layer_rule,
    _self_attn_rules,
)
from glm_jax.layout import ExportError, Layout, check_block

ROPE_TYPES = ("default", "linear", "llama3")
# what every LLaMA block has: the layout's tensors and config.json cannot express anything else
BLOCK = dict(
    norm_kind="rmsnorm",
    norm_placement="pre",
    ffn_kind="swiglu",
    position_encoding="rotary",
    position_encoding_2d=False,
    embedding_norm=False,
    final_norm=True,
)
# and what transformers' LlamaForCausalLM computes (export must match its logits)
EXPORT = dict(
    BLOCK,
    rotary_interleaved=False,
    rotary_fraction=1.0,
    rotary_fp16_inv_freq=False,
    rotary_fp16_angles=False,
)


def matches(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "llama"


def family_of(cfg: Mapping[str, Any]) -> str:
    """The instruction recipe a folder's `_name_or_path` names (alpaca, belle), else llama."""
    name = str(cfg.get("_name_or_path", "")).lower()
    return next((f for f in ("alpaca", "belle") if f in name), "llama")


def canonical(name: str) -> str:
    """A bare LlamaModel's names (`layers.0...`, `embed_tokens.weight`) get `model.`."""
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


# ---- config.json -> GLMConfig ---------------------------------------------------------------------
def rope_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The rope dict transformers builds from a config.json: `rope_scaling` (older files) or
    `rope_parameters` (transformers 5), with `rope_theta` / `partial_rotary_factor` filled from
    beside it and `rope_type` from the old `type`."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if cfg.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return rope


def _rotary_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    rope = rope_settings(cfg)
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ConversionError(
            f"rope_scaling / rope_parameters rope_type={kind!r} is not supported; LLaMA folders convert with "
            f"rope types {ROPE_TYPES}"
        )
    if kind != "default" and float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(
            f"partial_rotary_factor={rope['partial_rotary_factor']} with rope_type={kind!r}: LlamaForCausalLM "
            "rotates whole heads (transformers cannot run this config either)"
        )
    fields = dict(rotary_base=float(rope["rope_theta"]), rotary_fraction=1.0, rotary_interleaved=False)
    if kind == "default":
        return dict(fields, rotary_scaling="none")
    if "factor" not in rope:
        raise ConversionError(f"rope_type={kind!r} without its `factor`")
    fields.update(rotary_scaling=kind, rotary_scaling_factor=float(rope["factor"]))
    if kind == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in rope]
        if missing:
            raise ConversionError(f"rope_type='llama3' without {', '.join(missing)}")
        fields.update(
            rotary_low_freq_factor=float(rope["low_freq_factor"]),
            rotary_high_freq_factor=float(rope["high_freq_factor"]),
            rotary_original_length=int(
                rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)
            ),
        )
    return fields


def config_from(cfg: Mapping[str, Any], **overrides) -> GLMConfig:
    """Our GLMConfig for a LLaMA config.json (sizes, eps, rope and biases from it)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={cfg['hidden_act']!r}: LLaMA folders convert with silu (SwiGLU) only")
    heads = cfg["num_attention_heads"]
    attention_bias = bool(cfg.get("attention_bias", False))
    fields = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        vocab_pad_multiple=1,
        inner_hidden_size=cfg["intermediate_size"],
        max_sequence_length=cfg.get("max_position_embeddings", 2048),
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=attention_bias,
        attention_dense_bias=attention_bias,
        ffn_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
        hidden_dropout=0.0,
        embedding_shrink_alpha=1.0,
        **_rotary_fields(cfg),
    )
    return get_config("llama-2-7b", **{**fields, **overrides})


# ---- tensors ---------------------------------------------------------------------------------------
def _gate_half(index: int, f: int, leaf: str):
    """gate_proj (index 0) or up_proj (index 1): torch [F, E] -> that half of our kernel [E, 2, F];
    a bias [F] -> that half of our [2, F]."""
    path = ("mlp", "dense_h_to_4h", leaf)

    def convert(w):
        if w.ndim == 2:
            return {path: Part((w.shape[1], 2, f), (slice(None), index), w.T)}
        return {path: Part((2, f), (index,), w)}

    return convert


def rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) of LlamaForCausalLM for config `c` (from `config_from`)."""
    check_block(c, BLOCK, ConversionError, "a LLaMA block")
    e, f = c.hidden_size, c.inner_hidden_size
    p = "model.layers.{i}."
    layer = [
        Rule(p + "input_layernorm.weight", (e,), _leaf("input_layernorm", "scale")),
        *_self_attn_rules(p, c),
        Rule(p + "post_attention_layernorm.weight", (e,), _leaf("post_attention_layernorm", "scale")),
        Rule(p + "mlp.gate_proj.weight", (f, e), _gate_half(0, f, "kernel")),
        Rule(p + "mlp.up_proj.weight", (f, e), _gate_half(1, f, "kernel")),
        Rule(p + "mlp.down_proj.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
    ]
    if c.ffn_bias:
        layer += [
            Rule(p + "mlp.gate_proj.bias", (f,), _gate_half(0, f, "bias")),
            Rule(p + "mlp.up_proj.bias", (f,), _gate_half(1, f, "bias")),
            Rule(p + "mlp.down_proj.bias", (e,), _leaf("mlp", "dense_4h_to_h", "bias")),
        ]
    top = [
        _embedding_rule("model.embed_tokens.weight", c),
        Rule("model.norm.weight", (e,), _leaf("final_layernorm", "scale")),
    ]
    if not c.tie_word_embeddings:
        top.append(_output_layer_rule("lm_head.weight", c))
    return layer, top


# ---- GLMConfig + params -> LlamaForCausalLM --------------------------------------------------------
def _layer_tensors(params: dict, c: GLMConfig, i: int) -> dict[str, np.ndarray]:
    """Layer i's torch-layout tensors ([out, in] weights) under their names after `model.layers.{i}.`."""
    lay = params["layers"]
    att, mlp = lay["attention"], lay["mlp"]
    e = c.hidden_size
    get = lambda tree, leaf: np.asarray(tree[leaf][i])
    gate_up = get(mlp["dense_h_to_4h"], "kernel")  # [E, 2, F]
    t = {
        "input_layernorm.weight": get(lay["input_layernorm"], "scale"),
        "post_attention_layernorm.weight": get(lay["post_attention_layernorm"], "scale"),
        **{f"self_attn.{n[0]}_proj.weight": get(att[n], "kernel").reshape(e, -1).T for n in ("query", "key", "value")},
        "self_attn.o_proj.weight": get(att["dense"], "kernel").reshape(-1, e).T,
        "mlp.gate_proj.weight": gate_up[:, 0].T,
        "mlp.up_proj.weight": gate_up[:, 1].T,
        "mlp.down_proj.weight": get(mlp["dense_4h_to_h"], "kernel").T,
    }
    if c.qkv_bias:
        t.update({f"self_attn.{n[0]}_proj.bias": get(att[n], "bias").reshape(-1) for n in ("query", "key", "value")})
        t["self_attn.o_proj.bias"] = get(att["dense"], "bias")
    if c.ffn_bias:
        gate_up_bias = get(mlp["dense_h_to_4h"], "bias")  # [2, F]
        t.update(
            {
                "mlp.gate_proj.bias": gate_up_bias[0],
                "mlp.up_proj.bias": gate_up_bias[1],
                "mlp.down_proj.bias": get(mlp["dense_4h_to_h"], "bias"),
            }
        )
    return t


def _rope_json(c: GLMConfig) -> tuple[dict, dict | None]:
    """(rope_parameters as transformers 5 writes it, rope_scaling as older files have it or None)."""
    if c.rotary_scaling == "none":
        return {"rope_type": "default", "rope_theta": c.rotary_base}, None
    scaling = {"rope_type": c.rotary_scaling, "factor": c.rotary_scaling_factor}
    if c.rotary_scaling == "llama3":
        scaling.update(
            low_freq_factor=c.rotary_low_freq_factor,
            high_freq_factor=c.rotary_high_freq_factor,
            original_max_position_embeddings=c.rotary_original_length,
        )
    return {**scaling, "rope_theta": c.rotary_base}, scaling


def export(params: dict, c: GLMConfig, np_dtype, special_ids=None) -> tuple[dict[str, np.ndarray], dict]:
    """Float params (layers stacked [L, ...]) -> ({LlamaForCausalLM name: array}, config.json);
    bos / eos / pad ids from the tokenizer's `SpecialIds` when given, else null."""
    check_block(c, EXPORT, ExportError, "a LLaMA block")
    if c.qkv_bias != c.attention_dense_bias:
        raise ExportError(
            f"qkv_bias={c.qkv_bias} but attention_dense_bias={c.attention_dense_bias}: LLaMA's attention_bias "
            "puts biases on q, k, v and o together"
        )
    v = c.vocab_size
    tensors = {
        f"model.layers.{i}.{name}": x for i in range(c.num_layers) for name, x in _layer_tensors(params, c, i).items()
    }
    tensors["model.embed_tokens.weight"] = np.asarray(params["word_embeddings"]["embedding"])[:v]
    tensors["model.norm.weight"] = np.asarray(params["final_layernorm"]["scale"])
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["output_layer"]["kernel"])[:, :v].T
    rope_parameters, rope_scaling = _rope_json(c)
    # an HF tokenizer without GLM's blank tokens gives its bos as sop (tokenizer.HFTokenizer)
    special = lambda name: None if special_ids is None else getattr(special_ids, name)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.inner_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_sequence_length,
        "rms_norm_eps": c.layernorm_epsilon,
        "attention_bias": c.qkv_bias,
        "mlp_bias": c.ffn_bias,
        "attention_dropout": c.attention_dropout,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_parameters": rope_parameters,
        "rope_theta": c.rotary_base,
        "rope_scaling": rope_scaling,
        "bos_token_id": special("sop"),
        "eos_token_id": special("eos"),
        "pad_token_id": special("pad"),
        "dtype": np.dtype(np_dtype).name,
    }
    return {n: np.ascontiguousarray(x, np_dtype) for n, x in tensors.items()}, cfg


LAYOUT = Layout(
    name="llama",
    families=("llama", "alpaca", "belle"),
    matches=matches,
    config_from=config_from,
    rules=rules,
    canonical=canonical,
    export=export,
    family_of=family_of,
)
