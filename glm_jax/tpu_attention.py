"""Flash attention for GLM's mask on TPU (Pallas / Mosaic), forward and backward.

    out = glm_flash_attention(q, k, v, segment_ids, prefix_mask)   # == xla_attention(q, k, v, glm mask)

q: [B, S, H, D]; k, v: [B, S, K, D] (K divides H: grouped KV); segment_ids, prefix_mask: [B, S]
int -> [B, S, H, D]. The mask is GLM's rule from per-position data (`layers.glm_attention_mask`):
query i sees key j iff they share a nonzero segment and (j is in part A, or j <= i), so packed
[MASK] samples, [gMASK] prefixes and padding all come from the batch, not a static pattern.

Blocks of bq queries x bk keys run as an online softmax (running max, sum, accumulator in VMEM).
A block that cannot hold a visible pair is skipped: per-block summaries (segment range of the
queries and of the keys; whether the keys hold part-A positions) are scalar-prefetched, and a
key block wholly after the query block with no part-A key, or whose segments cannot meet the
queries', does no work. The backward pass is the standard recomputation scheme: the forward
saves the row log-sum-exp; one kernel accumulates dq over key blocks, another dk / dv over query
blocks (per query head; a group's heads are summed outside). Rows that see no key at all
(padding, segment 0) give zeros where the reference gives an average; nothing reads them.
On CPU the kernels run in Pallas interpret mode (the tests); on TPU they compile with Mosaic.

Attention dropout (`dropout_rate`, `dropout_rng`) drops normalised probabilities as the XLA
reference does, out = (P * keep / (1 - rate)) V with the log-sum-exp of the undropped scores, and
the mask is counter-based: keep(b, h, i, j) = `dropout_keep`, a hash of the key's seed and the
global batch row, query head, query and key position, regenerated per block by the forward and
both backward kernels and drawn whole by `layers.xla_attention`, so the two paths (and a sharded
run and one device) drop the same entries. Backward (FlashAttention-2's): dV = (P * Z)^T dO,
dS = P * (Z * dO V^T - D), Z = keep / (1 - rate), D = rowsum(dO * O) of the dropped output O.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm_jax.target import target_platform

LANES, SUBLANES = 128, 8
NEG = -1e30  # finite: a fully masked block keeps the running max finite (no inf - inf)


# ---- the dropout mask ---------------------------------------------------------------------------
def _fmix(x):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on
    every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_seed(key):
    """A dropout PRNG key -> its seed, int32 [2] of 31-bit words (nonnegative, so SMEM's int32
    holds them and converts to uint32 the same on every backend)."""
    return (jax.random.bits(key, (2,), jnp.uint32) >> 1).astype(jnp.int32)


def dropout_keep(seed, batch, head, query, key, rate: float):
    """Attention dropout's keep mask, a pure function of its arguments (P(keep) = 1 - rate).

    seed: two words from `dropout_seed` (an int32 [2] or a pair of scalars); batch, head (the
    query head), query, key (positions): int arrays of global indices that broadcast together ->
    bool of their broadcast shape. A row's hash mixes (seed, batch, head, query), a column's
    (seed, key); one more round over their xor decides each entry, so the kernel pays one round
    per [bq, bk] element and the rest per row or column.
    """
    u32 = lambda x: jax.lax.convert_element_type(x, jnp.uint32)  # noqa: E731
    row = _fmix(_fmix(_fmix(u32(seed[0]) ^ u32(batch)) ^ u32(head)) ^ u32(query))
    col = _fmix(u32(seed[1]) ^ (u32(key) * jnp.uint32(0x9E3779B9)))
    threshold = min(round((1.0 - rate) * 2**32), 2**32 - 1)
    return _fmix(row ^ col) < jnp.uint32(threshold)


def _block_keep(drop, b, h, i, j, bq: int, bk: int, rate: float):
    """The keep mask of query block i x key block j of local batch row b, head h -> [bq, bk].
    drop: the prefetched (seed word 0, seed word 1, first global batch row, first global head)."""
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    batch, head = drop[2] + b, drop[3] + h
    return dropout_keep((drop[0], drop[1]), batch, head, rows, cols, rate)


def _dropped(x, keep, rate: float):
    """Inverted dropout: kept entries scaled by 1 / (1 - rate), the rest zero."""
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0)


def _summaries(segment_ids, prefix_mask, block: int):
    """Per block of `block` positions: min / max segment id and whether any position is part A.
    -> three [B, S // block] int32."""
    b, s = segment_ids.shape
    seg = segment_ids.reshape(b, s // block, block)
    return (
        seg.min(-1).astype(jnp.int32),
        seg.max(-1).astype(jnp.int32),
        (prefix_mask.reshape(b, s // block, block) != 0).any(-1).astype(jnp.int32),
    )


def _prefetch(segment_ids, prefix_mask, bq: int, bk: int):
    """The kernels' scalar-prefetched block summaries: (query blocks' min / max segment, key
    blocks' min / max segment, key blocks' part-A flag)."""
    qsum, ksum = _summaries(segment_ids, prefix_mask, bq), _summaries(segment_ids, prefix_mask, bk)
    return qsum[0], qsum[1], ksum[0], ksum[1], ksum[2]


def _may_see(qmin, qmax, kmin, kmax, kpre, b, i, j, bq: int, bk: int):
    """Whether query block i and key block j can hold a visible pair (conservative)."""
    meet = (kmin[b, j] <= qmax[b, i]) & (qmin[b, i] <= kmax[b, j]) & (qmax[b, i] > 0) & (kmax[b, j] > 0)
    return meet & ((j * bk <= i * bq + bq - 1) | (kpre[b, j] > 0))


def _mask(qseg_ref, kseg_ref, kpfx_ref, i, j, bq: int, bk: int):
    qs = qseg_ref[:, :1]  # [bq, 1]
    ks, kp = kseg_ref[:1, :], kpfx_ref[:1, :]  # [1, bk]
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (qs == ks) & (qs != 0) & ((cols <= rows) | (kp != 0))


def _scores(q, k, scale):
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


# ---- forward ------------------------------------------------------------------------------------
def _forward_kernel(
    qmin,
    qmax,
    kmin,
    kmax,
    kpre,
    drop,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    kpfx_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale,
    bq,
    bk,
    rate,
):
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_may_see(qmin, qmax, kmin, kmax, kpre, b, i, j, bq, bk))
    def _():
        mask = _mask(qseg_ref, kseg_ref, kpfx_ref, i, j, bq, bk)
        s = jnp.where(mask, _scores(q_ref[...], k_ref[...], scale), NEG)
        m_prev, l_prev = m_scr[:, :1], l_scr[:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_scr.shape)
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        if rate:  # the sum l normalises the undropped p; only the values see the dropout
            p = _dropped(p, _block_keep(drop, b, h, i, j, bq, bk, rate), rate)
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(
            p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_scr[:, :1]
        seen = l > 0
        o_ref[...] = (acc_scr[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(
            jnp.where(seen, m_scr[:, :1] + jnp.log(jnp.where(seen, l, 1.0)), 0.0), lse_ref.shape
        )


def _specs(bq, bk, d, group, kv_major: bool):
    """BlockSpecs of (q-like [B,H,S,D], k-like [B,K,S,D], row stats [B,H,S,128], q segments
    [B,S,128], key rows [B,8,S]) for a grid (b, h, outer, inner); kv_major: outer walks keys."""

    def qi(b, h, o, n, *_):
        return (b, h, n if kv_major else o, 0)

    def kj(b, h, o, n, *_):
        return (b, h // group, o if kv_major else n, 0)

    def qseg(b, h, o, n, *_):
        return (b, n if kv_major else o, 0)

    def krow(b, h, o, n, *_):
        return (b, 0, o if kv_major else n)

    return dict(
        q=pl.BlockSpec((None, None, bq, d), qi),
        k=pl.BlockSpec((None, None, bk, d), kj),
        stat=pl.BlockSpec((None, None, bq, LANES), qi),
        qseg=pl.BlockSpec((None, bq, LANES), qseg),
        krow=pl.BlockSpec((None, SUBLANES, bk), krow),
        kout=pl.BlockSpec((None, None, bk, d), lambda b, h, o, n, *_: (b, h, o if kv_major else n, 0)),
    )


def _layout(segment_ids, prefix_mask):
    b, s = segment_ids.shape
    qseg = jax.lax.broadcast_in_dim(segment_ids.astype(jnp.int32), (b, s, LANES), (0, 1))
    kseg = jax.lax.broadcast_in_dim(segment_ids.astype(jnp.int32), (b, SUBLANES, s), (0, 2))
    kpfx = jax.lax.broadcast_in_dim(prefix_mask.astype(jnp.int32), (b, SUBLANES, s), (0, 2))
    return qseg, kseg, kpfx


def _params(interpret):
    return (
        {}
        if interpret
        else dict(
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
        )
    )


def _cost(q, k, matmuls: int) -> pl.CostEstimate:
    """What a kernel over q [B,H,S,D] and k [B,K,S,D] computes, for XLA's scheduler and the dry
    run's FLOP count: `matmuls` [S,S] x [S,D] products per query head and one exp per score, as
    if no block were skipped (an upper bound: blocks the mask hides do no work)."""
    b, h, s, d = q.shape
    return pl.CostEstimate(
        flops=2 * matmuls * b * h * s * s * d,
        transcendentals=b * h * s * s,
        bytes_accessed=2 * (q.size * q.dtype.itemsize + 2 * k.size * k.dtype.itemsize),
    )


def _forward(q, k, v, segment_ids, prefix_mask, drop, bq, bk, rate, interpret):
    """q [B,H,S,D], k/v [B,K,S,D], drop int32 [4] (`_block_keep`) -> (out [B,H,S,D], lse [B,H,S,128])."""
    b, h, s, d = q.shape
    group = h // k.shape[1]
    sp = _specs(bq, bk, d, group, kv_major=False)
    kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(d), bq=bq, bk=bk, rate=rate)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(b, h, s // bq, s // bk),
            in_specs=[sp["q"], sp["k"], sp["k"], sp["qseg"], sp["krow"], sp["krow"]],
            out_specs=[sp["q"], sp["stat"]],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s, LANES), jnp.float32)],
        interpret=interpret,
        cost_estimate=_cost(q, k, 2),  # scores, then probabilities x values
        **_params(interpret),
    )(*_prefetch(segment_ids, prefix_mask, bq, bk), drop, q, k, v, *_layout(segment_ids, prefix_mask))


# ---- backward -----------------------------------------------------------------------------------
def _dq_kernel(
    qmin,
    qmax,
    kmin,
    kmax,
    kpre,
    drop,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    qseg_ref,
    kseg_ref,
    kpfx_ref,
    dq_ref,
    acc_scr,
    *,
    scale,
    bq,
    bk,
    rate,
):
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_may_see(qmin, qmax, kmin, kmax, kpre, b, i, j, bq, bk))
    def _():
        mask = _mask(qseg_ref, kseg_ref, kpfx_ref, i, j, bq, bk)
        p = jnp.where(mask, jnp.exp(_scores(q_ref[...], k_ref[...], scale) - lse_ref[:, :1]), 0.0)
        dp = _scores(do_ref[...], v_ref[...], 1.0)
        if rate:
            dp = _dropped(dp, _block_keep(drop, b, h, i, j, bq, bk, rate), rate)
        ds = (p * (dp - di_ref[:, :1])).astype(k_ref.dtype)
        acc_scr[...] += jnp.dot(ds, k_ref[...], preferred_element_type=jnp.float32) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(
    qmin,
    qmax,
    kmin,
    kmax,
    kpre,
    drop,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    qseg_ref,
    kseg_ref,
    kpfx_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    scale,
    bq,
    bk,
    rate,
):
    b, h, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_may_see(qmin, qmax, kmin, kmax, kpre, b, i, j, bq, bk))
    def _():
        mask = _mask(qseg_ref, kseg_ref, kpfx_ref, i, j, bq, bk)
        q, do = q_ref[...], do_ref[...]
        p = jnp.where(mask, jnp.exp(_scores(q, k_ref[...], scale) - lse_ref[:, :1]), 0.0)  # [bq, bk]
        tn = (((0,), (0,)), ((), ()))  # contract the query axis: A^T B
        dp = _scores(do, v_ref[...], 1.0)
        pv = p
        if rate:
            keep = _block_keep(drop, b, h, i, j, bq, bk, rate)
            pv, dp = _dropped(p, keep, rate), _dropped(dp, keep, rate)
        dv_scr[...] += jax.lax.dot_general(pv.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
        ds = (p * (dp - di_ref[:, :1])).astype(q.dtype)
        dk_scr[...] += jax.lax.dot_general(ds, q, tn, preferred_element_type=jnp.float32) * scale

    @pl.when(i == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(q, k, v, segment_ids, prefix_mask, drop, out, lse, do, bq, bk, rate, interpret):
    b, h, s, d = q.shape
    group = h // k.shape[1]
    scale = 1.0 / math.sqrt(d)
    di = jnp.broadcast_to((do.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True), lse.shape)
    prefetch = (*_prefetch(segment_ids, prefix_mask, bq, bk), drop)
    layout = _layout(segment_ids, prefix_mask)
    sp = _specs(bq, bk, d, group, kv_major=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, rate=rate),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(b, h, s // bq, s // bk),
            in_specs=[sp["q"], sp["k"], sp["k"], sp["q"], sp["stat"], sp["stat"], sp["qseg"], sp["krow"], sp["krow"]],
            out_specs=sp["q"],
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        cost_estimate=_cost(q, k, 3),  # scores, dO V^T, dS K
        **_params(interpret),
    )(*prefetch, q, k, v, do, lse, di, *layout)
    sp = _specs(bq, bk, d, group, kv_major=True)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, rate=rate),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(b, h, s // bk, s // bq),
            in_specs=[sp["q"], sp["k"], sp["k"], sp["q"], sp["stat"], sp["stat"], sp["qseg"], sp["krow"], sp["krow"]],
            out_specs=[sp["kout"], sp["kout"]],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, h, s, d), jnp.float32)] * 2,
        interpret=interpret,
        cost_estimate=_cost(q, k, 4),  # scores, dO V^T, P^T dO, dS^T Q
        **_params(interpret),
    )(*prefetch, q, k, v, do, lse, di, *layout)
    kv = k.shape[1]
    fold = lambda x, like: x.reshape(b, kv, group, s, d).sum(2).astype(like.dtype)  # noqa: E731
    return dq, fold(dk, k), fold(dv, v)


# ---- the public function ------------------------------------------------------------------------
def supports(seq_len: int, block_q: int, block_k: int) -> str | None:
    """None when the kernel takes this length with these blocks, else why not."""
    bq, bk = min(block_q, seq_len), min(block_k, seq_len)
    if seq_len % bq or seq_len % bk:
        return f"sequence length {seq_len} is not a multiple of the blocks ({bq}, {bk})"
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, segment_ids, prefix_mask, drop, bq, bk, rate, interpret):
    return _forward(q, k, v, segment_ids, prefix_mask, drop, bq, bk, rate, interpret)[0]


def _attention_fwd(q, k, v, segment_ids, prefix_mask, drop, bq, bk, rate, interpret):
    out, lse = _forward(q, k, v, segment_ids, prefix_mask, drop, bq, bk, rate, interpret)
    return out, (q, k, v, segment_ids, prefix_mask, drop, out, lse)


def _attention_bwd(bq, bk, rate, interpret, res, do):
    q, k, v, segment_ids, prefix_mask, drop, out, lse = res
    dq, dk, dv = _backward(q, k, v, segment_ids, prefix_mask, drop, out, lse, do, bq, bk, rate, interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def shard_offset(size: int, axis: str):
    """The global index of this shard's first entry along an array axis of local length `size`
    that the mesh `axis` splits: axis_index * size where `axis` is manual (inside `shard_map`),
    else 0 (the whole axis is here, or XLA's partitioner keeps the indices global)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.manual_axes:
        return jnp.int32(0)
    return jax.lax.axis_index(axis).astype(jnp.int32) * size


def _dropout_args(rate: float, rng):
    """(rate, seed int32 [2]): rate 0 and a zero seed when there is no dropout."""
    if rate > 0.0 and rng is not None:
        return float(rate), dropout_seed(rng)
    return 0.0, jnp.zeros((2,), jnp.int32)


def _flash(q, k, v, segment_ids, prefix_mask, seed, *, rate: float, bq: int, bk: int, interpret: bool | None):
    """`glm_flash_attention` with the dropout seed drawn; batch rows and heads of the mask are
    global (`shard_offset` over manual `data` / `tensor` axes: they split the batch / heads)."""
    s = q.shape[1]
    why = supports(s, bq, bk)
    if why:
        raise ValueError(f"glm_flash_attention: {why}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    offsets = jnp.stack([shard_offset(q.shape[0], "data"), shard_offset(q.shape[2], "tensor")])
    drop = jnp.concatenate([seed.astype(jnp.int32), offsets])
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B,S,H,D] <-> [B,H,S,D]
    out = _attention(t(q), t(k), t(v), segment_ids, prefix_mask, drop, min(bq, s), min(bk, s), rate, interpret)
    return t(out)


def glm_flash_attention(
    q,
    k,
    v,
    segment_ids,
    prefix_mask,
    *,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
):
    """GLM-masked attention, q [B,S,H,D], k/v [B,S,K,D], segment_ids / prefix_mask [B,S] ->
    [B,S,H,D] (differentiable in q, k, v). Attention dropout when dropout_rate > 0 and a
    dropout_rng (PRNG key) is given: the entries `dropout_keep` drops, as `layers.xla_attention`
    with the same key. interpret: default on anything but a TPU."""
    rate, seed = _dropout_args(dropout_rate, dropout_rng)
    return _flash(q, k, v, segment_ids, prefix_mask, seed, rate=rate, bq=block_q, bk=block_k, interpret=interpret)


BLOCK = 512  # default query / key block (the compile sweep in BENCHMARKS.md)


def unsupported(q_shape, k_shape, needs_dense: bool) -> str | None:
    """Why a layer cannot use the kernel (None: it can). q [B,S,H,D], k [B,T,K,D]."""
    if needs_dense:
        return "a KV cache or a P-tuning prefix needs the dense mask"
    if q_shape[1] != k_shape[1]:
        return "queries and keys differ in length"
    mesh = jax.sharding.get_abstract_mesh()
    split = not mesh.empty and "tensor" in mesh.axis_names and "tensor" not in mesh.manual_axes
    t = mesh.shape["tensor"] if split else 1  # a manual tensor axis: the heads here are this shard's
    if t > 1 and k_shape[2] % t:
        return f"{k_shape[2]} KV heads do not split over a tensor axis of {t}"
    return supports(q_shape[1], BLOCK, BLOCK)


def on_mesh(q, k, v, segment_ids, prefix_mask, *, dropout_rate: float = 0.0, dropout_rng=None, block: int = BLOCK):
    """`glm_flash_attention` under the current mesh: a custom call is not split by XLA's
    partitioner, so the kernel runs per shard in `shard_map` over the mesh axes not already
    manual (inside an outer `shard_map`, e.g. a pipeline manual over `stage` and `data`, over
    the rest only): batch over `data`, heads (and KV heads with them) over `tensor`; other axes
    pass through. The dropout mask takes global batch rows and
    heads, so a sharded run drops what one device does."""
    rate, seed = _dropout_args(dropout_rate, dropout_rng)
    run = functools.partial(_flash, rate=rate, bq=block, bk=block, interpret=None)
    mesh = jax.sharding.get_abstract_mesh()
    axes = frozenset() if mesh.empty else frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
    if "data" in axes and q.shape[0] % mesh.shape["data"]:
        axes -= {"data"}  # a batch `data` does not split (an init trace's one row): whole on each shard
    if all(mesh.shape[a] == 1 for a in axes):
        return run(q, k, v, segment_ids, prefix_mask, seed)
    from jax.sharding import PartitionSpec as P

    batch = "data" if "data" in axes else None
    heads = "tensor" if "tensor" in axes and mesh.shape["tensor"] > 1 else None
    spec, rows = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        run, mesh=mesh, in_specs=(spec, spec, spec, rows, rows, P()), out_specs=spec, axis_names=axes, check_vma=False
    )(q, k, v, segment_ids, prefix_mask, seed)
