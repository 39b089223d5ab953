"""The exact GLM-130B with INT4 weights decoding on ONE GPU: peak memory and ms/token.

    python experiments/bench_130b_int4.py [--preset glm-130b] [--cache 2048] [--new 32] [--dry-run]
    python experiments/bench_130b_int4.py --dry-run --topology v5p-8 [--quantize none]   # one TPU v5p chip

Random INT4 weights are generated on the device, leaf by leaf, straight into generation's
per-layer layout (`generate.serving_params`; no host copy of 130B parameters, no second copy
on the device); embeddings, norms and biases are bf16, the KV cache bf16 with `--cache` slots,
every one of which each decode step attends over (masked). Reports peak device memory and
ms/token against the floor: (all weight
bytes, INT4 layers plus the bf16 embedding the tied head reads, plus the KV cache bytes) over
the HBM bandwidth measured in the same run. --dry-run compiles the decode step for abstract
arrays and prints XLA's memory analysis without allocating anything (works on a laptop).
"""

import os

# the weights take most of an 80 GB card: let JAX's allocator have nearly all of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from benchutil import emit, environment, hbm_bandwidth  # noqa: E402

from glm_jax.config import config_from_args  # noqa: E402
from glm_jax.decoding import BUCKET, bucket_length  # noqa: E402
from glm_jax.generate import decode_step, init_cache, make_prompts, prefill  # noqa: E402
from glm_jax.model import abstract_params  # noqa: E402
from glm_jax.quant import tree_bytes  # noqa: E402
from glm_jax.target import targeting  # noqa: E402
from glm_jax.tokenizer import IceTokenizer  # noqa: E402

GB = 1e9


def serving_config(preset: str, overrides: list[str], quantization: str = "int4"):
    return config_from_args(
        preset,
        overrides
        + [
            f"quantization={quantization}",
            "dtype=bfloat16",
            "param_dtype=bfloat16",
            "hidden_dropout=0",
            "attention_dropout=0",
        ],
    )


def _leaf(key, shape, dtype, name: str):
    """Random INT4 bytes, fp16 quantization scales (dequantized weights of std ~0.02), unit
    norm scales, zero biases, N(0, 0.02) embeddings."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.uint8:
        return jax.random.bits(key, shape, jnp.uint8)
    if dtype == jnp.float16:
        return (jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5) * 0.004).astype(dtype)
    if name == "scale":
        return jnp.ones(shape, dtype)
    if name == "bias":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def serving_abstract(config):
    """ShapeDtypeStructs of the generation layout (`serving_params`): one tree per layer."""
    stacked = nn.meta.unbox(abstract_params(config))
    layer = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), stacked.pop("layers"))
    return {**stacked, "layers": (layer,) * config.num_layers}


def random_params(config, key):
    """Random serving parameters of `config`, each leaf made by one jitted call on the default
    device (the largest, a layer's h->4h INT4 bytes, is 0.4 GB for GLM-130B)."""
    make = jax.jit(_leaf, static_argnums=(1, 2, 3))
    flat, treedef = jax.tree_util.tree_flatten_with_path(serving_abstract(config))
    out = [
        make(jax.random.fold_in(key, n), s.shape, s.dtype, str(getattr(path[-1], "key", path[-1])))
        for n, (path, s) in enumerate(flat)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def decode_args(batch: int):
    """decode_step's arguments after the cache (token, step, lengths, mask_pos, cont, prompt_len)."""
    return (
        jnp.zeros((batch,), jnp.int32),
        jnp.int32(0),
        jnp.ones((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.ones((batch,), bool),
        jnp.int32(16),
    )


def dry_run(config, args):
    """Compile the decode step for abstract arrays; print XLA's memory analysis (bytes). With
    --topology, for the first chip of that TPU topology (libtpu): a refusal for memory is
    reported as fits false with the compiler's message."""
    params = serving_abstract(config)
    cache = jax.eval_shape(lambda: init_cache(config, args.batch, args.cache, jnp.bfloat16))
    extra = jax.eval_shape(lambda: decode_args(args.batch))
    nbytes = lambda tree: sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(tree))
    record = dict(
        environment(),
        bench="130b_int4_dry_run",
        preset=args.preset,
        quantization=config.quantization,
        weight_gb=round(nbytes(params) / GB, 2),
        kv_cache_gb=round(nbytes(cache) / GB, 2),
    )
    if args.topology:
        from glm_jax.topology import compiler_hbm_gib, out_of_memory, parse_topology, topology_devices

        topo = parse_topology(args.topology)
        device = topology_devices(topo)[0]
        on = jax.sharding.SingleDeviceSharding(device)
        params, cache, extra = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on), (params, cache, extra)
        )
        record.update(
            platform="tpu",
            device_kind=device.device_kind,
            topology=topo.name,
            hbm_gib_per_chip=compiler_hbm_gib(device),
        )
    t0 = time.perf_counter()
    try:
        with targeting(device if args.topology else jax.devices()[0]):  # kernels for the chip compiled for
            compiled = decode_step.lower(config, params, cache, *extra).compile()
    except Exception as e:
        message = out_of_memory(e) if args.topology else None
        if message is None:
            raise
        emit(dict(record, fits=False, compiler_message=message, compile_seconds=round(time.perf_counter() - t0, 1)))
        return
    mem = compiled.memory_analysis()
    record["compile_seconds"] = round(time.perf_counter() - t0, 1)
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"):
        record[field.replace("_size_in_bytes", "_gb")] = round(getattr(mem, field, 0) / GB, 3)
    record["peak_estimate_gb"] = round(
        record["argument_gb"] + record["output_gb"] - record["alias_gb"] + record["temp_gb"], 2
    )
    if args.topology:  # accepted by the compiler; the peak must fit the chip too (GB here, GiB there)
        record["fits"] = record["peak_estimate_gb"] * GB / 2**30 <= record["hbm_gib_per_chip"]
    emit(record)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-130b")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cache", type=int, default=2048, help="KV cache slots (each step attends over all)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32, help="decode steps timed (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument(
        "--topology",
        default=None,
        metavar="NAME",
        help="with --dry-run: compile for one chip of this TPU topology (e.g. v5p-8, v4-8)",
    )
    ap.add_argument(
        "--quantize",
        choices=("int4", "none"),
        default="int4",
        help="none: the bf16 serving step (the dry run's comparison)",
    )
    args = ap.parse_args(argv)
    prompt_slots = bucket_length(args.prompt, multiple=BUCKET)
    if args.prompt <= 0 or prompt_slots + args.new + 1 > args.cache:
        ap.error(
            f"--prompt {args.prompt} (rounded up to {prompt_slots}) + --new {args.new} + 1 must fit in "
            f"--cache {args.cache}"
        )
    if args.topology and not args.dry_run:
        ap.error("--topology needs --dry-run (nothing runs on a described topology)")
    if args.quantize == "none" and not args.dry_run:
        ap.error("--quantize none is for --dry-run (the run itself is the INT4 benchmark)")
    config = serving_config(args.preset, args.set, args.quantize)
    if args.dry_run:
        return dry_run(config, args)
    env = environment()
    bandwidth = hbm_bandwidth(2.0 if env["backend"] == "gpu" else 0.25)  # before the weights fill the card
    t0 = time.perf_counter()
    params = jax.block_until_ready(random_params(config, jax.random.key(0)))
    build_s = time.perf_counter() - t0
    weight_bytes = tree_bytes(params)
    cache = init_cache(config, args.batch, args.cache, jnp.bfloat16)
    cache_bytes = tree_bytes(cache)
    rng = np.random.default_rng(0)
    ids = IceTokenizer.specials  # GLM-130B's special ids
    prompts = make_prompts(
        [list(rng.integers(20100, 150000, args.prompt - 1)) + [ids.gmask] for _ in range(args.batch)], config, ids
    )
    lengths = jnp.asarray(prompts.lengths)
    cache = prefill(config, params, cache, jnp.asarray(prompts.tokens), lengths)
    state = (
        lengths,
        jnp.asarray(prompts.mask_pos),
        jnp.asarray(prompts.continue_positions),
        jnp.int32(prompts.tokens.shape[1]),
    )
    token = jnp.asarray(prompts.start)
    logits, cache = decode_step(config, params, cache, token, jnp.int32(0), *state)  # compile + warm up
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(token)
    t0 = time.perf_counter()
    for step in range(1, args.new + 1):
        logits, cache = decode_step(config, params, cache, token, jnp.int32(step), *state)
        token = jnp.argmax(logits, -1).astype(jnp.int32)  # a real decode loop: the next step needs it
    jax.block_until_ready(token)
    per_token = (time.perf_counter() - t0) / args.new
    stats = jax.devices()[0].memory_stats() or {}
    floor = (weight_bytes + cache_bytes) / bandwidth
    record = dict(
        env,
        bench="130b_int4_decode",
        preset=args.preset,
        batch=args.batch,
        cache_slots=args.cache,
        weight_gb=round(weight_bytes / GB, 2),
        kv_cache_gb=round(cache_bytes / GB, 2),
        peak_memory_gb=round(stats.get("peak_bytes_in_use", 0) / GB, 2) or None,
        device_memory_gb=round(stats.get("bytes_limit", 0) / GB, 2) or None,
        build_s=round(build_s, 1),
        ms_per_token=round(1e3 * per_token, 2),
        floor_ms=round(1e3 * floor, 2),
        vs_floor=round(floor / per_token, 3),
        bandwidth_gb_s=round(bandwidth / GB, 1),
        finite=bool(jnp.isfinite(logits).all()),
    )
    emit(record)
    print(
        f"{args.preset} INT4: {record['ms_per_token']} ms/token (floor {record['floor_ms']} ms), "
        f"peak {record['peak_memory_gb']} GB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
