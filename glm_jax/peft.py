"""Fine-tuning methods as pure functions of (frozen params, trainable params).

    peft = PeftConfig("lora")                            # or any of METHODS
    config = peft.model_config(base_config)              # the model with its adapter layers
    trainable, frozen = split(params, peft, config)      # disjoint trees (freeze: a layer range)
    params = combine(trainable, frozen, peft)            # what the model applies

- LoRA (`layers.Linear._lora`): `lora_a` / `lora_b` beside the chosen linear weights of every
  layer, float or quantized (`query_key_value`: one A shared by query, key and value,
  `layers.FusedLoRA`; rsLoRA's scaling; DoRA's `lora_magnitude_delta`); `merge_lora` folds s A B
  (DoRA: renormalised) into float kernels.
- P-tuning v2 (`layers.PrefixEncoder`): `prefix_encoder` keys/values for every layer.
- prompt / ptuning-v1 (prompts.py): `prompt_encoder`, virtual token embeddings (P-tuning v1: through
  an MLP or LSTM encoder) run through the frozen layers into the same per-layer prefix; no merge.
- adapter (Houlsby et al., `layers.Bottleneck`): `attention_adapter` / `mlp_adapter` bottlenecks in
  every layer; they do not merge (a merged checkpoint carries them).
- ia3 (peft's IA3, `layers.Linear._ia3`): `ia3_scale` vectors on keys, values and the MLP's inner
  activation; `merge_ia3` folds them into float kernels. `merge_adapters` merges whatever merges.
- freeze: only the last `trainable_layers` layers train (optionally the final norm and output
  head); the stacked `layers` leaves are split along their layer axis.
- full: every parameter trains (the pre-training trainer as it is).

Adapter leaves carry logical axes like every parameter, so a mesh shards them by the same rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from glm_jax.config import (
    ADAPTER_FIELDS,
    IA3_FEEDFORWARD,
    IA3_FIELDS,
    LORA_FIELDS,
    PREFIX_FIELDS,
    PROMPT_FIELDS,
    AdapterFields,
    ConfigError,
    GLMConfig,
)
from glm_jax.layers import l2_norm
from glm_jax.model import abstract_params

METHODS = ("lora", "ptuning", "prompt", "ptuning-v1", "adapter", "ia3", "freeze", "full")
LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude_delta")
HEAD = ("final_layernorm", "output_layer")
VALUE_HEAD = "value_head"  # GLM.values' parameters: trainable under every method that has them
# the field that switches each method's adapter on (off: its type's zero)
SIZE_SWITCHES = ("lora_rank", "pre_seq_len", "num_virtual_tokens", "adapter_size", "ia3")
ADAPTER_MODULES = ("attention_adapter", "mlp_adapter")  # layers.Bottleneck in every GLMBlock
# the config fields an adapter method switches on in the model it trains
METHOD_FIELDS = {
    "lora": LORA_FIELDS,
    "ptuning": PREFIX_FIELDS,
    "prompt": PROMPT_FIELDS,
    "ptuning-v1": PROMPT_FIELDS,
    "adapter": ADAPTER_FIELDS,
    "ia3": IA3_FIELDS,
}


# the size a method's adapter gets when its run does not set one: the reference recipes' (docs/reference.md)
METHOD_SIZES = {"lora": ("lora_rank", 8), "ptuning": ("pre_seq_len", 128)}
# Houlsby et al.'s fixed-size adapters (Table 1, "Adapters (64)"); IA3's only switch is on
METHOD_SIZES.update(adapter=("adapter_size", 64), ia3=("ia3", True))
# peft's prompt-learning examples: 20 virtual tokens (prompts.py)
METHOD_SIZES.update({"prompt": ("num_virtual_tokens", 20), "ptuning-v1": ("num_virtual_tokens", 20)})


@dataclasses.dataclass(frozen=True)
class PeftConfig(AdapterFields):
    """One fine-tuning method and its knobs. The adapter knobs (LoRA rank, alpha, dropout,
    targets; the P-tuning prefix) are `config.AdapterFields`, the same fields the model config
    carries; a method's own size left at 0 takes the reference recipe's (LoRA rank 8, P-tuning
    pre_seq_len 128)."""

    method: str = "lora"
    trainable_layers: int = 2  # freeze: the last N layers train
    train_head: bool = False  # freeze: the final norm and an untied output layer train too

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"fine-tuning method {self.method!r}; choose one of {METHODS}")
        field, size = METHOD_SIZES.get(self.method, (None, 0))
        if field and not getattr(self, field):
            object.__setattr__(self, field, size)
        self._prompt_encoder_default()
        self.check_adapter_fields()

    def _prompt_encoder_default(self):
        """ptuning-v1 needs an encoder (peft's PromptEncoder default: mlp); prompt tuning has none."""
        if self.method == "ptuning-v1" and self.prompt_encoder == "none":
            object.__setattr__(self, "prompt_encoder", "mlp")
        if self.method == "prompt" and self.prompt_encoder != "none":
            raise ConfigError(
                "prompt tuning trains the virtual token embeddings themselves (prompt_encoder="
                f"{self.prompt_encoder!r}): use --method ptuning-v1 for an mlp / lstm prompt encoder"
            )

    @property
    def is_adapter(self) -> bool:
        """New parameters beside a frozen base (lora, ptuning), rather than some of the base's own."""
        return self.method not in ("freeze", "full")

    def model_config(self, base: GLMConfig) -> GLMConfig:
        """The base config with this method's adapter layers (and a value head, if asked) switched on."""
        if self.value_head:
            base = base.override(value_head=True)
        if self.method in METHOD_FIELDS:
            return base.override(**{name: getattr(self, name) for name in METHOD_FIELDS[self.method]})
        if self.method == "freeze" and not 0 < self.trainable_layers <= base.num_layers:
            raise ConfigError(f"trainable_layers={self.trainable_layers} must be in 1..num_layers={base.num_layers}")
        return base

    def base_config(self, config: GLMConfig) -> GLMConfig:
        """The inverse of `model_config`: the model config with this method's adapter layers and
        the value head switched off (what the frozen base computes on its own)."""
        switches = set(METHOD_FIELDS.get(self.method, ())) & set(SIZE_SWITCHES)
        off = {name: type(getattr(config, name))() for name in switches}
        return config.override(value_head=False, **off)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PeftConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _flat(tree: dict) -> dict:
    return traverse_util.flatten_dict(tree) if tree else {}


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat) if flat else {}


def trainable_path(path: tuple, peft: PeftConfig) -> bool:
    """Whether the leaf at `path` is (wholly) trainable; freeze's layer leaves are split instead."""
    if peft.method == "full" or path[0] == VALUE_HEAD:
        return True
    if peft.method == "lora":
        return path[-1] in LORA_LEAVES
    if peft.method == "ptuning":
        return path[0] == "prefix_encoder"
    if peft.method in ("prompt", "ptuning-v1"):
        return path[0] == "prompt_encoder"
    if peft.method == "adapter":
        return path[0] == "layers" and path[1] in ADAPTER_MODULES
    if peft.method == "ia3":
        return path[-1] == "ia3_scale"
    return peft.train_head and path[0] in HEAD


def split(
    params: dict, peft: PeftConfig, config: GLMConfig, take: Callable[[Any, slice], Any] = lambda x, rows: x[rows]
) -> tuple[dict, dict]:
    """params -> (trainable, frozen): disjoint nested dicts. `take(leaf, rows)` slices a stacked
    layer leaf (freeze); pass `lambda s, rows: s` to split a tree of shardings the same way."""
    trainable, frozen = {}, {}
    first = config.num_layers - peft.trainable_layers
    for path, leaf in _flat(params).items():
        if peft.method == "freeze" and path[0] == "layers":
            trainable[path], frozen[path] = take(leaf, slice(first, None)), take(leaf, slice(0, first))
        elif trainable_path(path, peft):
            trainable[path] = leaf
        else:
            frozen[path] = leaf
    return _unflat(trainable), _unflat(frozen)


def combine(trainable: dict, frozen: dict, peft: PeftConfig) -> dict:
    """The inverse of `split`: one parameter tree (freeze: the layer leaves concatenated)."""
    flat = _flat(frozen)
    for path, leaf in _flat(trainable).items():
        if peft.method == "freeze" and path[0] == "layers":
            flat[path] = jnp.concatenate([flat[path], leaf], axis=0)
        else:
            flat[path] = leaf
    return _unflat(flat)


def split_shapes(peft: PeftConfig, config: GLMConfig) -> tuple[dict, dict]:
    """`split` of the model's abstract parameters: (trainable, frozen) ShapeDtypeStructs, nothing
    allocated. config: the model config (`peft.model_config(base)`)."""
    return jax.eval_shape(lambda p: split(p, peft, config), nn.meta.unbox(abstract_params(config)))


def count(tree) -> int:
    """Number of parameters in a tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


# ---- LoRA merge ------------------------------------------------------------------------------------
def _check_float(config: GLMConfig, method: str) -> None:
    if config.quantization != "none":
        raise ConfigError(
            f"{method} merges into float weights; this base holds {config.quantization} weights: merge "
            "into the float checkpoint it was quantized from (finetune.py --merge does), then quantize"
        )


def lora_delta(a, b, config: GLMConfig, stacked: bool):
    """s A B as a kernel (fp32, s = `config.lora_scaling`): a [*in, r], b [r, *out] -> [*in, *out];
    stacked: both with a leading layer axis, kept."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead = int(stacked)
    a32 = a32.reshape(a32.shape[:lead] + (-1, a32.shape[-1]))
    delta = jnp.einsum("...ir,...ro->...io", a32, b32.reshape(b32.shape[: lead + 1] + (-1,)))
    shape = a.shape[:-1] + b.shape[lead + 1 :]
    return delta.reshape(shape) * config.lora_scaling


def lora_a_path(flat: dict, module: tuple) -> tuple:
    """The A of the LoRA whose B is at module + ("lora_b",): its own, or the fused QKV's shared A."""
    own = module + ("lora_a",)
    return own if own in flat else module[:-1] + ("query_key_value", "lora_a")


def merge_lora(params: dict, config: GLMConfig, sign: float = 1.0) -> tuple[dict, GLMConfig]:
    """Fold every LoRA pair into its float kernel: W + s A B; DoRA: (m / ||W + s A B||) (W + s A B)
    per output feature (sign -1: take plain LoRA back out, `unmerge`). -> (params without lora
    leaves, the config without LoRA). A quantized base cannot take the merge: merge into the float
    checkpoint it came from, then quantize."""
    _check_float(config, "LoRA")
    if config.lora_dora and sign < 0:
        raise ConfigError("a DoRA merge rescales the kernels and is not taken back out: reload the base instead")
    flat = _flat(params)
    out = {p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES}
    for b_path in [p for p in flat if p[-1] == "lora_b"]:
        module, stacked = b_path[:-1], b_path[0] == "layers"
        a = flat[lora_a_path(flat, module)]
        kernel = module + ("kernel",)
        w = jnp.asarray(flat[kernel], jnp.float32)
        merged = w + sign * lora_delta(a, flat[b_path], config, stacked)
        if config.lora_dora:
            in_axes = tuple(range(int(stacked), a.ndim - 1))
            magnitude = l2_norm(w, in_axes) + jnp.asarray(flat[module + ("lora_magnitude_delta",)], jnp.float32)
            merged = merged * jnp.expand_dims(magnitude / l2_norm(merged, in_axes), in_axes)
        out[kernel] = merged.astype(flat[kernel].dtype)
    return _unflat(out), config.override(lora_rank=0, lora_dora=False)


def unmerge_lora(merged: dict, adapter: dict, config: GLMConfig) -> dict:
    """merged (from `merge_lora` with this adapter) -> the base kernels again (to rounding)."""
    params = combine(adapter, merged, PeftConfig("lora"))
    return merge_lora(params, config, sign=-1.0)[0]


# ---- IA3 merge and every merge ------------------------------------------------------------------------
def merge_ia3(params: dict, config: GLMConfig) -> tuple[dict, GLMConfig]:
    """Fold every IA3 vector l into its float kernel, as peft's IA3 merge: an input-scaling target
    (`IA3_FEEDFORWARD`) W[i, o] * l[i]; an output-scaling one W[i, o] * l[o] and bias[o] * l[o].
    -> (params without `ia3_scale`, the config without IA3). Quantized bases: as `merge_lora`."""
    _check_float(config, "IA3")
    flat = _flat(params)
    out = {p: v for p, v in flat.items() if p[-1] != "ia3_scale"}
    for path in [p for p in flat if p[-1] == "ia3_scale"]:
        module, lead = path[:-1], int(path[0] == "layers")
        l32 = jnp.asarray(flat[path], jnp.float32)  # [L, *in] or [L, *features]
        kernel = flat[module + ("kernel",)]
        extra = (1,) * (kernel.ndim - l32.ndim)
        if module[-1] in IA3_FEEDFORWARD:
            on_kernel = l32.reshape(l32.shape + extra)
        else:
            on_kernel = l32.reshape(l32.shape[:lead] + extra + l32.shape[lead:])
            if module + ("bias",) in flat:
                bias = flat[module + ("bias",)]
                out[module + ("bias",)] = (jnp.asarray(bias, jnp.float32) * l32).astype(bias.dtype)
        out[module + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) * on_kernel).astype(kernel.dtype)
    return _unflat(out), config.override(ia3=False)


def merge_adapters(params: dict, config: GLMConfig) -> tuple[dict, GLMConfig]:
    """Fold every adapter that merges into the float kernels (LoRA: `merge_lora`; IA3:
    `merge_ia3`) -> (params, config). Those that cannot merge (a P-tuning prefix, bottleneck
    adapters) stay in the tree with their config fields: a serving checkpoint carries them."""
    if config.lora_rank:
        params, config = merge_lora(params, config)
    if config.ia3:
        params, config = merge_ia3(params, config)
    return params, config


# ---- the base an adapter belongs to ------------------------------------------------------------------
def base_identity(config: GLMConfig, params: dict, step: int) -> dict:
    """What an adapter records of its base: the config, step, and a hash of the parameter
    metadata (paths, shapes, dtypes) and of a few values, so an adapter on another base fails."""
    h = hashlib.sha256()
    leaves = sorted(_flat(params).items())
    for path, leaf in leaves:
        h.update(f"{'/'.join(map(str, path))}:{tuple(leaf.shape)}:{jnp.dtype(leaf.dtype).name};".encode())
    # a fingerprint of the values too: two random inits of one config share all metadata
    for _, leaf in leaves[:4]:
        # the first 64 values in C order, gathered by index: a sharded leaf is never reshaped whole
        first = jnp.asarray(leaf)[np.unravel_index(np.arange(min(64, leaf.size)), leaf.shape)]
        if isinstance(first, jax.Array) and not first.is_fully_addressable:  # a base sharded over processes
            first = multihost_utils.process_allgather(first, tiled=True)
        h.update(np.ascontiguousarray(jax.device_get(first)).view(np.uint8).tobytes())
    base = config.override(
        lora_rank=0, pre_seq_len=0, adapter_size=0, ia3=False, num_virtual_tokens=0, prompt_encoder="none"
    )
    return {"config": base.to_dict(), "step": int(step), "params_sha256": h.hexdigest()}


def check_base(recorded: dict, config: GLMConfig, params: dict, step: int, where: str) -> None:
    """A clear error when an adapter is put on a base other than the one it was trained on."""
    mine = base_identity(config, params, step)
    knobs = {f.name for f in dataclasses.fields(AdapterFields)}  # the adapter's, not the base's
    diff = sorted(k for k in mine["config"] if k not in knobs and recorded["config"].get(k) != mine["config"][k])
    if diff:
        raise ConfigError(f"the adapter {where} was trained on another base model (config fields differ: {diff})")
    if recorded["params_sha256"] != mine["params_sha256"] or recorded["step"] != mine["step"]:
        raise ConfigError(
            f"the adapter {where} was trained on another base checkpoint (step {recorded['step']}, "
            f"parameter hash {recorded['params_sha256'][:12]}; this base: step {mine['step']}, "
            f"{mine['params_sha256'][:12]}); pass the --checkpoint it was trained from"
        )
