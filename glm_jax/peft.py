"""Fine-tuning methods as pure functions of (frozen params, trainable params).

    peft = PeftConfig("lora")                            # or "ptuning", "freeze", "full"
    config = peft.model_config(base_config)              # the model with its adapter layers
    trainable, frozen = split(params, peft, config)      # disjoint trees (freeze: a layer range)
    params = combine(trainable, frozen, peft)            # what the model applies

- LoRA (`layers.Linear._lora`): `lora_a` / `lora_b` beside the chosen linear weights of every
  layer, float or quantized; `merge_lora` folds (alpha / r) A B into float kernels.
- P-tuning v2 (`layers.PrefixEncoder`): `prefix_encoder` keys/values for every layer.
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

from glm_jax.config import LORA_FIELDS, PREFIX_FIELDS, AdapterFields, ConfigError, GLMConfig
from glm_jax.model import abstract_params

METHODS = ("lora", "ptuning", "freeze", "full")
LORA_LEAVES = ("lora_a", "lora_b")
HEAD = ("final_layernorm", "output_layer")


# the size a method's adapter gets when its run does not set one: the reference recipes' (docs/reference.md)
METHOD_SIZES = {"lora": ("lora_rank", 8), "ptuning": ("pre_seq_len", 128)}


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
        self.check_adapter_fields()

    @property
    def is_adapter(self) -> bool:
        """New parameters beside a frozen base (lora, ptuning), rather than some of the base's own."""
        return self.method in ("lora", "ptuning")

    def model_config(self, base: GLMConfig) -> GLMConfig:
        """The base config with this method's adapter layers switched on."""
        if self.method == "lora":
            return base.override(**{name: getattr(self, name) for name in LORA_FIELDS})
        if self.method == "ptuning":
            return base.override(**{name: getattr(self, name) for name in PREFIX_FIELDS})
        if self.method == "freeze" and not 0 < self.trainable_layers <= base.num_layers:
            raise ConfigError(f"trainable_layers={self.trainable_layers} must be in 1..num_layers={base.num_layers}")
        return base

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
    if peft.method == "full":
        return True
    if peft.method == "lora":
        return path[-1] in LORA_LEAVES
    if peft.method == "ptuning":
        return path[0] == "prefix_encoder"
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
def lora_delta(a, b, config: GLMConfig, stacked: bool):
    """(alpha / r) A B as a kernel (fp32): a [*in, r], b [r, *out] -> [*in, *out]; stacked: both
    with a leading layer axis, kept."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead = int(stacked)
    a32 = a32.reshape(a32.shape[:lead] + (-1, a32.shape[-1]))
    delta = jnp.einsum("...ir,...ro->...io", a32, b32.reshape(b32.shape[: lead + 1] + (-1,)))
    shape = a.shape[:-1] + b.shape[lead + 1 :]
    return delta.reshape(shape) * (config.lora_alpha / config.lora_rank)


def merge_lora(params: dict, config: GLMConfig, sign: float = 1.0) -> tuple[dict, GLMConfig]:
    """Fold every LoRA pair into its float kernel (sign -1: take it back out, `unmerge`).
    -> (params without lora leaves, the config without LoRA). A quantized base cannot take the
    merge: merge into the float checkpoint it came from, then quantize."""
    if config.quantization != "none":
        raise ConfigError(
            f"LoRA merges into float weights; this base holds {config.quantization} weights: merge "
            "into the float checkpoint it was quantized from (finetune.py --merge does), then quantize"
        )
    flat = _flat(params)
    out = {p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES}
    for path in [p for p in flat if p[-1] == "lora_a"]:
        kernel = path[:-1] + ("kernel",)
        delta = lora_delta(flat[path], flat[path[:-1] + ("lora_b",)], config, stacked=path[0] == "layers")
        out[kernel] = (jnp.asarray(flat[kernel], jnp.float32) + sign * delta).astype(flat[kernel].dtype)
    return _unflat(out), config.override(lora_rank=0)


def unmerge_lora(merged: dict, adapter: dict, config: GLMConfig) -> dict:
    """merged (from `merge_lora` with this adapter) -> the base kernels again (to rounding)."""
    params = combine(adapter, merged, PeftConfig("lora"))
    return merge_lora(params, config, sign=-1.0)[0]


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
        first = np.asarray(jax.device_get(jnp.ravel(leaf)[:64]))
        h.update(np.ascontiguousarray(first).view(np.uint8).tobytes())
    base = config.override(lora_rank=0, pre_seq_len=0)
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
