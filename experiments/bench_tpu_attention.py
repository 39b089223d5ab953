"""The TPU flash attention for GLM's mask, compiled ahead of time for TPU chips: a block-size sweep.

    python experiments/bench_tpu_attention.py [--topologies v5e-16,v5p-8] [--seq 2048] [--heads 24] [--head-dim 128]
        [--dropout 0.1]

For each chip and (block_q, block_k), the kernel's forward and backward (one layer's attention at
GLM-130B's per-tensor-shard shape by default: 96 heads / 4 shards, head dim 128, bf16, one
sequence of --seq with a packed GLM mask, attention dropout at --dropout: GLM-130B trains with
0.1) are lowered inside shard_map for one chip of the described topology and compiled with
libtpu; no TPU is needed. Reports whether Mosaic accepts the blocks (a block over the VMEM budget
fails at compile time, as on a chip), compile seconds, and the compiler's estimates (bytes
accessed, temporaries). Real timings wait for a TPU.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from benchutil import emit, environment  # noqa: E402

from glm_jax.topology import parse_topology, topology_devices  # noqa: E402
from glm_jax.tpu_attention import glm_flash_attention  # noqa: E402

BLOCKS = ((128, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 1024), (1024, 1024), (2048, 2048))


def compile_once(device, seq, heads, kv_heads, head_dim, bq, bk, dropout=0.0):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array([device]), ("x",))
    args = [
        jax.ShapeDtypeStruct(s, jnp.bfloat16)
        for s in ((1, seq, heads, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim))
    ]
    args += [jax.ShapeDtypeStruct((1, seq), jnp.int32)] * 2
    attend = functools.partial(
        glm_flash_attention,
        block_q=bq,
        block_k=bk,
        interpret=False,
        dropout_rate=dropout,
        dropout_rng=jax.random.key(0),
    )

    def loss(*a):
        return attend(*a).astype(jnp.float32).sum()

    out = {}
    for name, fn in (
        ("forward", attend),
        ("forward_backward", jax.grad(loss, argnums=(0, 1, 2))),
    ):
        step = jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * 5, out_specs=P(), check_vma=False)
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(step).lower(*args).compile()
        except Exception as e:
            out[name] = {"compiles": False, "message": str(e).splitlines()[0][:300]}
            continue
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = {
            "compiles": True,
            "compile_s": round(time.perf_counter() - t0, 2),
            "bytes_accessed_mb": round(float(cost.get("bytes accessed", 0)) / 1e6, 2),
            "temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 1e6, 2),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", default="v5e-16,v5p-8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout rate (GLM-130B: 0.1)")
    args = ap.parse_args(argv)
    env = environment()
    for name in args.topologies.split(","):
        topo = parse_topology(name)
        device = topology_devices(topo)[0]
        for bq, bk in BLOCKS:
            if args.seq % bq or args.seq % bk:
                continue
            r = compile_once(device, args.seq, args.heads, args.kv_heads, args.head_dim, bq, bk, args.dropout)
            emit(
                dict(
                    env,
                    bench="tpu_attention_compile",
                    topology=name,
                    device_kind=device.device_kind,
                    seq=args.seq,
                    heads=args.heads,
                    kv_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    dropout=args.dropout,
                    block_q=bq,
                    block_k=bk,
                    **r,
                )
            )


if __name__ == "__main__":
    main()
