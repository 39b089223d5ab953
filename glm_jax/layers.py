"""The GLM block and its parts, as pure Flax (linen) modules.

Shapes: B batch, S sequence, E hidden (embed), H query heads, K key/value heads, G = H/K heads
per group, D head dim, F FFN inner width. Every parameter carries logical axis names (docs/design.md#logical-axes);
`sharding.py` alone maps them to mesh axes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from glm_jax import quant, tpu_attention
from glm_jax.config import IA3_FEEDFORWARD, GLMConfig
from glm_jax.target import target_platform

MASK_VALUE = -10000.0  # the reference's additive mask value (docs/reference.md section 1)

Initializer = nn.initializers.Initializer


def xavier_normal(gain: float = 1.0, in_axis=0, out_axis=-1, batch_axis=()) -> Initializer:
    """torch's xavier_normal_ on the [in, out] matrix a multi-axis kernel flattens to."""
    return nn.initializers.variance_scaling(
        gain**2, "fan_avg", "normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


# ---- dense layers -------------------------------------------------------------------------------
def contract_inputs(x, w, n_in: int, **kw):
    """x [..., *in] . w [*in, *out] -> [..., *out]: the last n_in axes of x against w's first n_in
    (jax.lax.dot_general; kw: its preferred_element_type)."""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, w, (contract, ((), ())), **kw)


def l2_norm(w, axes: tuple[int, ...]):
    """The L2 norm of w (fp32) over `axes`: a kernel's per-output-feature norm over its input axes."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes))


def lora_a_init(c: GLMConfig, n_in: int) -> Initializer:
    """LoRA A's init: "kaiming" is peft's default (torch's kaiming_uniform_ with a = sqrt(5) on A's
    [r, fan_in] weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))), "gaussian" peft's N(0, 1/r)."""
    if c.lora_init == "gaussian":
        return nn.initializers.normal(1.0 / c.lora_rank)

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(int(np.prod(shape[:n_in])))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def lora_dropped(module: nn.Module) -> bool:
    """Whether LoRA's input dropout is active in this call (a rate and a 'dropout' rng)."""
    return module.config.lora_dropout > 0.0 and module.has_rng("dropout")


def lora_input(module: nn.Module, x, in_shape: tuple[int, ...], in_axes: tuple) -> tuple[jax.Array, jax.Array]:
    """x -> (dropout(x), A `in_shape + (r,)`): the input side of a LoRA pair, created in `module`."""
    c = module.config
    n_in = len(in_shape)
    a = module.param(
        "lora_a",
        nn.with_logical_partitioning(lora_a_init(c, n_in), tuple(in_axes) + (None,)),
        in_shape + (c.lora_rank,),
        c.params_dtype,
    )
    return nn.Dropout(c.lora_dropout, deterministic=not lora_dropped(module))(x), a


class FusedLoRA(nn.Module):
    """peft's LoRA on a fused QKV weight (`lora_targets=query_key_value`): one A [E, r] and one
    dropout shared by query, key and value, each of which holds its own B (`Linear(lora_shared=)`).
    x [..., E] -> (dropout(x), A)."""

    config: GLMConfig

    @nn.compact
    def __call__(self, x):
        return lora_input(self, x.astype(self.config.compute_dtype), (x.shape[-1],), ("embed",))


class Linear(nn.Module):
    """y = x . kernel (+ bias), contracting the last `len(in_shape)` axes of x.

    kernel: `in_shape + features`, named `kernel_axes`; bias: `features`. The one dense layer of
    the model: quantized variants (quant.py) replace it through `GLMConfig`, nothing else changes.
    """

    in_shape: tuple[int, ...]
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool
    config: GLMConfig
    kernel_init: Initializer = nn.initializers.lecun_normal()
    quantizable: bool = True  # one of a layer's four linear weights (not the output head)

    @nn.compact
    def __call__(self, x, lora_shared=None):
        """x [..., *in_shape] -> [..., *features]. lora_shared: (dropout(x), A) of a fused LoRA
        target's one A (`FusedLoRA`); this layer then holds only its own B."""
        c = self.config
        x = self._ia3(x.astype(c.compute_dtype), on_input=True)
        if self.quantizable and c.quantization != "none":
            y = self._quantized(x)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                self.in_shape + self.features,
                c.params_dtype,
            )
            y = self._matmul(x, kernel)
        if self.lora_adapted:  # before the bias: DoRA rescales x W alone
            y = self._lora(x, y, lora_shared)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[len(self.in_shape) :]),
                self.features,
                c.params_dtype,
            )
            y = y + bias.astype(c.compute_dtype)
        return self._ia3(y, on_input=False)

    def _ia3(self, t, on_input: bool):
        """IA3 (Liu et al. 2022, as peft): t * l, l = `ia3_scale` (ones, so a new adapter leaves the
        layer unchanged), multiplied in fp32 as peft does with its fp32 vector. A target in
        `IA3_FEEDFORWARD` scales its input t = x [..., *in_shape] (l: in_shape), any other its
        output t = y [..., *features] (bias included; l: features). Otherwise t unchanged."""
        c = self.config
        if not (c.ia3 and self.quantizable and self.name in c.ia3_target_names):
            return t
        if (self.name in IA3_FEEDFORWARD) != on_input:
            return t
        n_in = len(self.in_shape)
        shape, axes = (self.in_shape, self.kernel_axes[:n_in]) if on_input else (self.features, self.kernel_axes[n_in:])
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), axes)
        scale = self.param("ia3_scale", ones, shape, c.params_dtype)
        return (t.astype(jnp.float32) * scale.astype(jnp.float32)).astype(c.compute_dtype)

    def _matmul(self, x, kernel):
        # fp32 out: under tensor parallelism a row-parallel layer's partial sums are reduced in
        # fp32 across shards, then rounded once (as one device accumulates them)
        return self._matmul_float(x, kernel).astype(self.config.compute_dtype)

    @property
    def lora_adapted(self) -> bool:
        c = self.config
        return bool(c.lora_rank) and self.quantizable and self.name in c.lora_target_names

    def _lora(self, x, y, shared=None):
        """LoRA (peft.py): y + s * B(A(dropout(x))), s = alpha / r (rsLoRA: alpha / sqrt(r)).
        A: `in_shape + (r,)`, peft's default init (`lora_init`); B: `(r,) + features`, zeros, so a
        new adapter leaves the layer unchanged. The frozen weight beside it may be float or
        quantized. y: x W [..., *features] (no bias). DoRA (`lora_dora`, Liu et al. 2024, as peft):
        (m / ||W + s A B||) (x W + s B(A(dropout(x)))) per output feature, the norm over the input
        axes and held constant in the backward pass; m = ||W|| + `lora_magnitude_delta` (zeros)."""
        c = self.config
        n_in, r = len(self.in_shape), c.lora_rank
        if shared is None:
            xd, a = lora_input(self, x, self.in_shape, self.kernel_axes[:n_in])
        else:
            xd, a = shared
        low = contract_inputs(xd, a.astype(c.compute_dtype), n_in)
        b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,) + self.kernel_axes[n_in:]),
            (r,) + self.features,
            c.params_dtype,
        )
        up = jnp.tensordot(low, b.astype(c.compute_dtype), axes=1) * jnp.asarray(c.lora_scaling, c.compute_dtype)
        if not c.lora_dora:
            return y + up
        delta = self.param(
            "lora_magnitude_delta",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[n_in:]),
            self.features,
            c.params_dtype,
        )
        w = self._float_kernel()
        lora_kernel = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1) * c.lora_scaling
        in_axes = tuple(range(n_in))
        norm = jax.lax.stop_gradient(l2_norm(w + lora_kernel, in_axes))
        scale = (l2_norm(w, in_axes) + delta.astype(jnp.float32)) / norm  # [*features]
        # dropout active: peft's base term is dropout(x) W
        base = self._matmul_float(xd, w) if lora_dropped(self) else y
        out = y.astype(jnp.float32) + (scale - 1.0) * base.astype(jnp.float32) + scale * up.astype(jnp.float32)
        return out.astype(c.compute_dtype)

    def _float_kernel(self):
        """The frozen weight in fp32 as `in_shape + features` (a quantized one dequantized)."""
        if self.quantizable and self.config.quantization != "none":
            q, scale = (nn.meta.unbox(self.get_variable("params", name)) for name in ("q", "scale"))
            n = int(np.prod(self.features))
            bits = 4 if self.config.quantization == "int4" else 8
            packed = quant.QuantizedWeight(q.reshape(q.shape[0], n), scale.reshape(scale.shape[0], n), bits)
            w = quant.dequantize(packed)
            return w.reshape(self.in_shape + self.features)
        return nn.meta.unbox(self.get_variable("params", "kernel")).astype(jnp.float32)

    def _matmul_float(self, x, w):
        """x [..., *in_shape] (compute dtype) . w (cast to it) -> fp32 [..., *features]."""
        return contract_inputs(x, w.astype(x.dtype), len(self.in_shape), preferred_element_type=jnp.float32)

    def _quantized(self, x):
        """Weight-only INT4/INT8: q [K(/2), *features] (the input dims flattened to K, INT4 packed
        in pairs along K) and scale [G, *features]; filled by quant.quantize_params."""
        c = self.config
        bits = 4 if c.quantization == "int4" else 8
        k = int(np.prod(self.in_shape))
        groups = c.scale_groups(k)
        in_axis = self.kernel_axes[0]
        out_axes = self.kernel_axes[len(self.in_shape) :]
        q = self.param(
            "q",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (in_axis,) + out_axes),
            (k // 2 if bits == 4 else k,) + self.features,
            jnp.uint8 if bits == 4 else jnp.int8,
        )
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (None,) + out_axes),
            (groups,) + self.features,
            jnp.float16,
        )
        x = x.reshape(x.shape[: x.ndim - len(self.in_shape)] + (k,))
        if out_axes[0] == "glu":
            # GeGLU / SwiGLU's [2, F] features: F goes over `tensor`, so [2 x F] flattened is no
            # contiguous split and the partitioner would gather the whole weight to every shard;
            # each half multiplies on its own instead
            halves = [self._quantized_matmul(x, q[:, i], scale[:, i], bits, out_axes[1:]) for i in range(2)]
            return jnp.stack(halves, axis=-1 - len(self.features[1:]))
        return self._quantized_matmul(x, q, scale, bits, out_axes)

    def _quantized_matmul(self, x, q, scale, bits: int, out_axes):
        """x [..., K] against q [K(/2), *features] / scale [G, *features] -> [..., *features]."""
        c = self.config
        features = q.shape[1:]
        n = int(np.prod(features))
        w = quant.QuantizedWeight(q.reshape(q.shape[0], n), scale.reshape(scale.shape[0], n), bits)
        split = quant.tensor_split((self.kernel_axes[0],) + tuple(out_axes), 1, features)  # the kernel per shard
        y = quant.dense(x, w, c.quantized_matmul, dtype=c.compute_dtype, split=split)
        return y.reshape(y.shape[:-1] + features)


# ---- normalisation ------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """Affine LayerNorm over the last axis, computed in fp32. x: [..., E] -> [..., E]."""

    config: GLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        e = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (e,), c.params_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (e,), c.params_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + c.layernorm_epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(c.compute_dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in fp32. x: [..., E] -> [..., E]."""

    config: GLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x.shape[-1],),
            c.params_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + c.layernorm_epsilon)
        return (y * scale.astype(jnp.float32)).astype(c.compute_dtype)


def make_norm(config: GLMConfig, name: str) -> nn.Module:
    return (LayerNorm if config.norm_kind == "layernorm" else RMSNorm)(config, name=name)


# ---- rotary positions ---------------------------------------------------------------------------
def rotary_table(positions, dim: int, config: GLMConfig):
    """cos, sin for `dim` rotated dims at integer `positions` [B, S] -> two [B, S, dim] fp32.

    Rotate-half layout (GLM-130B): frequencies [f0..f_{dim/2-1}] twice; interleaved (GLM-4):
    each frequency twice in a row. `rotary_fp16_inv_freq` rounds the inverse frequencies to fp16
    first (GLM-130B, ChatGLM-6B); with `rotary_fp16_angles` the angles are formed in fp16 as the
    reference's fp16 runs do.
    """
    inv_freq = scaled_inv_freq(1.0 / (config.rotary_base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)), config)
    if config.rotary_fp16_inv_freq:
        inv_freq = inv_freq.astype(np.float16).astype(np.float32)
    angle_dtype = jnp.float16 if config.rotary_fp16_angles else jnp.float32
    angles = positions.astype(angle_dtype)[..., None] * jnp.asarray(inv_freq, angle_dtype)
    angles = angles.astype(jnp.float32)
    if config.rotary_interleaved:
        angles = jnp.repeat(angles, 2, axis=-1)
    else:
        angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if config.rotary_fp16_angles:
        cos, sin = cos.astype(jnp.float16).astype(jnp.float32), sin.astype(jnp.float16).astype(jnp.float32)
    return cos, sin


def scaled_inv_freq(inv_freq: np.ndarray, config: GLMConfig) -> np.ndarray:
    """Rotary inverse frequencies [dim/2] fp32 after `rotary_scaling` (transformers' rope_scaling):
    linear divides them all by the factor; llama3 divides those with wavelengths above
    original_length / low_freq_factor, keeps those below original_length / high_freq_factor and
    blends linearly (in original_length / wavelength) between."""
    factor = np.float32(config.rotary_scaling_factor)
    if config.rotary_scaling == "linear":
        return (inv_freq / factor).astype(np.float32)
    if config.rotary_scaling != "llama3":
        return inv_freq
    low, high, length = config.rotary_low_freq_factor, config.rotary_high_freq_factor, config.rotary_original_length
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > length / low, inv_freq / factor, inv_freq)
    smooth = (length / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= length / high) & (wavelength <= length / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_tables(position_ids, block_position_ids, config: GLMConfig):
    """The (cos, sin) pairs the attention applies: one for 1D, two (position, block) for 2D, none
    without rotary positions (ALiBi, learned tables)."""
    if not config.rotary:
        return ()
    if config.position_encoding_2d:
        return (
            rotary_table(position_ids, config.rotary_dim, config),
            rotary_table(block_position_ids, config.rotary_dim, config),
        )
    return (rotary_table(position_ids, config.rotary_dim, config),)


def _rotate(x, cos, sin, interleaved: bool):
    """Rotate the first cos.shape[-1] dims of x [B, S, N, D] (fp32); the rest pass through."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    if interleaved:
        pairs = xr.reshape(xr.shape[:-1] + (r // 2, 2))
        turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)
    else:
        turned = jnp.concatenate([-xr[..., r // 2 :], xr[..., : r // 2]], axis=-1)
    out = xr * cos[:, :, None, :] + turned * sin[:, :, None, :]
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


def apply_rotary(x, tables, config: GLMConfig):
    """x: [B, S, N, D] -> same, rotated per `tables` from `rotary_tables` (2D: one per half; none: x)."""
    if not tables:
        return x
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if len(tables) == 2:
        half = x.shape[-1] // 2
        out = jnp.concatenate(
            [
                _rotate(x[..., :half], *tables[0], config.rotary_interleaved),
                _rotate(x[..., half:], *tables[1], config.rotary_interleaved),
            ],
            axis=-1,
        )
    else:
        out = _rotate(x, *tables[0], config.rotary_interleaved)
    return out.astype(dtype)


# ---- the GLM attention mask ---------------------------------------------------------------------
class GLMMask(NamedTuple):
    """GLM's mask as its per-position data, segment_ids and prefix_mask [B, S]: what the TPU flash
    kernel reads (`tpu_attention.py`); `dense()` is `glm_attention_mask`."""

    segment_ids: jax.Array
    prefix_mask: jax.Array

    def dense(self):
        return glm_attention_mask(self.segment_ids, self.prefix_mask)


def wants_flash(config: GLMConfig) -> bool:
    """Whether the layers get a `GLMMask` (the TPU kernel) rather than the dense mask. Not under
    context parallelism (`context_shards` > 1): the kernel takes whole sequences, so the XLA
    reference runs, its queries split over `context` (choosing the kernel there warns)."""
    if config.position_encoding == "alibi":
        return False
    flash = config.attention_impl == "pallas_tpu" or (config.attention_impl == "auto" and target_platform() == "tpu")
    if flash and context_shards() > 1:
        _warn_fallback(
            f"context parallelism ({context_shards()} context shards): the TPU kernel takes whole sequences; "
            "the XLA reference runs with its queries split over `context`",
            config.attention_impl,
        )
        return False
    return flash


def context_shards() -> int:
    """How many shards the current mesh's `context` axis splits each sequence into (1: none, or
    the axis is manual here). Read while tracing, under `jax.set_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "context" not in mesh.axis_names or "context" in mesh.manual_axes:
        return 1
    return int(mesh.shape["context"])


def glm_attention_mask(segment_ids, prefix_mask):
    """GLM's rule (docs/design.md#the-batch-contract): q sees k iff same nonzero segment and (k in part A or k <= q).

    segment_ids, prefix_mask: [B, S] int -> bool [B, 1, S, S] (query, key), built on device from
    the global positions: under context parallelism each shard builds its queries' rows
    [B, 1, S / C, S] (queries over `length`, keys whole over `kv_length`).
    """
    s = segment_ids.shape[-1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    visible = causal[None] | (prefix_mask[:, None, :] != 0)
    mask = (same & visible)[:, None]
    return context_constraint(mask, ("batch", None, "length", "kv_length"))


def context_constraint(x, names: tuple):
    """Under context parallelism x constrained to the logical `names` (queries over `context`,
    keys / values whole); otherwise x as it is, so meshes without a context axis place it as
    they always have."""
    return nn.with_logical_constraint(x, names) if context_shards() > 1 else x


# ---- attention ----------------------------------------------------------------------------------
_RECORDERS: list[dict[str, str]] = []


@contextlib.contextmanager
def recording_attention():
    """What attention each kind of layer compiled to, recorded while tracing:

        with recording_attention() as used:
            jax.jit(step).lower(*args)      # traces step
        used  # {"self": "pallas_tpu"}

    yields a dict, filled kind -> impl by every `SelfAttention` traced inside. kind: "self"
    (the full sequence), "prefix" (P-tuning prefix keys before it), "cached" (a KV cache: prefill
    and decode); impl: "pallas_tpu", "xla" or "cudnn" (two impls for one kind: both, sorted,
    joined by "+"). Only tracing records: `jax.jit` keeps a function's trace per argument shapes,
    and a function already traced (even under a fresh `jax.jit` of the same Python function) is
    not traced again, so the dict stays empty; lower a function not yet traced for these shapes
    (or call `jax.clear_caches()` first).
    """
    used: dict[str, str] = {}
    _RECORDERS.append(used)
    try:
        yield used
    finally:
        _RECORDERS.remove(used)


def _record(kind: str, impl: str):
    for used in _RECORDERS:
        used[kind] = "+".join(sorted(set(used.get(kind, impl).split("+")) | {impl}))


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [heads] (Press et al.; BLOOM's build_alibi_tensor): the geometric
    sequence 2^(-8/n), 2^(-16/n), ... for the largest power of two n <= heads, then every other
    term of the sequence for 2n for the heads beyond it."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * i / n) for i in range(1, 2 * (heads - n), 2)]
    return np.asarray(slopes, np.float32)


def alibi_bias(mask, heads: int):
    """ALiBi's score bias fp32 [B, H, S, T] for a visibility mask [B, 1, S, T]: slope_h times the
    key's position, the key's rank among the keys its query sees (positions count only visible
    keys, as BLOOM counts them from the attention mask). A constant per query cancels in the
    softmax, so this equals slope_h x (key position - query position) on any cache layout or
    packed row, and a prefix before the keys shifts nothing."""
    rank = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.asarray(alibi_slopes(heads))[None, :, None, None] * rank.astype(jnp.float32)


def xla_attention(q, k, v, mask, *, dropout_rate: float = 0.0, dropout_rng=None, alibi: bool = False):
    """Reference attention with grouped KV, fp32 softmax and the -10000 additive mask.

    q: [B, S, H, D]; k, v: [B, T, K, D]; mask: bool [B, 1, S, T] -> [B, S, H, D]. Dropout (rate
    > 0 and a key given) drops the probabilities `tpu_attention.dropout_keep` draws for global
    (batch row, query head, query, key) indices: the TPU kernel's entries for the same key.
    alibi: add `alibi_bias` to the scores (BLOOM).
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    if alibi:
        scores = scores + alibi_bias(mask, h).reshape(b, kv, h // kv, s, -1)
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        batch = tpu_attention.shard_offset(b, "data") + jnp.arange(b).reshape(b, 1, 1, 1, 1)
        head = tpu_attention.shard_offset(h, "tensor") + jnp.arange(h).reshape(1, kv, h // kv, 1, 1)
        query, key = jnp.arange(s)[:, None], jnp.arange(k.shape[1])[None, :]
        seed = tpu_attention.dropout_seed(dropout_rng)
        keep = tpu_attention.dropout_keep(seed, batch, head, query, key, dropout_rate)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)
    return out.reshape(b, s, h, d)


def cudnn_attention(q, k, v, mask):
    """Fused attention (cuDNN flash attention through `jax.nn.dot_product_attention`).

    Same shapes and result as `xla_attention` without dropout; needs a GPU and fp16/bf16.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), implementation="cudnn")


@functools.cache  # once per process and reason, not on every trace
def _warn_fallback(reason: str, impl: str):
    warnings.warn(f"attention_impl={impl!r} falls back to the XLA reference: {reason}", stacklevel=3)


def choose_attention(config: GLMConfig, dropout_active: bool) -> str:
    """'xla' or 'cudnn' for this config on the platform being compiled for (`target.py`;
    cuDNN needs a GPU, 16-bit, no dropout). Falling back from cuDNN warns, under `auto` too
    (where a GPU is the target: elsewhere XLA is auto's choice, not a fallback)."""
    impl = config.attention_impl
    if config.position_encoding == "alibi":
        if impl != "xla" and (impl != "auto" or target_platform() != "cpu"):
            _warn_fallback("ALiBi (position_encoding=alibi) has no fused kernel: the XLA reference runs", impl)
        return "xla"
    if impl in ("xla", "pallas_tpu"):  # pallas_tpu here: the dense mask was needed (cache, prefix)
        return "xla"
    reason = None
    if target_platform() != "gpu":
        reason = f"the target platform is {target_platform()}, not gpu"
    elif config.dtype not in ("bfloat16", "float16"):
        reason = f"dtype={config.dtype}; cuDNN flash attention takes bfloat16/float16"
    elif dropout_active:
        reason = "attention dropout is active (cuDNN path has none)"
    if reason is None:
        return "cudnn"
    if impl == "cudnn" or target_platform() == "gpu":
        _warn_fallback(reason, impl)
    return "xla"


def write_cache(cache, new, index):
    """cache [B, M, ...] with new [B, S, ...] written at slot `index`: a scalar (every row at the
    same slot) or [B] (row b at index[b]: continuous batching's slots, each at its own length)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache, new, index)


class SelfAttention(nn.Module):
    """Multi-head / grouped / multi-query self-attention with rotary positions.

    x: [B, S, E]; mask: bool [B, 1, S, S]; tables from `rotary_tables` -> ([B, S, E], cache).
    Parameters: query [E, H, D], key/value [E, K, D], dense [H, D, E] (whole heads per slice,
    so tensor parallelism over `heads` never splits one).

    prefix: P-tuning v2 keys/values [P, 2, K, D] (`PrefixEncoder`, not rotated) put before this
    sequence's keys; every query sees all of them. Generation puts them in the cache instead.

    With a KV cache (k, v: [B, M, K, D]) the queries attend over the cache with the new
    keys/values (after rotary) placed at `cache_index` (mask [B, 1, S, M]), and the second
    output is just those new entries (k, v: [B, S, K, D]): the caller writes them into its
    stacked cache in place, rather than every layer emitting a whole updated copy.
    """

    config: GLMConfig

    @nn.compact
    def __call__(self, x, mask, tables, cache=None, cache_index=None, prefix=None):
        c = self.config
        e, h, kv, d = x.shape[-1], c.num_attention_heads, c.num_kv_heads, c.head_dim
        plain = xavier_normal(1.0, 0, (1, 2))
        scaled = xavier_normal(c.deepnorm_beta, 0, (1, 2))
        shared = FusedLoRA(c, name="query_key_value")(x) if c.lora_rank and c.lora_fused_qkv else None
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), c.qkv_bias, c, plain, name="query")(x, shared)
        k = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, c, plain, name="key")(x, shared)
        v = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, c, scaled, name="value")(x, shared)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        q, k = apply_rotary(q, tables, c), apply_rotary(k, tables, c)
        # context parallelism: the queries stay split over `context`, the keys and values are
        # all-gathered; pinned split first, so their gradients are reduce-scattered back there
        # (else XLA may gather the layer's input to form the K/V weight gradients); without a
        # context axis a no-op
        k, v = (
            context_constraint(
                context_constraint(t, ("batch", "length", "kv_heads", "head_dim")),
                ("batch", "kv_length", "kv_heads", "head_dim"),
            )
            for t in (k, v)
        )

        def project(out):
            # under context parallelism, pin the output (and so its cotangent) to queries over
            # `context` and heads over `tensor`, the layout the scores have
            out = context_constraint(out, ("batch", "length", "heads", "head_dim"))
            out = checkpoint_name(out, "attention_context")
            return Linear(
                (h, d),
                (e,),
                ("heads", "head_dim", "embed"),
                c.attention_dense_bias,
                c,
                xavier_normal(c.deepnorm_beta, (0, 1), 2),
                name="dense",
            )(out)

        dropout_active = c.attention_dropout > 0.0 and self.has_rng("dropout")
        rng = self.make_rng("dropout") if dropout_active else None
        kind = "cached" if cache is not None else "prefix" if prefix is not None else "self"
        if isinstance(mask, GLMMask):  # pallas_tpu, or auto on a TPU
            why = tpu_attention.unsupported(q.shape, k.shape, kind != "self")
            if why is None:
                _record(kind, "pallas_tpu")
                out = tpu_attention.on_mesh(
                    q, k, v, mask.segment_ids, mask.prefix_mask, dropout_rate=c.attention_dropout, dropout_rng=rng
                )
                return project(out), cache
            _warn_fallback(why, c.attention_impl)
            mask = mask.dense()
        if cache is not None:
            new = (k.astype(cache[0].dtype), v.astype(cache[1].dtype))
            k, v = (write_cache(old, n, cache_index).astype(q.dtype) for old, n in zip(cache, new))
            cache = new
        if prefix is not None:
            b, p = k.shape[0], prefix.shape[0]
            k, v = (
                jnp.concatenate(
                    [jnp.broadcast_to(prefix[None, :, i].astype(k.dtype), (b,) + prefix[:, i].shape), t], axis=1
                )
                for i, t in enumerate((k, v))
            )
            mask = jnp.concatenate([jnp.ones(mask.shape[:3] + (p,), bool), mask], axis=-1)
        impl = choose_attention(c, dropout_active)
        _record(kind, impl)
        if impl == "cudnn":
            out = cudnn_attention(q, k, v, mask)
        else:
            out = xla_attention(
                q, k, v, mask, dropout_rate=c.attention_dropout, dropout_rng=rng, alibi=c.position_encoding == "alibi"
            )
        return project(out), cache


# ---- feed-forward -------------------------------------------------------------------------------
def _exact_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _tanh_gelu(x):
    return jax.nn.gelu(x, approximate=True)


class FeedForward(nn.Module):
    """GeGLU / SwiGLU / GeLU / ReLU FFN. x: [B, S, E] -> [B, S, E].

    Gated kinds keep h_to_4h as [E, 2, F]: index 0 is the reference's first output half, 1 the
    second, so value column i and its gate column i share a slice of the `mlp` axis.
    GeGLU (GLM-130B): out = first * gelu(second); SwiGLU (ChatGLM2, GLM-4): silu(first) * second.
    """

    config: GLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        e, f = x.shape[-1], c.inner_hidden_size
        init = xavier_normal(c.deepnorm_beta, 0, (1, 2) if c.gated_ffn else 1)
        if c.gated_ffn:
            hh = Linear((e,), (2, f), ("embed", "glu", "mlp"), c.ffn_bias, c, init, name="dense_h_to_4h")(x)
            first, second = hh[..., 0, :], hh[..., 1, :]
            if c.ffn_kind == "geglu":
                hh = first * _exact_gelu(second)
            else:
                hh = jax.nn.silu(first) * second
        else:
            hh = Linear((e,), (f,), ("embed", "mlp"), c.ffn_bias, c, init, name="dense_h_to_4h")(x)
            hh = {"gelu": _exact_gelu, "gelu_tanh": _tanh_gelu, "relu": jax.nn.relu}[c.ffn_kind](hh)
        hh = nn.with_logical_constraint(hh, ("batch", "length", "mlp"))
        return Linear(
            (f,), (e,), ("mlp", "embed"), c.ffn_bias, c, xavier_normal(c.deepnorm_beta, 0, 1), name="dense_4h_to_h"
        )(hh)


# ---- P-tuning v2 ---------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """P-tuning v2's prefix: keys/values of `pre_seq_len` virtual tokens for every layer.

    () -> [L, P, 2, K, D] in the compute dtype. Without projection one embedding [P, L, 2, K, D]
    (ChatGLM's [P, layers x 2 x kv_heads x head_dim], torch's N(0, 1) init); with
    `prefix_projection` an embedding [P, E] -> Linear -> tanh -> Linear (ChatGLM-6B's
    `trans`). Dropout `prefix_dropout` on the result when a 'dropout' rng is given.
    """

    config: GLMConfig

    @nn.compact
    def __call__(self):
        c = self.config
        p, kv_shape = c.pre_seq_len, (c.num_layers, 2, c.num_kv_heads, c.head_dim)
        kv_axes = (None, None, "kv_heads", "head_dim")
        if c.prefix_projection:
            width = c.prefix_hidden_size or c.hidden_size
            emb = self.param(
                "embedding",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                (p, c.hidden_size),
                c.params_dtype,
            )
            h = jnp.tanh(
                Linear((c.hidden_size,), (width,), ("embed", "mlp"), True, c, name="trans_in", quantizable=False)(emb)
            )
            kv = Linear((width,), kv_shape, ("mlp",) + kv_axes, True, c, name="trans_out", quantizable=False)(h)
        else:
            kv = self.param(
                "embedding",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None,) + kv_axes),
                (p,) + kv_shape,
                c.params_dtype,
            )
        kv = nn.Dropout(c.prefix_dropout, deterministic=not self.has_rng("dropout"))(kv)
        return jnp.moveaxis(kv, 1, 0).astype(c.compute_dtype)


# ---- bottleneck adapters (Houlsby et al. 2019) ---------------------------------------------------
class Bottleneck(nn.Module):
    """A bottleneck adapter: z + up(swish(down(z))). z: [..., E] -> [..., E].

    down: kernel [E, m] + bias [m]; up: kernel [m, E] + bias [E]; m = `adapter_size`. up is zeros,
    so a new adapter is the identity; down starts near zero as Houlsby's (N(0, 1e-2) truncated at
    two standard deviations, section 3.6), biases zeros. swish is the non-linearity of adapters'
    HoulsbyConfig (`DoubleSeqBnConfig`). E on `embed` like the layer; the bottleneck axis is
    replicated (m need not divide the tensor axis; the adapter's matmuls are ~2m/(12E) of a layer's).
    """

    config: GLMConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        e, m = z.shape[-1], c.adapter_size
        near_zero, zeros = nn.initializers.truncated_normal(1e-2), nn.initializers.zeros_init()
        down = Linear((e,), (m,), ("embed", None), True, c, near_zero, quantizable=False, name="down")
        up = Linear((m,), (e,), (None, "embed"), True, c, zeros, quantizable=False, name="up")
        return z + up(jax.nn.silu(down(z)))


# ---- the block ----------------------------------------------------------------------------------
class GLMBlock(nn.Module):
    """One GLM layer. h: [B, S, E] -> ([B, S, E], new KV entries or None) (scan carry, scan output).

    DeepNorm (GLM-130B): x = LN_in(h); h = alpha*x + Attn(x); y = LN_post(h); out = alpha*y + FFN(y),
    alpha = sqrt(2N): the residual carries the LayerNorm output. Pre-LN: h + Attn(LN(h)), etc.
    Dropout (hidden and attention) is on exactly when a 'dropout' rng is given. With
    `adapter_size` a `Bottleneck` adapts each sublayer's output after its dropout, before the
    residual: alpha*x + A(drop(Attn(x))), as Houlsby's adapter-bert and adapters place it.
    """

    config: GLMConfig

    @nn.compact
    def __call__(self, h, mask, tables, cache=None, cache_index=None, prefix=None):
        c = self.config
        drop = nn.Dropout(c.hidden_dropout, deterministic=not self.has_rng("dropout"))
        attention = SelfAttention(c, name="attention")
        mlp = FeedForward(c, name="mlp")
        norm_in, norm_post = make_norm(c, "input_layernorm"), make_norm(c, "post_attention_layernorm")
        # the residual stream; with sequence parallelism its positions are split over `tensor`, so
        # the partitioner gathers before attention / MLP and reduce-scatters after them
        residual = lambda t: nn.with_logical_constraint(t, ("batch", "sequence", "embed"))  # noqa: E731
        if c.adapter_size:
            adapt_attn, adapt_mlp = Bottleneck(c, name="attention_adapter"), Bottleneck(c, name="mlp_adapter")
        else:
            adapt_attn = adapt_mlp = lambda t: t  # noqa: E731
        if c.norm_placement == "deepnorm":
            # alpha * x in fp32, then rounded: the reference scales by a Python float, never by
            # alpha rounded to the compute dtype (sqrt(56) in bf16 is off by 0.2%)
            scaled = lambda t: (t.astype(jnp.float32) * c.deepnorm_alpha).astype(c.compute_dtype)
            x = norm_in(h)
            attn, cache = attention(x, mask, tables, cache, cache_index, prefix)
            h = residual(scaled(x) + adapt_attn(drop(attn)))
            y = norm_post(h)
            out = scaled(y) + adapt_mlp(drop(mlp(y)))
        else:
            attn, cache = attention(norm_in(h), mask, tables, cache, cache_index, prefix)
            h = residual(h + adapt_attn(drop(attn)))
            out = h + adapt_mlp(drop(mlp(norm_post(h))))
        out = residual(out.astype(c.compute_dtype))
        return out, cache
