"""Timing helpers shared by the bench_*.py scripts (imported as a sibling module)."""

from __future__ import annotations

import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn, *args, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call of an already-jitted fn (after warm-up; results blocked on)."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_anchor(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """TFLOP/s of an n^3 matmul in `dtype` on the default device (the anchor every figure is divided by)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(f, a, b) / 1e12


def hbm_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy of `gib` GiB (bytes read + written): the memory
    bandwidth every bytes floor is divided by."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)
    t = time_fn(copy, x, iters=10)
    return 2 * x.nbytes / t


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def emit(record: dict) -> None:
    """One JSON line on stdout (what BENCHMARKS.md rows are written from)."""
    print(json.dumps(record), flush=True)
