"""INT4 / INT8 weight-only quantization (docs/reference.md section 6): quantize, pack, dequant-matmul.

Scheme: symmetric absmax per output column of our [K_in, N_out] kernels (= per output row of the
reference's torch [out, in] weights), optionally in groups of `group` along the input dimension:
scale = max|w| / (2^(b-1) - 1), q = round(w / scale); INT4 in -7..7 (-8 unused), INT8 in
-127..127; scales in fp16 (or bf16). INT4 packs two values per byte along the INPUT dimension
with the even-index element in the high nibble (GLM-130B's byte layout), unpacked with sign
extension. `to_glm130b_int4` / `from_glm130b_int4` convert to and from the reference's
(int8 [out, in/2], fp16 scale [out]) exactly.

Shapes: w [K, N] float; packed int4 [K/2, N] uint8; int8 [K, N] int8; scale [G, N] (G groups
along K, G = 1 per column).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glm_jax.sharding import LOGICAL_RULES
from glm_jax.target import target_platform

QMAX = {4: 7, 8: 127}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """A quantized [K, N] weight: `q` (packed uint8 [K/2, N] for 4 bits, int8 [K, N] for 8) and
    `scale` [G, N]."""

    q: jax.Array
    scale: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True), default=4)

    @property
    def shape(self) -> tuple[int, int]:
        k = self.q.shape[0] * (2 if self.bits == 4 else 1)
        return k, self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def quantize(w, bits: int = 4, group: int | None = None, scale_dtype=jnp.float16) -> QuantizedWeight:
    """Symmetric absmax quantization of w [K, N] per output column (and per `group` rows of K)."""
    if bits not in QMAX:
        raise ValueError(f"bits={bits}; choose 4 or 8")
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    g = group or k
    if k % g:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {g}")
    if bits == 4 and (k % 2 or g % 2):
        raise ValueError(f"INT4 packs pairs along the input dimension: {k} (group {g}) must be even")
    wg = w.reshape(k // g, g, n)
    scale = (jnp.max(jnp.abs(wg), axis=1) / QMAX[bits]).astype(scale_dtype)  # [G, N]
    safe = jnp.where(scale == 0, 1, scale).astype(jnp.float32)
    q = jnp.clip(jnp.round(wg / safe[:, None, :]), -QMAX[bits], QMAX[bits]).astype(jnp.int8).reshape(k, n)
    return QuantizedWeight(pack_int4(q) if bits == 4 else q, scale, bits)


def pack_int4(q) -> jax.Array:
    """int8 values in -8..7, [K, N] -> uint8 [K/2, N]: row 2j in the high nibble, 2j+1 in the low."""
    q = jnp.asarray(q, jnp.int8).astype(jnp.uint8)
    return (q[0::2] << 4) | (q[1::2] & 0xF)


def nibbles(packed) -> tuple[jax.Array, jax.Array]:
    """uint8 [K/2, N] -> (high, low) int8 [K/2, N], sign-extended by arithmetic shifts of the
    signed byte: the values of the even and of the odd input rows."""
    b = jnp.asarray(packed, jnp.uint8).astype(jnp.int8)
    return b >> 4, (b << 4) >> 4


def unpack_int4(packed) -> jax.Array:
    """uint8 [K/2, N] -> int8 [K, N] (rows interleaved back: 2j from the high nibble)."""
    high, low = nibbles(packed)
    return jnp.stack([high, low], axis=1).reshape((-1,) + high.shape[1:])


def int_values(w: QuantizedWeight) -> jax.Array:
    return unpack_int4(w.q) if w.bits == 4 else w.q


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    q = int_values(w).astype(jnp.float32)
    g = w.scale.shape[0]
    k, n = q.shape
    return (q.reshape(g, k // g, n) * w.scale.astype(jnp.float32)[:, None, :]).reshape(k, n).astype(dtype)


def matmul(x, w: QuantizedWeight, dtype=jnp.bfloat16) -> jax.Array:
    """x [..., K] @ dequant(w) -> [..., N], the portable XLA path. INT4 is two dots, the even
    columns of x against the high nibbles and the odd against the low, so each weight operand
    is a plain elementwise function of the packed bytes (shift, convert) that XLA can fuse into
    its GEMM instead of materialising an interleaved [K, N] copy; scales apply after the dots."""
    x = x.astype(dtype)
    if w.bits == 4:
        high, low = nibbles(w.q)
        parts = ((x[..., 0::2], high), (x[..., 1::2], low))
    else:
        parts = ((x, w.q),)
    g, n = w.scale.shape
    scale = w.scale.astype(jnp.float32)
    if g == 1:
        y = sum(jnp.dot(xp, qp.astype(dtype), preferred_element_type=jnp.float32) for xp, qp in parts)
        return (y * scale[0]).astype(dtype)
    y = sum(
        jnp.einsum(
            "...gk,gkn->...gn",
            xp.reshape(xp.shape[:-1] + (g, -1)),
            qp.reshape(g, -1, n).astype(dtype),
            preferred_element_type=jnp.float32,
        )
        for xp, qp in parts
    )
    return jnp.sum(y * scale, axis=-2).astype(dtype)


# ---- GLM-130B's checkpoint format ------------------------------------------------------------------------
def to_glm130b_int4(w_torch) -> tuple[np.ndarray, np.ndarray]:
    """A torch-layout [out, in] float weight -> the reference's (int8 [out, in/2], fp16 scale [out])."""
    w = np.asarray(w_torch, np.float32)
    qw = quantize(w.T, bits=4)
    return np.asarray(qw.q).T.view(np.int8).copy(), np.asarray(qw.scale[0], np.float16)


def from_glm130b_int4(packed_torch, scale) -> QuantizedWeight:
    """The reference's (int8 [out, in/2], fp16 [out]) -> our QuantizedWeight over [in, out]."""
    packed = np.ascontiguousarray(np.asarray(packed_torch).view(np.uint8).T)
    return QuantizedWeight(jnp.asarray(packed), jnp.asarray(np.asarray(scale, np.float16))[None, :], 4)


# ---- whole parameter trees ------------------------------------------------------------------------------------
LAYER_LINEARS = {
    ("attention", "query"): 1,
    ("attention", "key"): 1,
    ("attention", "value"): 1,
    ("attention", "dense"): 2,
    ("mlp", "dense_h_to_4h"): 1,
    ("mlp", "dense_4h_to_h"): 1,
}


def quantize_params(params: dict, config, shardings: dict | None = None, consume: bool = False) -> dict:
    """A float parameter tree -> the tree of `config` (quantization int4/int8): the four linear
    weights of every layer quantized (kernel -> q, scale); embeddings, norms and biases stay
    16-bit (fp16 when config.param_dtype is float16, else bf16).

    Layer by layer: one layer's kernel is taken to fp32 and quantized at a time, written into
    the stacked q / scale arrays in place, so the temporaries are one layer's. shardings: the
    quantized config's parameter shardings on a mesh (`placement.param_shardings`): every output
    leaf is placed there and each device holds its share; per-output-column scales are taken over
    the whole input rows of a group (a max across shards), so the bytes equal a one-device run's.
    consume: each float kernel stack is deleted once its layers are quantized, so the peak is the
    float weights plus one linear's quantized stack (the caller must not use `params` again)."""
    bits = {"int4": 4, "int8": 8}[config.quantization]
    rest = jnp.float16 if config.param_dtype == "float16" else jnp.bfloat16
    layers = params["layers"]
    kernels = {("layers", block, name, "kernel") for block, name in LAYER_LINEARS}  # replaced below
    out = _map_with_path(lambda path, x: x if path in kernels else jnp.asarray(x).astype(rest), params)
    if shardings is not None:
        out = _place_like(out, shardings)
    for (block, name), n_in in LAYER_LINEARS.items():
        kernel = layers[block][name]["kernel"]  # [L, *in, *out]
        n_layers, in_shape, out_shape = kernel.shape[0], kernel.shape[1 : 1 + n_in], kernel.shape[1 + n_in :]
        k = int(np.prod(in_shape))
        group = k // config.scale_groups(k)
        flat = jax.ShapeDtypeStruct((k, int(np.prod(out_shape))), jnp.float32)
        one = jax.eval_shape(lambda w: quantize(w, bits, group), flat)
        q_shape = (n_layers, one.q.shape[0]) + out_shape
        scale_shape = (n_layers, one.scale.shape[0]) + out_shape
        if shardings is None:
            target = None
        else:
            target = (shardings["layers"][block][name]["q"], shardings["layers"][block][name]["scale"])
        q, scale = _zeros((q_shape, one.q.dtype), (scale_shape, one.scale.dtype), target)
        into = functools.partial(_quantize_layer, bits=bits, group=group, n_in=n_in)
        into = jax.jit(into, donate_argnums=(0, 1), **({} if target is None else {"out_shardings": target}))
        for layer in range(n_layers):
            q, scale = into(q, scale, kernel, jnp.int32(layer))
        if consume and isinstance(kernel, jax.Array):
            kernel.delete()
        entry = {key: value for key, value in out["layers"][block][name].items() if key != "kernel"}
        out["layers"][block][name] = {**entry, "q": q, "scale": scale}
    return out


def _map_with_path(fn, tree: dict, path: tuple = ()) -> dict:
    return {
        key: _map_with_path(fn, value, path + (key,)) if isinstance(value, dict) else fn(path + (key,), value)
        for key, value in tree.items()
    }


def _place_like(tree: dict, shardings: dict) -> dict:
    """Put the leaves of `tree` in the shardings of the same paths (a kernel about to be replaced
    by q / scale has none: left where it is)."""
    return {
        key: _place_like(value, shardings[key])
        if isinstance(value, dict)
        else (jax.device_put(value, shardings[key]) if key in shardings else value)
        for key, value in tree.items()
    }


def _zeros(q_spec, scale_spec, shardings):
    make = lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in (q_spec, scale_spec))
    return jax.jit(make, out_shardings=shardings)() if shardings is not None else make()


def _quantize_layer(q, scale, kernel, layer, *, bits: int, group: int, n_in: int):
    """Quantize layer `layer` of the stacked kernel [L, *in, *out] into q / scale [L, ...] in place."""
    weight = jax.lax.dynamic_index_in_dim(kernel, layer, 0, keepdims=False).astype(jnp.float32)
    k = int(np.prod(weight.shape[:n_in]))
    packed = quantize(weight.reshape(k, -1), bits, group)
    q = jax.lax.dynamic_update_index_in_dim(q, packed.q.reshape(q.shape[1:]).astype(q.dtype), layer, 0)
    scale = jax.lax.dynamic_update_index_in_dim(scale, packed.scale.reshape(scale.shape[1:]), layer, 0)
    return q, scale


def dequantize_params(params: dict, config) -> dict:
    """The inverse of `quantize_params` up to rounding: every q/scale pair back to a float32 kernel
    [L, *in, *out] (for export, or to fine-tune a quantized model's dequantized weights)."""
    bits = {"int4": 4, "int8": 8}[config.quantization]
    out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    for (block, name), n_in in LAYER_LINEARS.items():
        entry = out["layers"][block][name]
        q, scale = np.asarray(params["layers"][block][name]["q"]), np.asarray(params["layers"][block][name]["scale"])
        n_layers, out_shape = q.shape[0], q.shape[2:]
        k = q.shape[1] * (2 if bits == 4 else 1)
        in_shape = (k,) if n_in == 1 else (config.num_attention_heads, config.head_dim)
        kernels = [
            np.asarray(
                dequantize(QuantizedWeight(q[i].reshape(q.shape[1], -1), scale[i].reshape(scale.shape[1], -1), bits))
            ).reshape(in_shape + out_shape)
            for i in range(n_layers)
        ]
        out["layers"][block][name] = {
            **{k2: v for k2, v in entry.items() if k2 not in ("q", "scale")},
            "kernel": np.stack(kernels),
        }
    return out


def tree_bytes(tree) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (global arrays counted once)."""
    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


# ---- the fused Pallas kernel --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """Tiling of `pallas_matmul`: output tiles [block_m, block_n], K walked in steps of block_k
    (block_k/2 packed rows), split over `split_k` programs whose fp32 partial sums XLA adds;
    Triton's warps per program and software-pipelining stages. block_m 0: the smallest power
    of two >= M in [16, 64]. split_k 0: enough splits (<= 8) for about TARGET_PROGRAMS programs,
    so a short-N decode matmul still keeps every SM streaming weights."""

    block_m: int = 0
    block_n: int = 64
    block_k: int = 256
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


TARGET_PROGRAMS = 264  # two per SM of an H100 (132 SMs)
PALLAS_MAX_TOKENS = 64  # above this many rows the matmul is compute-bound: XLA's GEMM wins


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _resolve(blocks: KernelBlocks, m: int, k: int, n: int, groups: int) -> KernelBlocks:
    """Fill the automatic fields (block_m, split_k) and clamp block_n/block_k to the weight."""
    bm = blocks.block_m or min(64, max(16, 1 << (m - 1).bit_length()))
    bn = min(blocks.block_n, n & -n)
    bk = min(blocks.block_k, k // groups if groups > 1 else 1 << (k.bit_length() - 1))
    split = blocks.split_k
    if not split:
        tiles = -(-m // bm) * (n // max(bn, 1))
        split = 1
        while (
            split < 8
            and tiles * split * 2 <= TARGET_PROGRAMS
            and k // (bk * split * 2) >= 1
            and (groups == 1 or groups % (split * 2) == 0)
        ):
            split *= 2
    return dataclasses.replace(blocks, block_m=bm, block_n=bn, block_k=bk, split_k=split)


def _int4_kernel(xe_ref, xo_ref, q_ref, s_ref, o_ref, *, half: int, steps: int, group_steps: int):
    """One [bm, bn] fp32 partial sum over this program's share of K: `steps` steps of `half`
    packed rows, unpacked in registers (high nibble = even input rows, low = odd) and met by
    the even/odd columns of x in two MMAs; per-group scales applied per step when grouped
    (group_steps steps per group), else by the caller after the split-K sum.

    xe_ref, xo_ref [bm, steps*half]; q_ref [steps*half, bn] packed; s_ref [G/split_k, bn]."""
    import jax.experimental.pallas as pl

    def body(i, acc):
        rows = pl.ds(pl.multiple_of(i * half, half), half)
        high, low = nibbles(q_ref[rows, :])
        part = jnp.dot(xe_ref[:, rows], high.astype(xe_ref.dtype), preferred_element_type=jnp.float32)
        part += jnp.dot(xo_ref[:, rows], low.astype(xo_ref.dtype), preferred_element_type=jnp.float32)
        if group_steps:
            part = part * s_ref[pl.ds(i // group_steps, 1), :].astype(jnp.float32)
        return acc + part

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def pallas_supports(m: int, k: int, n: int, groups: int, blocks: KernelBlocks = KernelBlocks()) -> str | None:
    """None when `pallas_matmul` takes x [M, K] and a [K, N] INT4 weight with `groups` scale
    groups with these blocks; else the reason it does not (the caller then uses the XLA path)."""
    r = _resolve(blocks, m, k, n, groups)
    bn, bk, split = r.block_n, r.block_k, r.split_k
    if bn < 16:
        return f"N={n} has no power-of-two tile >= 16 (Triton's MMA minimum)"
    if not (_pow2(bk) and bk >= 32 and _pow2(split)):
        return f"block_k={bk} (a power of two >= 32) and split_k={split} (a power of two) are required"
    if groups > 1:
        group = k // groups
        if group % bk or not _pow2(bk) or groups % split:
            return f"group size {group} with block_k={bk}, split_k={split} does not tile K={k}"
    elif k // (bk * split) == 0:
        return f"K={k} is shorter than block_k*split_k={bk * split}"
    return None


def pallas_matmul(
    x, w: QuantizedWeight, dtype=jnp.bfloat16, blocks: KernelBlocks = KernelBlocks(), interpret: bool | None = None
) -> jax.Array:
    """x [M, K] @ dequant(w) [K, N] -> [M, N] with a Pallas (Triton) kernel that reads each
    packed INT4 weight byte once, unpacks and scales in registers, and accumulates in fp32.

    The weight is never copied or padded: N is tiled by a power of two dividing it, K by
    block_k * split_k, and a K tail shorter than that (per-row scales only) goes through the
    XLA path on its few rows. Ragged M is padded (x is small). Runs in interpret mode off-GPU
    (the CPU tests); lowers through Triton on NVIDIA GPUs. One device's kernel: on a mesh,
    `sharded_pallas_matmul` runs it per shard."""
    return _pallas_fp32(x, w, dtype, blocks, interpret).astype(dtype)


def _pallas_fp32(x, w: QuantizedWeight, dtype, blocks: KernelBlocks, interpret: bool | None, scaled: bool = True):
    """`pallas_matmul` before its final cast: the fp32 [M, N] product. scaled=False leaves out the
    per-output-column scale of an ungrouped weight (G = 1), for a caller that sums partial
    products across shards first; grouped scales are always applied, per group, in the kernel."""
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if w.bits != 4:
        raise ValueError("pallas_matmul takes INT4 weights; INT8 uses the XLA path")
    k, n = w.shape
    g = w.scale.shape[0]
    m = x.shape[0]
    if (why := pallas_supports(m, k, n, g, blocks)) is not None:
        raise ValueError(f"pallas_matmul cannot tile this weight: {why}")
    if interpret is None:
        interpret = target_platform() != "gpu"
        if interpret:
            _warn_interpret()
    r = _resolve(blocks, m, k, n, g)
    bm, bn, bk, split = r.block_m, r.block_n, r.block_k, r.split_k
    steps = k // (bk * split)  # per split
    k_main = steps * bk * split
    mp = -(-m // bm) * bm
    x = jnp.pad(x.astype(dtype), ((0, mp - m), (0, 0)))
    xe, xo = x[:, 0:k_main:2], x[:, 1:k_main:2]  # even / odd input columns meet the high / low nibbles
    rows = steps * bk // 2
    kernel = functools.partial(_int4_kernel, half=bk // 2, steps=steps, group_steps=(k // g) // bk if g > 1 else 0)
    partial = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn, split),
        in_specs=[
            pl.BlockSpec((bm, rows), lambda i, j, s: (i, s)),
            pl.BlockSpec((bm, rows), lambda i, j, s: (i, s)),
            pl.BlockSpec((rows, bn), lambda i, j, s: (s, j)),
            pl.BlockSpec((g // split if g > 1 else 1, bn), lambda i, j, s: (s if g > 1 else 0, j)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, mp, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=r.num_warps, num_stages=r.num_stages),
        interpret=interpret,
    )(xe, xo, w.q, w.scale)
    y = jnp.sum(partial, axis=0)[:m]
    if g == 1:
        if k_main < k:  # the K tail: a few rows, XLA
            tail = QuantizedWeight(w.q[k_main // 2 :], jnp.ones_like(w.scale), 4)
            y = y + matmul(x[:m, k_main:], tail, dtype=jnp.float32).astype(jnp.float32)
        if scaled:
            y = y * w.scale[0].astype(jnp.float32)
    return y


@functools.cache
def _warn_interpret():
    warnings.warn(
        "the Pallas INT4 kernel runs in interpret mode without an NVIDIA GPU: correct but slow; "
        "set quantized_matmul=xla (or auto) for speed here",
        stacklevel=3,
    )


# ---- the kernel on a mesh -------------------------------------------------------------------------------------
TENSOR_AXES = frozenset(logical for logical, physical in LOGICAL_RULES if physical == "tensor")


@dataclasses.dataclass(frozen=True)
class Split:
    """How a layer's [K, N] weight is cut over the mesh's `tensor` axis (what its logical axes
    make of it, `tensor_split`). dim "n": column-parallel, N viewed as [outer, parts, inner] with
    the parts split (a query's [heads, head_dim]: inner = head_dim; a GLU's [2, F]: outer = 2);
    dim "k": row-parallel, K (and INT4's packed rows) cut in contiguous blocks, whole scale groups
    per shard (or, with more shards than groups, every shard inside one group)."""

    dim: str
    outer: int = 1
    inner: int = 1

    def __post_init__(self):
        if self.dim not in ("n", "k"):
            raise ValueError(f"Split dim {self.dim!r}: 'n' (column-parallel) or 'k' (row-parallel)")


def tensor_split(kernel_axes, n_in: int, features) -> Split | None:
    """The `Split` of a `Linear` with these logical kernel axes (in axes, then out axes) and output
    `features` under the logical rules (sharding.LOGICAL_RULES): row-parallel when its first input
    axis goes over `tensor`, column-parallel when an output axis does, else None (replicated)."""
    if kernel_axes[0] in TENSOR_AXES:
        return Split("k")
    out_axes = tuple(kernel_axes[n_in:])
    for i, axis in enumerate(out_axes):
        if axis in TENSOR_AXES:
            return Split("n", int(np.prod(features[:i], dtype=int)), int(np.prod(features[i + 1 :], dtype=int)))
    return None


def mesh_of(w: QuantizedWeight):
    """The mesh the weight is on inside a trace or out of one: the mesh in context (`jax.set_mesh`)
    or else the one its type carries (a NamedSharding's); None on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(w.q), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or int(np.prod(list(mesh.shape.values()), dtype=int)) == 1:
        return None
    return mesh


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How the kernel runs per shard of `mesh`: x's rows over `rows` (the data axis when it
    divides M, else None), the weight cut by `split` over `tensor` (split None: whole on every
    shard), `local` the (M, K, N, groups) one shard's kernel sees. gathered: why the weight is
    taken whole to every shard although the mesh may split it (`auto` then keeps the XLA path)."""

    mesh: object
    rows: str | None
    tensor: str | None
    split: Split | None
    local: tuple[int, int, int, int]
    gathered: str | None = None


def plan_shards(m: int, w: QuantizedWeight, split: Split | None, mesh) -> ShardPlan | None:
    """The `ShardPlan` of x [M, K] @ w on `mesh` (None: one device, no plan)."""
    if mesh is None:
        return None
    shape = dict(mesh.shape)
    data, t = shape.get("data", 1), shape.get("tensor", 1)
    k, n = w.shape
    g = w.scale.shape[0]
    rows = "data" if data > 1 and m % data == 0 else None
    local_m = m // data if rows else m
    tensor = "tensor" if t > 1 else None
    others = [f"{name}={size}" for name, size in shape.items() if name not in ("data", "tensor") and size > 1]
    gathered = f"the mesh axes {', '.join(others)} are not split by the kernel" if others else None
    if tensor is None:
        return ShardPlan(mesh, rows, None, None, (local_m, k, n, g), gathered)
    if split is None:
        return ShardPlan(mesh, rows, tensor, None, (local_m, k, n, g), gathered or "the weight's split is not known")
    if split.dim == "n":
        parts = n // (split.outer * split.inner)
        if parts * split.outer * split.inner != n:
            raise ValueError(f"{split} does not describe N={n}")
        if parts % t:  # the rules replicate what the tensor axis does not divide (KV heads)
            return ShardPlan(mesh, rows, tensor, None, (local_m, k, n, g), gathered)
        return ShardPlan(mesh, rows, tensor, split, (local_m, k, n // t, g), gathered)
    unit = 2 * t if w.bits == 4 else t
    if k % unit or (g % t and t % g):
        why = f"K={k} in {g} scale groups does not cut into {t} shards of whole packed rows and groups"
        return ShardPlan(mesh, rows, tensor, None, (local_m, k, n, g), why)
    # whole groups per shard, or (t a multiple of g) every shard inside one group
    return ShardPlan(mesh, rows, tensor, split, (local_m, k // t, n, max(g // t, 1)), gathered)


def sharded_pallas_matmul(
    x,
    w: QuantizedWeight,
    plan: ShardPlan,
    dtype=jnp.bfloat16,
    blocks: KernelBlocks = KernelBlocks(),
    interpret: bool | None = None,
) -> jax.Array:
    """`pallas_matmul` per shard in `shard_map` (XLA's partitioner cannot split the custom call):
    x [M, K] rows over `plan.rows`. Column-parallel (split n): x whole along K, each shard
    multiplies its N columns, the output split along N. Row-parallel (split k): x and w split
    along K at whole packed rows and scale groups (or within one group each), each shard's fp32
    partial [M, N] summed over `tensor` in fp32 (`psum`), then cast; grouped scales are applied
    per shard before the sum, one scale per output column after it. Split None: the whole weight
    on every shard."""
    m, k = x.shape
    n = w.shape[1]
    g = w.scale.shape[0]
    rows, tensor, split = plan.rows, plan.tensor, plan.split
    run = functools.partial(_pallas_fp32, dtype=dtype, blocks=blocks, interpret=interpret)
    shard_map = functools.partial(jax.shard_map, mesh=plan.mesh, check_vma=False)
    if split is None:

        def whole(xs, q, s):
            return run(xs, QuantizedWeight(q, s, w.bits)).astype(dtype)

        return shard_map(whole, in_specs=(P(rows, None), P(), P()), out_specs=P(rows, None))(x, w.q, w.scale)
    if split.dim == "n":
        o, i = split.outer, split.inner
        view = lambda a: a.reshape(a.shape[0], o, n // (o * i), i)  # noqa: E731
        cut = P(None, None, tensor, None)

        def columns(xs, q, s):
            y = run(xs, QuantizedWeight(q.reshape(q.shape[0], -1), s.reshape(s.shape[0], -1), w.bits))
            return y.astype(dtype).reshape(y.shape[0], o, -1, i)

        y = shard_map(columns, in_specs=(P(rows, None), cut, cut), out_specs=P(rows, None, tensor, None))(
            x, view(w.q), view(w.scale)
        )
        return y.reshape(m, n)

    def rows_of_k(xs, q, s):
        part = run(xs, QuantizedWeight(q, s, w.bits), scaled=g > 1)
        y = jax.lax.psum(part, tensor)
        if g == 1:
            y = y * s[0].astype(jnp.float32)
        return y.astype(dtype)

    t = dict(plan.mesh.shape)[tensor]
    scale = w.scale if g == 1 or g % t == 0 else jnp.repeat(w.scale, t // g, axis=0)  # [t, N]: each shard's group
    scale_spec = P(tensor, None) if g > 1 else P()
    return shard_map(rows_of_k, in_specs=(P(rows, tensor), P(tensor, None), scale_spec), out_specs=P(rows, None))(
        x, w.q, scale
    )


# ---- choosing the path ----------------------------------------------------------------------------------------
def choose_matmul(impl: str, m: int, w: QuantizedWeight, split: Split | None = None, mesh=None) -> str:
    """The path for x [M, K] @ w: "pallas" or "xla". impl "auto" takes the Pallas kernel for
    INT4 weights and decode-sized M per shard on NVIDIA GPUs: on one device, or on a (data,
    tensor) mesh when the kernel can run per shard (`plan_shards`: the weight's `split` known and
    whole packed rows / scale groups per shard); a weight it would have to gather keeps the XLA
    path, which XLA's partitioner splits. mesh: default `mesh_of(w)`."""
    if impl == "pallas":
        return "pallas"
    if impl != "auto" or w.bits != 4 or target_platform() != "gpu":
        return "xla"
    plan = plan_shards(m, w, split, mesh_of(w) if mesh is None else mesh)
    if plan is not None and plan.gathered:
        return "xla"
    local_m, k, n, groups = plan.local if plan is not None else (m, *w.shape, w.scale.shape[0])
    if local_m <= PALLAS_MAX_TOKENS and pallas_supports(local_m, k, n, groups) is None:
        return "pallas"
    return "xla"


def dense(
    x, w: QuantizedWeight, impl: str = "auto", dtype=jnp.bfloat16, split: Split | None = None, mesh=None
) -> jax.Array:
    """x [..., K] @ dequant(w) -> [..., N] by the path `choose_matmul` picks. split: how the
    layer's weight is cut over the mesh's `tensor` axis (`tensor_split` of its logical axes; None
    on one device, or when unknown); mesh: default `mesh_of(w)`. On a mesh the kernel runs per
    shard (`sharded_pallas_matmul`); on one device exactly as before."""
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    mesh = mesh_of(w) if mesh is None else mesh
    if choose_matmul(impl, m, w, split, mesh) == "xla":
        return matmul(x, w, dtype=dtype)
    x = x.reshape(m, x.shape[-1])
    plan = plan_shards(m, w, split, mesh)
    y = pallas_matmul(x, w, dtype=dtype) if plan is None else sharded_pallas_matmul(x, w, plan, dtype=dtype)
    return y.reshape(lead + (w.shape[1],))
