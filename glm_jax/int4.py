"""INT4 / INT8 weight-only quantization (spec section 6): quantize, pack, dequant-matmul.

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

import jax
import jax.numpy as jnp
import numpy as np

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


def unpack_int4(packed) -> jax.Array:
    """uint8 [K/2, N] -> int8 [K, N] with sign extension (arithmetic shifts of the signed byte)."""
    b = jnp.asarray(packed, jnp.uint8).astype(jnp.int8)
    high = b >> 4
    low = (b << 4) >> 4
    return jnp.stack([high, low], axis=1).reshape((-1,) + b.shape[1:])


def int_values(w: QuantizedWeight) -> jax.Array:
    return unpack_int4(w.q) if w.bits == 4 else w.q


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    q = int_values(w).astype(jnp.float32)
    g = w.scale.shape[0]
    k, n = q.shape
    return (q.reshape(g, k // g, n) * w.scale.astype(jnp.float32)[:, None, :]).reshape(k, n).astype(dtype)


def matmul(x, w: QuantizedWeight, dtype=jnp.bfloat16) -> jax.Array:
    """x [..., K] @ dequant(w) -> [..., N], the portable XLA path: integer weights converted in
    the dot's operand (XLA fuses the convert into its GEMM), scales applied after the dot."""
    q = int_values(w)
    k, n = q.shape
    g = w.scale.shape[0]
    x = x.astype(dtype)
    if g == 1:
        y = jnp.dot(x, q.astype(dtype), preferred_element_type=jnp.float32)
        return (y * w.scale[0].astype(jnp.float32)).astype(dtype)
    xg = x.reshape(x.shape[:-1] + (g, k // g))
    y = jnp.einsum("...gk,gkn->...gn", xg, q.reshape(g, k // g, n).astype(dtype), preferred_element_type=jnp.float32)
    return jnp.sum(y * w.scale.astype(jnp.float32), axis=-2).astype(dtype)


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
LAYER_LINEARS = {("attention", "query"): 1, ("attention", "key"): 1, ("attention", "value"): 1,
                 ("attention", "dense"): 2, ("mlp", "dense_h_to_4h"): 1, ("mlp", "dense_4h_to_h"): 1}


def quantize_params(params: dict, config) -> dict:
    """A float parameter tree -> the tree of `config` (quantization int4/int8): the four linear
    weights of every layer quantized (kernel -> q, scale); embeddings, norms and biases stay
    16-bit (bf16)."""
    bits = {"int4": 4, "int8": 8}[config.quantization]
    out = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.bfloat16), params)
    layers = params["layers"]
    for (block, name), n_in in LAYER_LINEARS.items():
        kernel = jnp.asarray(layers[block][name]["kernel"], jnp.float32)  # [L, *in, *out]
        n_layers, in_shape, out_shape = kernel.shape[0], kernel.shape[1:1 + n_in], kernel.shape[1 + n_in:]
        k = int(np.prod(in_shape))
        flat = kernel.reshape(n_layers, k, -1)
        group = config.quantization_group or None
        qws = [quantize(flat[i], bits, group) for i in range(n_layers)]
        q = jnp.stack([w.q for w in qws]).reshape((n_layers, qws[0].q.shape[0]) + out_shape)
        scale = jnp.stack([w.scale for w in qws]).reshape((n_layers, qws[0].scale.shape[0]) + out_shape)
        entry = {k2: v for k2, v in out["layers"][block][name].items() if k2 != "kernel"}
        out["layers"][block][name] = {**entry, "q": q, "scale": scale}
    return out


def tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree_util.tree_leaves(tree)))


# ---- the fused Pallas kernel --------------------------------------------------------------------------------
def _int4_kernel(xe_ref, xo_ref, q_ref, s_ref, o_ref, *, bk: int, nk: int, group_blocks: int):
    """One [bm, bn] output tile: loop over K in blocks of bk, unpack the packed bytes in registers
    (high nibble = even rows, low nibble = odd rows), two dots against the even/odd halves of x,
    scales applied per group (or once at the end for per-row scales)."""
    import jax.experimental.pallas as pl

    half = bk // 2

    def body(i, acc):
        b = q_ref[pl.ds(i * half, half), :].astype(jnp.int8)
        high = (b >> 4).astype(xe_ref.dtype)
        low = ((b << 4) >> 4).astype(xe_ref.dtype)
        part = jnp.dot(xe_ref[:, pl.ds(i * half, half)], high, preferred_element_type=jnp.float32)
        part += jnp.dot(xo_ref[:, pl.ds(i * half, half)], low, preferred_element_type=jnp.float32)
        if group_blocks:
            part = part * s_ref[pl.ds(i // group_blocks, 1), :].astype(jnp.float32)
        return acc + part

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    if not group_blocks:
        acc = acc * s_ref[pl.ds(0, 1), :].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def pallas_matmul(x, w: QuantizedWeight, dtype=jnp.bfloat16, block_m: int = 16, block_n: int = 128,
                  block_k: int = 256, interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ dequant(w) with a Pallas kernel that reads the packed INT4 weight once and fuses
    unpacking and scaling into the matmul. Ragged M, N and K are padded to the blocks. Runs in
    interpret mode off-GPU (the CPU tests); on NVIDIA GPUs it lowers through Triton."""
    import jax.experimental.pallas as pl

    if w.bits != 4:
        raise ValueError("pallas_matmul takes INT4 weights; INT8 uses the XLA path")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    k, n = w.shape
    g = w.scale.shape[0]
    group = k // g
    m = x.shape[0]
    if g > 1:  # a K block must not straddle two scale groups
        block_k = min(block_k, group)
        if group % block_k or block_k % 2:
            raise ValueError(f"group size {group} must be a multiple of an even block_k ({block_k})")
    bm, bn, bk = block_m, block_n, block_k
    mp, np_, kp = -(-m // bm) * bm, -(-n // bn) * bn, -(-k // bk) * bk
    x = jnp.pad(x.astype(dtype), ((0, mp - m), (0, kp - k)))
    q = jnp.pad(w.q, ((0, (kp - k) // 2), (0, np_ - n)))
    scale = jnp.pad(w.scale, ((0, 0), (0, np_ - n)))
    xe, xo = x[:, 0::2], x[:, 1::2]  # even / odd input columns meet the high / low nibbles
    kernel = functools.partial(_int4_kernel, bk=bk, nk=kp // bk, group_blocks=(group // bk) if g > 1 else 0)
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, kp // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((kp // 2, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((g, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), dtype),
        interpret=interpret,
    )(xe, xo, q, scale)
    return out[:m, :n]
