"""Fused (cuDNN) vs reference (XLA) attention at seq 2048 with the GLM mask, on the GPU.

    python experiments/bench_attention.py [--batch 8] [--seq 2048] [--heads 16] [--head-dim 128]

Two masks from the batch contract: a [gMASK] sequence (bidirectional prefix of half the window,
causal rest) and 4 packed [MASK] samples of seq/4. Reports forward and forward+backward time,
TFLOP/s (4*B*H*S^2*D forward, x3 with backward, the prefix not halved), the ratio to an 8192^3
bf16 matmul timed in the same run, and the max difference between the two implementations.
On a machine without a GPU the cuDNN rows say why they were skipped.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from benchutil import emit, environment, matmul_anchor, time_fn

from glm_jax.layers import cudnn_attention, glm_attention_mask, xla_attention


def glm_masks(batch: int, seq: int) -> dict:
    s = np.arange(seq)
    gmask = dict(segment_ids=np.ones((batch, seq)), prefix_mask=np.broadcast_to(s < seq // 2, (batch, seq)))
    quarter = seq // 4
    packed_prefix = (s % quarter) < int(0.85 * quarter)  # ~15% of each sample is part B
    packed = dict(
        segment_ids=np.broadcast_to(1 + s // quarter, (batch, seq)),
        prefix_mask=np.broadcast_to(packed_prefix, (batch, seq)),
    )
    return {
        name: glm_attention_mask(jnp.asarray(m["segment_ids"], jnp.int32), jnp.asarray(m["prefix_mask"], jnp.int32))
        for name, m in (("gmask", gmask), ("packed4", packed))
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    env = environment()
    anchor = matmul_anchor() if env["backend"] == "gpu" else matmul_anchor(1024, jnp.float32)
    b, s, h, d = args.batch, args.seq, args.heads, args.head_dim
    kv = args.kv_heads or h
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, kv, d), jnp.bfloat16)
    g = jax.random.normal(keys[3], (b, s, h, d), jnp.bfloat16)
    flops_fwd = 4 * b * h * s * s * d
    impls = {"xla": xla_attention, "cudnn": cudnn_attention}
    for mask_name, mask in glm_masks(b, s).items():
        outs = {}
        for name, attn in impls.items():
            rec = dict(
                env,
                bench="attention",
                impl=name,
                mask=mask_name,
                batch=b,
                seq=s,
                heads=h,
                kv_heads=kv,
                head_dim=d,
                anchor_tflops=round(anchor, 1),
            )
            fwd = jax.jit(lambda q, k, v, m, attn=attn: attn(q, k, v, m))
            bwd = jax.jit(
                jax.grad(
                    lambda q, k, v, m, attn=attn: jnp.vdot(attn(q, k, v, m).astype(jnp.float32), g.astype(jnp.float32)),
                    argnums=(0, 1, 2),
                )
            )
            try:
                outs[name] = np.asarray(fwd(q, k, v, mask), np.float32)
                t_fwd = time_fn(fwd, q, k, v, mask, iters=args.iters)
                t_all = time_fn(bwd, q, k, v, mask, iters=args.iters)
            except Exception as e:  # cuDNN absent (CPU) or the shape unsupported: say so
                emit(dict(rec, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                continue
            tf_fwd, tf_all = flops_fwd / t_fwd / 1e12, 3 * flops_fwd / t_all / 1e12
            emit(
                dict(
                    rec,
                    fwd_ms=round(1e3 * t_fwd, 3),
                    fwd_bwd_ms=round(1e3 * t_all, 3),
                    fwd_tflops=round(tf_fwd, 2),
                    fwd_bwd_tflops=round(tf_all, 2),
                    fwd_vs_anchor=round(tf_fwd / anchor, 3),
                    fwd_bwd_vs_anchor=round(tf_all / anchor, 3),
                )
            )
        if len(outs) == 2:
            emit(
                dict(
                    env,
                    bench="attention_agreement",
                    mask=mask_name,
                    max_abs_diff=float(np.abs(outs["xla"] - outs["cudnn"]).max()),
                )
            )


if __name__ == "__main__":
    main()
