"""GLMConfig: every architectural knob of the GLM family, named presets, overrides, validation.

Field names follow the GLM-130B reference flags where one exists (`num_layers`, `hidden_size`,
`num_attention_heads`, `inner_hidden_size`, `vocab_size`, `max_sequence_length`,
`layernorm_epsilon`, `hidden_dropout`, `attention_dropout`, `position_encoding_2d`).

Two sizes are derived unless set: `head_dim` (hidden_size / num_attention_heads) and
`inner_hidden_size` (4 x hidden for a plain GeLU FFN, 8/3 x hidden rounded up to
`ffn_multiple_of` for gated FFNs, which gives GLM-130B's 32768 exactly). `override()` and
`get_config()` re-derive them, so `--set hidden_size=1024` gives a consistent config.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import jax
import jax.numpy as jnp

FFN_KINDS = ("geglu", "swiglu", "gelu", "gelu_tanh", "relu")
POSITION_ENCODINGS = ("rotary", "alibi", "learned")
ROTARY_SCALINGS = ("none", "linear", "llama3")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("deepnorm", "pre")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_tpu")
QUANTIZED_MATMULS = ("auto", "xla", "pallas")
LORA_TARGETS = ("query", "key", "value", "dense", "dense_h_to_4h", "dense_4h_to_h")
PROMPT_ENCODERS = ("none", "mlp", "lstm")  # prompt tuning; P-tuning v1's two encoders (peft's PromptEncoder)
QKV = ("query", "key", "value")
LORA_INITS = ("kaiming", "gaussian")
IA3_FEEDFORWARD = ("dense_4h_to_h",)  # IA3 scales these layers' input (peft's feedforward_modules)
# remat_policy -> what a rematerialised layer saves for its backward (None: nothing, recompute it all)
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention_context"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """An impossible or unknown configuration; the message says which field to fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterFields:
    """The LoRA and P-tuning v2 knobs, defined here once. `GLMConfig` carries them as the model
    builds them (lora_rank 0 and pre_seq_len 0: no adapter); `peft.PeftConfig` carries the same
    fields as a fine-tuning run asks for them (its method switches its adapter on)."""

    # LoRA on the named linear layers of every block: the update is s * B(A(dropout(x))), s = lora_alpha / lora_rank
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    # comma-separated: query_key_value (one A shared by the three, peft's target in ChatGLM's recipes), or
    # query,key,value (an A each, peft on q_proj/k_proj/v_proj), and dense, dense_h_to_4h, dense_4h_to_h
    lora_targets: str = "query_key_value"
    lora_init: str = "kaiming"  # A's init: kaiming (peft's default, kaiming-uniform a=sqrt(5)) or gaussian (N(0, 1/r))
    lora_rslora: bool = False  # rsLoRA: the update scaled by alpha / sqrt(r) instead of alpha / r
    lora_dora: bool = False  # DoRA: the adapted weight renormalised per output feature to a learned magnitude
    # P-tuning v2: pre_seq_len virtual key/value positions in every layer, seen by every real token
    pre_seq_len: int = 0  # 0: no prefix
    prefix_projection: bool = False  # embedding -> Linear -> tanh -> Linear, else one embedding
    prefix_hidden_size: int = 0  # the projection's width; 0: hidden_size
    prefix_dropout: float = 0.1
    # prompt tuning (Lester et al.) and P-tuning v1 (Liu et al.): virtual token embeddings before the input
    num_virtual_tokens: int = 0  # 0: none
    prompt_encoder: str = "none"  # none: prompt tuning; mlp / lstm: P-tuning v1's prompt encoder
    prompt_encoder_hidden_size: int = 0  # the encoder's width; 0: hidden_size
    # bottleneck adapters (Houlsby et al.) after attention and after the MLP of every layer
    adapter_size: int = 0  # the bottleneck width; 0: none
    # IA3 (Liu et al. 2022, peft's IA3): learned scales on keys, values and the MLP's inner activation
    ia3: bool = False
    ia3_targets: str = "key,value,dense_4h_to_h"
    # a scalar head on the final hidden state (`GLM.values`): reward models and PPO's critic
    value_head: bool = False

    @property
    def _lora_names(self) -> list[str]:
        return _names(self.lora_targets)

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """The layers LoRA adapts; `query_key_value` (peft's name for ChatGLM's fused QKV) is all three."""
        return _layers_named(self.lora_targets)

    @property
    def lora_fused_qkv(self) -> bool:
        """query, key and value share one A, as peft's LoRA on the fused query_key_value weight."""
        return "query_key_value" in self._lora_names

    @property
    def lora_scaling(self) -> float:
        """s of the update s * B(A(x)) (`lora_scaling`)."""
        return lora_scaling(self.lora_alpha, self.lora_rank, self.lora_rslora)

    @property
    def prefix_slots(self) -> int:
        """Key/value positions before the sequence in every layer (KV cache slots 0..P-1): P-tuning
        v2's `pre_seq_len` or the virtual tokens of prompt tuning / P-tuning v1 (prompts.py)."""
        return self.pre_seq_len or self.num_virtual_tokens

    def check_prompt_fields(self) -> None:
        """Prompt tuning / P-tuning v1's fields (the `check_adapter_fields` part of prompts.py)."""
        if self.prompt_encoder not in PROMPT_ENCODERS:
            raise ConfigError(f"prompt_encoder={self.prompt_encoder!r}; choose one of {PROMPT_ENCODERS}")
        if self.num_virtual_tokens and self.pre_seq_len:
            raise ConfigError(
                f"num_virtual_tokens={self.num_virtual_tokens} (prompt tuning / P-tuning v1) and "
                f"pre_seq_len={self.pre_seq_len} (P-tuning v2) both fill the prefix slots of every layer: "
                "set one of them to 0"
            )

    def check_adapter_fields(self) -> None:
        """Raise ConfigError naming the adapter field that is out of range."""
        for name in SIZE_FIELDS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 0 (0: off or the default)")
        self.check_prompt_fields()
        bad = sorted(set(self.lora_target_names) - set(LORA_TARGETS))
        if bad:
            raise ConfigError(
                f"lora_targets={self.lora_targets!r}: unknown layer(s) {bad}; choose from {LORA_TARGETS} "
                "or query_key_value (one A shared by the three, as peft on a fused QKV)"
            )
        if self.lora_fused_qkv and set(QKV) & set(self._lora_names):
            raise ConfigError(
                f"lora_targets={self.lora_targets!r}: query_key_value (one shared A) or query/key/value "
                "(an A each), not both"
            )
        if self.lora_init not in LORA_INITS:
            raise ConfigError(f"lora_init={self.lora_init!r}; choose one of {LORA_INITS}")
        for name in ("lora_dropout", "prefix_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        self._check_bottleneck_and_ia3()

    @property
    def ia3_target_names(self) -> tuple[str, ...]:
        """The layers IA3 scales (`query_key_value`: all three); those in `IA3_FEEDFORWARD` scale
        their input, the others their output."""
        return _layers_named(self.ia3_targets)

    def _check_bottleneck_and_ia3(self) -> None:
        bad = sorted(set(self.ia3_target_names) - set(LORA_TARGETS))
        if bad:
            raise ConfigError(
                f"ia3_targets={self.ia3_targets!r}: unknown layer(s) {bad}; choose from {LORA_TARGETS} "
                "or query_key_value"
            )
        if self.ia3 and not self.ia3_target_names:
            raise ConfigError("ia3=true needs at least one layer in ia3_targets, e.g. key,value,dense_4h_to_h")


def _names(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def _layers_named(spec: str) -> tuple[str, ...]:
    """A comma list of layer names -> the layers (`query_key_value` is query, key and value)."""
    return tuple(n2 for n in _names(spec) for n2 in (QKV if n == "query_key_value" else (n,)))


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA's s: alpha / r, or alpha / sqrt(r) with rsLoRA (peft's `scaling`)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


# the adapter sizes: integers >= 0
SIZE_FIELDS = (
    "lora_rank",
    "pre_seq_len",
    "prefix_hidden_size",
    "num_virtual_tokens",
    "prompt_encoder_hidden_size",
    "adapter_size",
)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_init", "lora_rslora", "lora_dora")
PREFIX_FIELDS = ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "prefix_dropout")
PROMPT_FIELDS = ("num_virtual_tokens", "prompt_encoder", "prompt_encoder_hidden_size")
ADAPTER_FIELDS = ("adapter_size",)
IA3_FIELDS = ("ia3", "ia3_targets")


@dataclasses.dataclass(frozen=True)
class GLMConfig(AdapterFields):
    # sizes
    num_layers: int = 8
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_attention_heads (multi-head)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 32000  # the tokenizer's vocabulary
    vocab_pad_multiple: int = 128  # embedding rows padded up to a multiple of this
    max_sequence_length: int = 2048
    # feed-forward
    ffn_kind: str = "geglu"  # geglu: a*gelu(b); swiglu: silu(a)*b; gelu / gelu_tanh / relu: plain
    inner_hidden_size: int | None = None
    ffn_multiple_of: int = 128  # rounding of the derived gated-FFN width
    # normalisation
    norm_kind: str = "layernorm"
    norm_placement: str = "deepnorm"  # deepnorm: post-LN, residual carries LN output
    layernorm_epsilon: float = 1e-5
    final_norm: bool = True
    deepnorm_alpha_layers: int = 0  # DeepNorm alpha = sqrt(2 x this); 0: num_layers (ChatGLM-6B: 28 always)
    # positions: rotary (the GLM family, LLaMA), alibi (BLOOM: a per-head linear bias on key
    # distance in the attention scores) or learned (OPT, the original GLM: absolute position tables
    # added to the word embeddings)
    position_encoding: str = "rotary"
    position_offset: int = 0  # learned: the table row of position 0 (OPT: 2)
    position_embedding_rows: int = 0  # learned: rows of each table; 0: max_sequence_length + position_offset
    # 2D positions (position and block position): rotary, the second half of each head by block
    # position (GLM-130B, ChatGLM-6B); learned, a second table for block positions (the original GLM)
    position_encoding_2d: bool = False
    rotary_fraction: float = 1.0  # share of each head's dims that rotate (ChatGLM2: 0.5)
    rotary_interleaved: bool = False  # pairs (2i, 2i+1) (GLM-4 family) vs rotate-half (GLM-130B)
    rotary_base: float = 10000.0
    rotary_fp16_angles: bool = False  # the reference's fp16 runs compute angles in fp16
    # inverse frequencies rounded to fp16 before the (fp32) angles are formed, as GLM-130B's pinned
    # SwissArmyTransformer and ChatGLM-6B build them at any model dtype
    rotary_fp16_inv_freq: bool = False
    # rotary context extension (transformers' rope_scaling): linear divides the frequencies by the
    # factor; llama3 (Llama-3.1/3.2) divides the low ones, keeps the high ones and blends between
    rotary_scaling: str = "none"
    rotary_scaling_factor: float = 1.0
    rotary_low_freq_factor: float = 1.0  # llama3
    rotary_high_freq_factor: float = 4.0  # llama3
    rotary_original_length: int = 8192  # llama3: original_max_position_embeddings
    embedding_norm: bool = False  # a LayerNorm on the word embeddings (BLOOM's word_embeddings_layernorm)
    # biases and head
    qkv_bias: bool = True
    attention_dense_bias: bool = True
    ffn_bias: bool = True
    tie_word_embeddings: bool = True
    # regularisation and stability
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    embedding_shrink_alpha: float = 1.0  # 1.0 = off; GLM-130B: 0.1
    embedding_init_std: float = 0.0052
    # numerics and execution
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"
    # weight-only quantization of the four linear weights of every layer (quant.py)
    quantization: str = "none"  # none | int8 | int4
    quantization_group: int = 0  # input rows per scale; 0: one scale per output row
    # or a fixed number of scale groups along every layer's input (GLM-130B's INT4 checkpoints:
    # one scale per output row per tensor-parallel rank); 0: use quantization_group
    quantization_groups: int = 0
    # INT4 dequant-matmul: xla (portable), pallas (fused Triton kernel, per shard on a tensor mesh),
    # auto (pallas for decode-sized token counts per shard on NVIDIA GPUs, else xla)
    quantized_matmul: str = "auto"
    # sizes that were derived rather than set; re-derived by override()
    _derived: tuple = dataclasses.field(default=(), repr=False, compare=False)

    def __post_init__(self):
        derived = []
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
            derived.append("num_kv_heads")
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly or change one of them"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            derived.append("head_dim")
        if self.inner_hidden_size is None:
            object.__setattr__(self, "inner_hidden_size", _derived_ffn_width(self))
            derived.append("inner_hidden_size")
        object.__setattr__(self, "_derived", tuple(sorted(set(self._derived) | set(derived))))
        validate(self)

    # ---- derived quantities -------------------------------------------------------------
    def scale_groups(self, k: int) -> int:
        """Quantization scale groups along an input dimension of k rows."""
        per_group = self.quantization_group or k // max(self.quantization_groups, 1)
        if (
            k % per_group
            or (self.quantization_groups and per_group * self.quantization_groups != k)
            or (self.quantization == "int4" and per_group % 2)
        ):
            raise ConfigError(
                f"a linear weight with {k} input rows does not split into scale groups of "
                f"{'an even size' if self.quantization == 'int4' else 'equal size'} with "
                f"quantization_group={self.quantization_group}, quantization_groups="
                f"{self.quantization_groups}"
            )
        return k // per_group

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def deepnorm_alpha(self) -> float:
        """Residual scale alpha = sqrt(2N) (DeepNorm, GLM-130B)."""
        return math.sqrt(2 * (self.deepnorm_alpha_layers or self.num_layers))

    @property
    def deepnorm_beta(self) -> float:
        """Init gain beta = (2N)^-1/2 on FFN, value and attention-output weights."""
        return (2 * self.num_layers) ** -0.5 if self.norm_placement == "deepnorm" else 1.0

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (for 2D rotary: per half)."""
        per = self.head_dim // 2 if self.position_encoding_2d else self.head_dim
        return int(per * self.rotary_fraction)

    @property
    def learned_position_rows(self) -> int:
        """Rows of each learned position table (`position_encoding=learned`)."""
        return self.position_embedding_rows or self.max_sequence_length + self.position_offset

    @property
    def rotary(self) -> bool:
        return self.position_encoding == "rotary"

    @property
    def gated_ffn(self) -> bool:
        return self.ffn_kind in ("geglu", "swiglu")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    # ---- (de)serialisation and overrides --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every public field, resolved (what a checkpoint stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_derived"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLMConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"_derived"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def override(self, **overrides) -> GLMConfig:
        """A new config with `overrides` applied; derived sizes follow them unless set too."""
        known = {f.name for f in dataclasses.fields(self)} - {"_derived"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        d = self.to_dict()
        for name in self._derived:
            if name not in overrides:
                d[name] = None
        d.update(overrides)
        return GLMConfig(**d)


def _derived_ffn_width(c: GLMConfig) -> int:
    if not c.gated_ffn:
        return 4 * c.hidden_size
    m = c.ffn_multiple_of
    return -(-(8 * c.hidden_size) // (3 * m)) * m


def validate(c: GLMConfig) -> None:
    """Raise ConfigError naming the field for impossible combinations."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for name in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "vocab_pad_multiple",
        "max_sequence_length",
        "inner_hidden_size",
        "ffn_multiple_of",
    ):
        need(
            isinstance(getattr(c, name), int) and getattr(c, name) > 0,
            f"{name} must be a positive integer, got {getattr(c, name)!r}",
        )
    need(c.ffn_kind in FFN_KINDS, f"ffn_kind={c.ffn_kind!r}; choose one of {FFN_KINDS}")
    need(c.norm_kind in NORM_KINDS, f"norm_kind={c.norm_kind!r}; choose one of {NORM_KINDS}")
    need(c.norm_placement in NORM_PLACEMENTS, f"norm_placement={c.norm_placement!r}; choose one of {NORM_PLACEMENTS}")
    need(c.attention_impl in ATTENTION_IMPLS, f"attention_impl={c.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    need(
        c.quantized_matmul in QUANTIZED_MATMULS,
        f"quantized_matmul={c.quantized_matmul!r}; choose one of {QUANTIZED_MATMULS}",
    )
    need(
        c.quantized_matmul != "pallas" or c.quantization == "int4",
        f"quantized_matmul=pallas is the INT4 kernel; quantization={c.quantization!r} needs xla or auto",
    )
    need(c.remat_policy in REMAT_POLICIES, f"remat_policy={c.remat_policy!r}; choose one of {tuple(REMAT_POLICIES)}")
    for name in ("dtype", "param_dtype"):
        need(getattr(c, name) in DTYPES, f"{name}={getattr(c, name)!r}; choose one of {tuple(DTYPES)}")
    need(
        c.num_attention_heads % c.num_kv_heads == 0,
        f"num_attention_heads={c.num_attention_heads} is not divisible by num_kv_heads="
        f"{c.num_kv_heads} (grouped attention needs whole groups)",
    )
    _validate_positions(c, need)
    _validate_numerics(c, need)
    c.check_adapter_fields()
    need(c.layernorm_epsilon > 0, f"layernorm_epsilon={c.layernorm_epsilon} must be positive")


def _validate_positions(c: GLMConfig, need) -> None:
    need(
        c.position_encoding in POSITION_ENCODINGS,
        f"position_encoding={c.position_encoding!r}; choose one of {POSITION_ENCODINGS}",
    )
    need(
        c.position_encoding != "alibi" or not c.position_encoding_2d,
        "position_encoding=alibi has no 2D form: set position_encoding_2d=false",
    )
    for name in ("position_offset", "position_embedding_rows"):
        need(
            isinstance(getattr(c, name), int) and getattr(c, name) >= 0,
            f"{name}={getattr(c, name)!r} must be an integer >= 0",
        )
    if c.position_encoding == "learned":
        need(
            c.learned_position_rows >= c.max_sequence_length + c.position_offset,
            f"position_embedding_rows={c.position_embedding_rows} cannot hold max_sequence_length="
            f"{c.max_sequence_length} positions after position_offset={c.position_offset}",
        )
        need(
            not c.num_virtual_tokens,
            "prompt tuning / P-tuning v1 run their virtual tokens at positions -P..-1, which a learned "
            "position table has no row for: use lora, ptuning (v2) or another method",
        )
    need(c.rotary_scaling in ROTARY_SCALINGS, f"rotary_scaling={c.rotary_scaling!r}; choose one of {ROTARY_SCALINGS}")
    need(c.rotary_scaling_factor > 0, f"rotary_scaling_factor={c.rotary_scaling_factor} must be positive")
    need(
        c.rotary_scaling != "llama3" or 0 < c.rotary_low_freq_factor < c.rotary_high_freq_factor,
        f"rotary_scaling=llama3 needs 0 < rotary_low_freq_factor ({c.rotary_low_freq_factor}) < "
        f"rotary_high_freq_factor ({c.rotary_high_freq_factor})",
    )
    if c.position_encoding != "rotary":
        return
    need(0.0 < c.rotary_fraction <= 1.0, f"rotary_fraction={c.rotary_fraction} must be in (0, 1]")
    if c.position_encoding_2d:
        need(
            c.rotary_fraction == 1.0,
            "position_encoding_2d rotates both halves of each head fully; set rotary_fraction=1.0",
        )
        need(
            c.head_dim % 4 == 0,
            f"position_encoding_2d splits head_dim={c.head_dim} into two rotary halves of even "
            "size: head_dim must be a multiple of 4",
        )
    rot = (c.head_dim // 2 if c.position_encoding_2d else c.head_dim) * c.rotary_fraction
    need(
        rot == int(rot) and int(rot) % 2 == 0 and rot > 0,
        f"rotary_fraction={c.rotary_fraction} of head_dim={c.head_dim} gives {rot} rotary dims; "
        "it must be a positive even integer",
    )


def _validate_numerics(c: GLMConfig, need) -> None:
    need(c.quantization in ("none", "int8", "int4"), f"quantization={c.quantization!r}; choose none, int8 or int4")
    need(c.quantization_group >= 0, f"quantization_group={c.quantization_group} must be >= 0")
    need(c.quantization_groups >= 0, f"quantization_groups={c.quantization_groups} must be >= 0")
    need(
        not (c.quantization_group and c.quantization_groups),
        "set quantization_group (rows per scale) or quantization_groups (scales per row), not both",
    )
    for name in ("hidden_dropout", "attention_dropout"):
        need(0.0 <= getattr(c, name) < 1.0, f"{name}={getattr(c, name)} must be in [0, 1)")
    need(0.0 <= c.embedding_shrink_alpha <= 1.0, f"embedding_shrink_alpha={c.embedding_shrink_alpha} must be in [0, 1]")
    need(
        isinstance(c.deepnorm_alpha_layers, int) and c.deepnorm_alpha_layers >= 0,
        f"deepnorm_alpha_layers={c.deepnorm_alpha_layers!r} must be an integer >= 0 (0: num_layers)",
    )


# ---- presets --------------------------------------------------------------------------------
_NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
_LLAMA = dict(
    _NO_DROPOUT,
    vocab_size=32000,
    max_sequence_length=4096,
    ffn_kind="swiglu",
    norm_kind="rmsnorm",
    norm_placement="pre",
    qkv_bias=False,
    attention_dense_bias=False,
    ffn_bias=False,
    tie_word_embeddings=False,
)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, max_sequence_length=8192, rotary_base=500000.0)
_BIASED_PRE_LN = dict(_NO_DROPOUT, norm_kind="layernorm", norm_placement="pre", tie_word_embeddings=True)
_BLOOM = dict(
    _BIASED_PRE_LN,
    vocab_size=250880,
    max_sequence_length=2048,
    ffn_kind="gelu_tanh",
    position_encoding="alibi",
    embedding_norm=True,
)
_OPT = dict(
    _BIASED_PRE_LN,
    vocab_size=50272,
    max_sequence_length=2048,
    ffn_kind="relu",
    position_encoding="learned",
    position_offset=2,
)
_GLM_ORIGINAL = dict(
    _BIASED_PRE_LN,
    max_sequence_length=1024,
    position_embedding_rows=1025,
    ffn_kind="gelu_tanh",
    position_encoding="learned",
    position_encoding_2d=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # GLM-130B exactly (docs/reference.md section 1): 70 DeepNorm post-LN layers, GeGLU 32768, tied 150528 vocab.
    "glm-130b": dict(
        num_layers=70,
        hidden_size=12288,
        num_attention_heads=96,
        vocab_size=150528,
        vocab_pad_multiple=768,
        max_sequence_length=2048,
        ffn_kind="geglu",
        norm_kind="layernorm",
        norm_placement="deepnorm",
        embedding_shrink_alpha=0.1,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        rotary_fp16_inv_freq=True,
    ),
    # ChatGLM-6B (docs/reference.md section 2): 2D rotary, GeLU(tanh) 16384, separate lm_head.
    "chatglm-6b": dict(
        num_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        vocab_size=130528,
        max_sequence_length=2048,
        ffn_kind="gelu_tanh",
        norm_kind="layernorm",
        norm_placement="deepnorm",
        position_encoding_2d=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_fp16_inv_freq=True,
        deepnorm_alpha_layers=28,
    ),
    # ChatGLM2-6B (docs/reference.md section 2): pre-RMSNorm, MQA with 2 KV groups, SwiGLU 13696,
    # half-rotary with interleaved pairs, QKV bias only, causal decoder.
    "chatglm2-6b": dict(
        num_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        num_kv_heads=2,
        vocab_size=65024,
        max_sequence_length=32768,
        ffn_kind="swiglu",
        inner_hidden_size=13696,
        norm_kind="rmsnorm",
        norm_placement="pre",
        rotary_fraction=0.5,
        rotary_interleaved=True,
        qkv_bias=True,
        attention_dense_bias=False,
        ffn_bias=False,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # ---- the other open models of the survey (docs/families.md) ----
    # LLaMA-2 (Touvron et al. 2023): pre-RMSNorm, SwiGLU, rotate-half rotary, no biases, untied head.
    "llama-2-7b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_attention_heads=32, inner_hidden_size=11008),
    "llama-2-13b": dict(_LLAMA, num_layers=40, hidden_size=5120, num_attention_heads=40, inner_hidden_size=13824),
    # LLaMA-2-70B, grouped-query attention with 8 KV heads (`llama-70b` is its name in the pod plans)
    "llama-70b": dict(
        _LLAMA, num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, inner_hidden_size=28672
    ),
    "llama-3-8b": dict(
        _LLAMA3, num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, inner_hidden_size=14336
    ),
    "llama-3-70b": dict(
        _LLAMA3, num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, inner_hidden_size=28672
    ),
    # Llama-3.2-1B: tied embeddings, llama3 rope scaling (factor 32 over 8192) to 128K
    "llama-3.2-1b": dict(
        _LLAMA3,
        num_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_kv_heads=8,
        inner_hidden_size=8192,
        head_dim=64,
        max_sequence_length=131072,
        tie_word_embeddings=True,
        rotary_scaling="llama3",
        rotary_scaling_factor=32.0,
        rotary_low_freq_factor=1.0,
        rotary_high_freq_factor=4.0,
        rotary_original_length=8192,
    ),
    # BLOOM (BigScience 2022): ALiBi, LayerNorm on the embeddings, pre-LN, GeLU (tanh), biases, tied.
    "bloom-176b": dict(_BLOOM, num_layers=70, hidden_size=14336, num_attention_heads=112),
    "bloom-560m": dict(_BLOOM, num_layers=24, hidden_size=1024, num_attention_heads=16),
    # OPT (Zhang et al. 2022): learned positions from row 2, pre-LN, ReLU, biases, tied.
    "opt-175b": dict(_OPT, num_layers=96, hidden_size=12288, num_attention_heads=96),
    "opt-125m": dict(_OPT, num_layers=12, hidden_size=768, num_attention_heads=12),
    # the original GLM (Du et al. 2022, THUDM/GLM): learned position and block-position tables
    # (max_sequence_length + 1 rows), pre-LN, GeLU (tanh), biases, tied; GLM-10B and GLM-Large
    "glm-10b": dict(_GLM_ORIGINAL, num_layers=48, hidden_size=4096, num_attention_heads=64, vocab_size=50304),
    "glm-large": dict(
        _GLM_ORIGINAL,
        num_layers=24,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=30592,
        max_sequence_length=512,
        position_embedding_rows=513,
    ),
    # GLM-130B's block at ~1.3 B parameters: the GPU benchmark model.
    "glm-1b": dict(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=16,
        vocab_size=32000,
        max_sequence_length=2048,
        ffn_kind="geglu",
        norm_placement="deepnorm",
        embedding_shrink_alpha=0.1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # Tests and the CPU default run: splits on --mesh 8x4 (8 layers; heads, FFN, vocab % 4 == 0).
    "glm-tiny": dict(
        num_layers=8,
        hidden_size=128,
        num_attention_heads=4,
        vocab_size=32000,
        max_sequence_length=1024,
        ffn_kind="geglu",
        norm_placement="deepnorm",
        embedding_shrink_alpha=0.1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
}


def get_config(name: str, **overrides) -> GLMConfig:
    """The preset `name` with `overrides` applied (derived sizes follow the overrides)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return GLMConfig(**{**PRESETS[name], **overrides})


def _parse_value(name: str, raw: str) -> Any:
    hints = typing.get_type_hints(GLMConfig)
    if name not in hints or name == "_derived":
        raise ConfigError(
            f"--set {name}=...: unknown config field; known fields: {sorted(h for h in hints if h != '_derived')}"
        )
    hint = hints[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"--set {name}={raw!r}: expected {getattr(base, '__name__', base)}") from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['num_layers=4', 'dtype=float32'] -> {'num_layers': 4, 'dtype': 'float32'} (typed)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set num_layers=4")
        key, raw = item.split("=", 1)
        key = key.strip()
        out[key] = _parse_value(key, raw.strip())
    return out


def config_from_args(preset: str, sets: list[str] | None) -> GLMConfig:
    """What every script does with `--preset NAME --set k=v ...`."""
    return get_config(preset, **parse_overrides(sets))
