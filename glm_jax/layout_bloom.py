"""BLOOM (BigScience 2022) in transformers' `BloomForCausalLM` layout, both ways.

The block: word embeddings with a LayerNorm on them, pre-LN layers with ALiBi attention (no
position table), a fused query_key_value whose output rows are [heads, {q,k,v}, head_dim] (as
GLM-130B's), GeLU in its tanh form (`BloomGelu`), an FFN of 4 x hidden, biases everywhere and a
head tied to the embeddings (an lm_head of its own where tie_word_embeddings is false).
Canonical names are `save_pretrained`'s (`transformer.` + ...); bigscience's released files
(bloom, bloom-560m, bloomz) lack the `transformer.` prefix.

Read as transformers computes it: `pretraining_tp` alone changes nothing (bigscience/bloom says 4),
but with `slow_but_exact` true transformers splits the attention-output and dense_4h_to_h products
into per-rank partial sums and leaves out those two layers' biases, so that pair is refused, as is
`apply_residual_connection_post_layernorm` true (the residual taken after the LayerNorm).
BLOOM has no position limit: max_sequence_length is config.json's `seq_length` where present,
else 2048 (a default length only; ALiBi holds no table).
"""

from __future__ import annotations

import numpy as np

from glm_jax.config import GLMConfig, get_config
from glm_jax.convert import (
    ConversionError,
    Rule,
    _embedding_rule,
    _glm130b_qkv,
    _layernorm_rules,
    _leaf,
    _linear,
    _linear_in,
    _output_layer_rule,
)
from glm_jax.layout import ExportError, Layout, check_block, leaf_at

PREFIX = "transformer."
DEFAULT_LENGTH = 2048  # max_sequence_length when config.json has no seq_length


def matches(cfg: dict) -> bool:
    return cfg.get("model_type") == "bloom"


def family_of(cfg: dict) -> str:
    """BELLE's BLOOMZ fine-tunes (BelleGroup/BELLE-7B-*) read as "belle", any other BLOOM as "bloom"."""
    return "belle" if "belle" in str(cfg.get("_name_or_path", "")).lower() else "bloom"


def _field(cfg: dict, *names: str):
    """The first of `names` (BloomConfig's spelling, then its aliases) config.json has."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    raise KeyError(names[0])


def config_from(cfg: dict, **overrides) -> GLMConfig:
    """Our GLMConfig for a BloomForCausalLM config.json; overrides (dtype, --set fields) win."""
    if cfg.get("apply_residual_connection_post_layernorm", False):
        raise ConversionError(
            "apply_residual_connection_post_layernorm=true (the residual taken after each LayerNorm) is "
            "not BLOOM's released block and is not supported; only false converts"
        )
    if cfg.get("slow_but_exact", False) and cfg.get("pretraining_tp", 1) > 1:
        raise ConversionError(
            f"slow_but_exact=true with pretraining_tp={cfg['pretraining_tp']}: transformers then computes the "
            "attention output and dense_4h_to_h without their biases; set slow_but_exact false (the released "
            "configs' value) to convert the model as trained"
        )
    hidden, heads = _field(cfg, "hidden_size", "n_embed"), _field(cfg, "n_head", "num_attention_heads")
    if hidden % heads:
        raise ConversionError(f"hidden_size={hidden} is not divisible by n_head={heads}")
    fields = dict(
        num_layers=_field(cfg, "n_layer", "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=cfg["vocab_size"],
        vocab_pad_multiple=1,
        inner_hidden_size=4 * hidden,
        layernorm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
        max_sequence_length=cfg.get("seq_length") or DEFAULT_LENGTH,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        hidden_dropout=float(cfg.get("hidden_dropout", 0.0)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
    )
    return get_config("bloom-560m", **{**fields, **overrides})


def _check_block(c: GLMConfig, error=ConversionError) -> None:
    """BLOOM's block or `error` naming every field that differs."""
    want = dict(
        norm_kind="layernorm",
        norm_placement="pre",
        ffn_kind="gelu_tanh",
        position_encoding="alibi",
        position_encoding_2d=False,
        embedding_norm=True,
        qkv_bias=True,
        attention_dense_bias=True,
        ffn_bias=True,
        final_norm=True,
        num_kv_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        inner_hidden_size=4 * c.hidden_size,
    )
    check_block(c, want, error, "BLOOM's block")


def rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) under save_pretrained's names."""
    _check_block(c)
    e, h, d, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size
    p = PREFIX + "h.{i}."
    layer = [
        *_layernorm_rules(p + "input_layernorm", ("input_layernorm",), e),
        Rule(p + "self_attention.query_key_value.weight", (3 * e, e), _glm130b_qkv(c, "kernel")),
        Rule(p + "self_attention.query_key_value.bias", (3 * e,), _glm130b_qkv(c, "bias")),
        Rule(p + "self_attention.dense.weight", (e, e), _linear_in(("attention", "dense", "kernel"), (h, d))),
        Rule(p + "self_attention.dense.bias", (e,), _leaf("attention", "dense", "bias")),
        *_layernorm_rules(p + "post_attention_layernorm", ("post_attention_layernorm",), e),
        Rule(p + "mlp.dense_h_to_4h.weight", (f, e), _linear(("mlp", "dense_h_to_4h", "kernel"), (f,))),
        Rule(p + "mlp.dense_h_to_4h.bias", (f,), _leaf("mlp", "dense_h_to_4h", "bias")),
        Rule(p + "mlp.dense_4h_to_h.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
        Rule(p + "mlp.dense_4h_to_h.bias", (e,), _leaf("mlp", "dense_4h_to_h", "bias")),
    ]
    top = [
        _embedding_rule(PREFIX + "word_embeddings.weight", c),
        *_layernorm_rules(PREFIX + "word_embeddings_layernorm", ("embedding_layernorm",), e),
        *_layernorm_rules(PREFIX + "ln_f", ("final_layernorm",), e),
    ]
    if not c.tie_word_embeddings:
        top.append(_output_layer_rule("lm_head.weight", c))
    return layer, top


def canonical(name: str) -> str:
    """bigscience's released names (`h.0...`, `word_embeddings.weight`, `ln_f.*`) -> `transformer.` + name."""
    return name if name.startswith((PREFIX, "lm_head.")) else PREFIX + name


def _layer_tensors(lay: dict, i: int, c: GLMConfig) -> dict[str, np.ndarray]:
    """Layer i of our stacked tree -> its torch [out, in] tensors (names after `h.{i}.`)."""
    at = lambda *path: np.asarray(leaf_at(lay, path)[i], np.float32)  # noqa: E731
    e = c.hidden_size
    att = ("query", "key", "value")
    qkv = np.stack([at("attention", n, "kernel") for n in att], axis=2)  # [E, H, 3, D]
    t = {
        "self_attention.query_key_value.weight": qkv.reshape(e, 3 * e).T,
        "self_attention.query_key_value.bias": np.stack([at("attention", n, "bias") for n in att], axis=1).reshape(-1),
        "self_attention.dense.weight": at("attention", "dense", "kernel").reshape(e, e).T,
        "self_attention.dense.bias": at("attention", "dense", "bias"),
        "mlp.dense_h_to_4h.weight": at("mlp", "dense_h_to_4h", "kernel").T,
        "mlp.dense_h_to_4h.bias": at("mlp", "dense_h_to_4h", "bias"),
        "mlp.dense_4h_to_h.weight": at("mlp", "dense_4h_to_h", "kernel").T,
        "mlp.dense_4h_to_h.bias": at("mlp", "dense_4h_to_h", "bias"),
    }
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t.update({f"{norm}.weight": at(norm, "scale"), f"{norm}.bias": at(norm, "bias")})
    return t


def export(params: dict, config: GLMConfig, np_dtype, special_ids) -> tuple[dict[str, np.ndarray], dict]:
    """Float params -> ({save_pretrained name: array}, config.json) that BloomForCausalLM loads."""
    c = config
    _check_block(c, ExportError)
    v = c.vocab_size
    tensors = {}
    for i in range(c.num_layers):
        tensors.update({f"{PREFIX}h.{i}.{n}": x for n, x in _layer_tensors(params["layers"], i, c).items()})
    tensors[PREFIX + "word_embeddings.weight"] = np.asarray(params["word_embeddings"]["embedding"])[:v]
    for ours, theirs in (("embedding_layernorm", "word_embeddings_layernorm"), ("final_layernorm", "ln_f")):
        tensors[f"{PREFIX}{theirs}.weight"] = np.asarray(params[ours]["scale"])
        tensors[f"{PREFIX}{theirs}.bias"] = np.asarray(params[ours]["bias"])
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["output_layer"]["kernel"])[:, :v].T
    cfg = {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": v,
        "hidden_size": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_attention_heads,
        "layer_norm_epsilon": c.layernorm_epsilon,
        "apply_residual_connection_post_layernorm": False,
        "hidden_dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "seq_length": c.max_sequence_length,
        "tie_word_embeddings": c.tie_word_embeddings,
        "dtype": np.dtype(np_dtype).name,
        "pad_token_id": None if special_ids is None else special_ids.pad,
        "eos_token_id": None if special_ids is None else special_ids.eos,
    }
    return tensors, cfg


LAYOUT = Layout(
    name="bloom",
    families=("bloom", "belle"),
    matches=matches,
    config_from=config_from,
    rules=rules,
    canonical=canonical,
    export=export,
    family_of=family_of,
)
