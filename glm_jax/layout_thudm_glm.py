"""The original GLM (Du et al. 2022; THUDM/GLM's GLMModel: GLM-Large, GLM-10B) as THUDM's
Hugging Face folders hold it (`model_type` "glm" with THUDM's `num_layers` /
`block_position_encoding` / `max_sequence_length`; transformers' GlmForCausalLM, with
`num_hidden_layers`, is the `hf-glm` layout instead).

The block (THUDM/GLM mpu/transformer.py, the Hub's remote `modeling_glm.py`): word embeddings plus
two learned tables, `position_embeddings` (row = position id) and `block_position_embeddings` (row =
block position id), each max_sequence_length + 1 rows; pre-LN layers (LayerNorm eps 1e-5) with a
fused `query_key_value` whose output rows are [all q | all k | all v], each head-major [H, D];
scores q.k / sqrt(D), masked by multiplying with the 0/1 mask and adding -65504 where it is 0
(our -10000 gives the same softmax); a 4E GeLU MLP; biases everywhere; a final LayerNorm; logits
against the word embeddings (tied).

Names: the Hub's `pytorch_model.bin` is THUDM's GLMModel state dict as its training checkpoint
holds it (`word_embeddings.weight`, `transformer.layers.{i}...`); `GLMForConditionalGeneration`
(base_model_prefix "glm") writes the same names under `glm.`. The `glm.` names are canonical;
`canonical` adds the prefix to the bare ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from glm_jax.config import GLMConfig, get_config
from glm_jax.convert import ConversionError, Rule, _embedding_rule, _layernorm_rules, _leaf, _linear, _linear_in
from glm_jax.layout import Layout

THUDM_FIELDS = ("num_layers", "block_position_encoding", "max_sequence_length")


def matches(cfg: Mapping[str, Any]) -> bool:
    """A THUDM GLMModel config.json: model_type glm with THUDM's own field names."""
    return (
        cfg.get("model_type") == "glm"
        and "num_hidden_layers" not in cfg
        and any(field in cfg for field in THUDM_FIELDS)
    )


def config_from(cfg: Mapping[str, Any], **overrides) -> GLMConfig:
    """Our GLMConfig for a THUDM GLM config.json (sizes from it, the block from the glm-10b preset).

    Refused: `block_position_encoding` false (the 1D-position GLMModel: a max_sequence_length-row
    table and no block table; no released checkpoint uses it) and `relative_encoding` true
    (Transformer-XL relative positions, only in THUDM's training code). `attention_scale` is
    accepted at any value: THUDM's rescaling (scores / a, minus the row max, times a) changes the
    softmax input by a per-row constant only, so the attention is the plain one."""
    if not cfg.get("block_position_encoding", True):
        raise ConversionError(
            "config.json has block_position_encoding false: only GLM's 2D positions (position and "
            "block-position tables, every released GLM checkpoint) are supported, not the rare "
            "1D-position variant"
        )
    if cfg.get("relative_encoding", False):
        raise ConversionError(
            "config.json has relative_encoding true: Transformer-XL relative positions are not "
            "supported; only GLM's learned position and block-position tables (relative_encoding false)"
        )
    max_len = cfg["max_sequence_length"]
    fields = dict(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        vocab_pad_multiple=1,
        max_sequence_length=max_len,
        position_embedding_rows=max_len + 1,  # GLMStack's tables with block_position_encoding
        inner_hidden_size=4 * cfg["hidden_size"],
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        tie_word_embeddings=True,  # the logits are always F.linear(h, word_embeddings.weight)
    )
    return get_config("glm-10b", **{**fields, **overrides})


def _qkv(c: GLMConfig, suffix: str):
    """The fused query_key_value ([3E, E] weight or [3E] bias, rows [q | k | v], each [H, D]) ->
    our query / key / value leaves ([E, H, D] kernels, [H, D] biases)."""
    h, d = c.num_attention_heads, c.head_dim

    def convert(w: np.ndarray):
        parts = np.split(w, 3, axis=0)
        if w.ndim == 1:
            out = [p.reshape(h, d) for p in parts]
        else:
            out = [p.T.reshape(w.shape[1], h, d) for p in parts]
        return {("attention", name, suffix): x for name, x in zip(("query", "key", "value"), out)}

    return convert


def rules(c: GLMConfig) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, top-level rules) over the canonical `glm.` names for config `c`."""
    if (
        c.position_encoding != "learned"
        or not c.position_encoding_2d
        or c.norm_placement != "pre"
        or c.ffn_kind not in ("gelu_tanh", "gelu")
        or not c.tie_word_embeddings
    ):
        raise ConversionError(
            "the original GLM has learned 2D position tables, pre-LN, a GeLU MLP and tied "
            "embeddings; build the config with layout_thudm_glm.config_from(config_json)"
        )
    e, h, d, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size
    rows = c.learned_position_rows
    p = "glm.transformer.layers.{i}."
    layer = [
        *_layernorm_rules(p + "input_layernorm", ("input_layernorm",), e),
        Rule(p + "attention.query_key_value.weight", (3 * h * d, e), _qkv(c, "kernel")),
        Rule(p + "attention.query_key_value.bias", (3 * h * d,), _qkv(c, "bias")),
        Rule(p + "attention.dense.weight", (e, h * d), _linear_in(("attention", "dense", "kernel"), (h, d))),
        Rule(p + "attention.dense.bias", (e,), _leaf("attention", "dense", "bias")),
        *_layernorm_rules(p + "post_attention_layernorm", ("post_attention_layernorm",), e),
        Rule(p + "mlp.dense_h_to_4h.weight", (f, e), _linear(("mlp", "dense_h_to_4h", "kernel"), (f,))),
        Rule(p + "mlp.dense_h_to_4h.bias", (f,), _leaf("mlp", "dense_h_to_4h", "bias")),
        Rule(p + "mlp.dense_4h_to_h.weight", (e, f), _linear(("mlp", "dense_4h_to_h", "kernel"), (e,))),
        Rule(p + "mlp.dense_4h_to_h.bias", (e,), _leaf("mlp", "dense_4h_to_h", "bias")),
    ]
    top = [
        _embedding_rule("glm.word_embeddings.weight", c),
        Rule("glm.transformer.position_embeddings.weight", (rows, e), _leaf("position_embeddings", "embedding")),
        Rule(
            "glm.transformer.block_position_embeddings.weight",
            (rows, e),
            _leaf("block_position_embeddings", "embedding"),
        ),
        *_layernorm_rules("glm.transformer.final_layernorm", ("final_layernorm",), e),
    ]
    return layer, top


def canonical(name: str) -> str:
    """The Hub's bare GLMModel names (`transformer.…`, `word_embeddings.weight`) -> `glm.…`."""
    return "glm." + name if name.startswith(("transformer.", "word_embeddings.")) else name


LAYOUT = Layout(
    name="thudm-glm",
    families=("glm-10b",),
    matches=matches,
    config_from=config_from,
    rules=rules,
    canonical=canonical,
)
