"""INT4 dequant-matmul speed on the GPU against bf16 `jnp.dot` timed in the same run.

    python experiments/bench_int4.py [--m 1,16,64,2048] [--shapes 12288x36864,...] [--sweep]

For every x [M, K] @ w [K, N] (GLM-130B's four layer matmuls by default, decode M 1/16/64 and
prefill M 2048): bf16 `jnp.dot`; the portable XLA INT4 path (`quant.matmul`); the Pallas kernel
(`quant.pallas_matmul`, M <= quant.PALLAS_MAX_TOKENS); and `auto`, the path the model takes.
Each row: median time, speed-up over bf16, and the bytes moved (weight + x + output) as a
percent of the HBM bandwidth measured in the same run by a device copy. Also max |pallas - xla|
relative to max |xla| (the kernel's numerics on the device). --sweep times a grid of kernel
tilings at each decode shape and reports the best next to the default. Off-GPU it runs the
Pallas kernel in interpret mode, for weights of at most 4M elements (a check that the script
runs: use small --shapes there).
"""

import argparse
import itertools
import sys

import jax
import jax.numpy as jnp
from benchutil import emit, environment, hbm_bandwidth, time_fn

from glm_jax import quant

GLM130B_SHAPES = "12288x36864,12288x12288,12288x65536,32768x12288"  # QKV, dense, h->4h (GeGLU), 4h->h
INTERPRET_MAX_WEIGHT = 2**22
SWEEP = dict(block_n=(64, 128), block_k=(256, 512), num_warps=(4, 8), num_stages=(3, 4))


def random_int4(key, k: int, n: int) -> quant.QuantizedWeight:
    """Random packed INT4 bytes and fp16 scales made on the device."""
    kq, ks = jax.random.split(key)
    q = jax.random.bits(kq, (k // 2, n), jnp.uint8)
    scale = (jax.random.uniform(ks, (1, n), jnp.float32, 0.5, 1.5) * 0.01).astype(jnp.float16)
    return quant.QuantizedWeight(q, scale, 4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,2048", help="token counts (rows of x)")
    ap.add_argument("--shapes", default=GLM130B_SHAPES, help="comma-separated KxN weight shapes")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of Pallas tilings at M <= 16")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        ms = [int(v) for v in args.m.split(",")]
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 2 and s[0] % 2 == 0 for s in shapes) and all(m > 0 for m in ms)
    except (ValueError, AssertionError):
        ap.error("--m takes positive integers and --shapes KxN pairs with K even, e.g. 12288x36864")
    env = environment()
    on_gpu = env["backend"] == "gpu"
    bandwidth = hbm_bandwidth(2.0 if on_gpu else 0.25)
    emit(dict(env, bench="hbm_bandwidth", gb_s=round(bandwidth / 1e9, 1)))
    key = jax.random.key(0)
    bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    xla = jax.jit(lambda x, w: quant.matmul(x, w))
    auto = jax.jit(lambda x, w: quant.dense(x, w, "auto"))

    def pallas(blocks=quant.KernelBlocks()):
        return jax.jit(lambda x, w: quant.pallas_matmul(x, w, blocks=blocks))

    for (k, n), m in itertools.product(shapes, ms):
        kx, kw, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = random_int4(kw, k, n)
        dense = quant.dequantize(w, jnp.bfloat16)
        t_bf16 = time_fn(bf16_dot, x, dense, iters=args.iters)
        io_bytes = x.nbytes + m * n * 2
        row = dict(
            env,
            bench="int4_matmul",
            m=m,
            k=k,
            n=n,
            bf16_us=round(1e6 * t_bf16, 1),
            bf16_bw_pct=round(100 * (dense.nbytes + io_bytes) / t_bf16 / bandwidth, 1),
        )
        del dense
        paths = {"xla": xla, "auto": auto}
        interpretable = k * n <= INTERPRET_MAX_WEIGHT  # off-GPU the kernel is interpreted: small weights only
        if m <= quant.PALLAS_MAX_TOKENS and quant.pallas_supports(m, k, n, 1) is None and (on_gpu or interpretable):
            paths["pallas"] = pallas()
        ref = xla(x, w)
        for name, fn in paths.items():
            t = time_fn(fn, x, w, iters=args.iters)
            row[f"{name}_us"] = round(1e6 * t, 1)
            row[f"{name}_speedup"] = round(t_bf16 / t, 2)
            row[f"{name}_bw_pct"] = round(100 * (w.nbytes + io_bytes) / t / bandwidth, 1)
        if "pallas" in paths:
            err = jnp.max(jnp.abs(paths["pallas"](x, w).astype(jnp.float32) - ref.astype(jnp.float32)))
            row["pallas_rel_err"] = float(err / jnp.max(jnp.abs(ref.astype(jnp.float32))))
        row["auto_path"] = quant.choose_matmul("auto", m, w)
        if args.sweep and m <= 16 and "pallas" in paths:
            best = None
            for values in itertools.product(*SWEEP.values()):
                blocks = quant.KernelBlocks(**dict(zip(SWEEP, values)))
                if quant.pallas_supports(m, k, n, 1, blocks) is not None:
                    continue
                t = time_fn(pallas(blocks), x, w, iters=args.iters)
                if best is None or t < best[0]:
                    best = (t, blocks)
            row["sweep_best_us"] = round(1e6 * best[0], 1)
            row["sweep_best"] = {f: getattr(best[1], f) for f in SWEEP}
        emit(row)
        print(
            f"M={m:5d} K={k:6d} N={n:6d}  bf16 {row['bf16_us']:9.1f} us  "
            + "  ".join(
                f"{p} {row[p + '_us']:9.1f} us x{row[p + '_speedup']:.2f} ({row[p + '_bw_pct']}% BW)" for p in paths
            ),
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
