"""The exact GLM-130B with INT4 weights decoding on ONE GPU: peak memory and ms/token; and its
inference plans on TPU meshes and GPU servers.

    python experiments/bench_130b_int4.py [--preset glm-130b] [--cache 2048] [--new 32] [--dry-run]
    python experiments/bench_130b_int4.py --dry-run --topology v5p-8 [--quantize none]   # one TPU v5p chip
    python experiments/bench_130b_int4.py --dry-run --topology v5e-8 --mesh 1x8 [--quantize int4|int8|none]
    python experiments/bench_130b_int4.py --gpu-table      # GLM-130B's GPU setups, from the shapes

Random INT4 weights are generated on the device, leaf by leaf, straight into generation's
per-layer layout (`generate.serving_params`; no host copy of 130B parameters, no second copy
on the device); embeddings, norms and biases are bf16, the KV cache bf16 with `--cache` slots,
every one of which each decode step attends over (masked). Reports peak device memory and
ms/token against the floor: (all weight
bytes, INT4 layers plus the bf16 embedding the tied head reads, plus the KV cache bytes) over
the HBM bandwidth measured in the same run. --dry-run compiles the decode step for abstract
arrays and prints XLA's memory analysis without allocating anything (works on a laptop).

--dry-run --topology T --mesh DxT (or 1xT: data x tensor; a stage axis of 1) compiles the SHARDED
prefill (--prefill tokens, default the whole cache) and decode step ahead of time for the
described TPU devices (libtpu; `dry_run.inference_dry_run`): weights placed by
`placement.param_shardings` of the quantized config, the KV cache by `placement.cache_sharding`.
One JSON line: whether both programs fit the compiler's HBM, per-chip weights / KV cache /
temporaries / peak, and the decode floor (a chip's weights and KV cache over its HBM bandwidth,
`topology.CHIPS`). A plan over HBM is reported (fits false), not raised.

--gpu-table prints, for GLM-130B's GPU setups (8 x A100-40G FP16, 8 x RTX 3090 INT8, 4 x RTX 3090
INT4, 1 x H100-80G INT4), the same per-device figures counted from the shapes (nothing compiles
for a GPU here), beside the published FasterTransformer / SAT timings, one JSON line per setup.
"""

import os

# the weights take most of an 80 GB card: let JAX's allocator have nearly all of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from benchutil import emit, environment, hbm_bandwidth  # noqa: E402

from glm_jax import sharding as sh  # noqa: E402
from glm_jax.config import config_from_args  # noqa: E402
from glm_jax.decoding import BUCKET, bucket_length  # noqa: E402
from glm_jax.dry_run import bytes_per_device, inference_dry_run, inference_shapes, serving_shapes  # noqa: E402
from glm_jax.generate import decode_step, init_cache, make_prompts, prefill  # noqa: E402
from glm_jax.quant import tree_bytes  # noqa: E402
from glm_jax.target import targeting  # noqa: E402
from glm_jax.tokenizer import IceTokenizer  # noqa: E402
from glm_jax.topology import (  # noqa: E402
    TopologyError,
    compiler_hbm_gib,
    decode_floor_ms,
    inference_fields,
    out_of_memory,
    parse_topology,
    topology_devices,
)

GB = 1e9
GIB = 2.0**30

# GLM-130B's GPU setups (its README's hardware table; 1 x H100-80G is this script's own run) and
# each card's memory bandwidth (1e9 bytes/s) with where the figure is printed
GPUS = {
    "A100-40G": dict(
        memory_gib=40,
        gb_per_s=1555.0,
        source="NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): A100 40GB SXM "
        "GPU memory bandwidth 1,555 GB/s (5120-bit HBM2)",
    ),
    "RTX 3090": dict(
        memory_gib=24,
        gb_per_s=936.0,
        source="NVIDIA GeForce RTX 3090 specifications: 24 GB GDDR6X, 384-bit, 19.5 Gbps = 936 GB/s",
    ),
    "H100-80G SXM": dict(
        memory_gib=80,
        gb_per_s=3350.0,
        source="NVIDIA H100 Tensor Core GPU datasheet: H100 SXM GPU memory bandwidth 3.35 TB/s (HBM3)",
    ),
}
GPU_SETUPS = (  # (name, card, cards = tensor axis, quantization)
    ("8 x A100-40G FP16", "A100-40G", 8, "none"),
    ("8 x RTX 3090 INT8", "RTX 3090", 8, "int8"),
    ("4 x RTX 3090 INT4", "RTX 3090", 4, "int4"),
    ("1 x H100-80G INT4", "H100-80G SXM", 1, "int4"),
)
FT_SOURCE = "THUDM/GLM-130B docs/inference-with-fastertransformer.md, Benchmark (DGX-A100, 8 x 40G)"
SAT_SOURCE = "THUDM/GLM-130B docs/quantization.md, Space and Speed Benchmark (SAT)"
PUBLISHED = {  # seconds to decode N tokens / milliseconds to encode N tokens, batch 1
    "8 x A100-40G FP16": {
        "fastertransformer_decode_s": {512: 18.77, 1024: 39.81, 2048: 89.88},
        "fastertransformer_encode_ms": {512: 120.0, 1024: 220.0, 2048: None},  # 2048: OOM
        "sat_decode_s": {512: 45.21, 1024: 89.00, 2048: 179.22},
        "sources": [FT_SOURCE, SAT_SOURCE],
    },
    "4 x RTX 3090 INT4": {
        "sat_decode_s": {512: 138.66, 1024: 292.69, 2048: 649.64},
        "fastertransformer_decode_s": {2048: 150.0},  # INT4, the GLM-130B paper via docs/reference.md
        "sources": [SAT_SOURCE, "docs/reference.md section 6 (GLM-130B paper): FasterTransformer INT4"],
    },
}


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
    return serving_shapes(config)


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


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def mesh_plan(
    config, topology: str, mesh_spec: str, batch: int, cache: int, prefill_len: int, preset: str = "glm-130b"
) -> dict:
    """The sharded prefill + decode plan of `config` on `mesh_spec` over the described TPU
    `topology` (`dry_run.inference_dry_run` + `topology.inference_fields`). Raises
    topology.TopologyError / sharding.MeshError for a name or a mesh that cannot be."""
    topo = parse_topology(topology)
    devices = topology_devices(topo)
    mesh = sh.make_mesh(mesh_spec, devices)
    report = inference_dry_run(config, mesh, batch, cache, prefill_len)
    axes = report.pop("mesh")
    return {
        "bench": "130b_inference_plan",
        "preset": preset,
        "mesh": mesh_spec,
        "mesh_axes": axes,
        "topology": topo.name,
        "quantize": config.quantization,
        **report,
        **inference_fields(topo, devices, report),
        "jax": jax.__version__,
        "libtpu": libtpu_version(),
    }


def gpu_table(preset: str = "glm-130b", cache: int = 2048, batch: int = 1, overrides=()) -> list[dict]:
    """Per-GPU bytes of GLM-130B's GPU setups counted from the shapes: the quantized config's
    parameter tree placed by `placement.param_shardings` on an abstract (1, 1, cards) mesh (INT4 /
    INT8 layers packed with fp16 scales per output row, embeddings, norms and biases 16-bit, the
    vocab-parallel embedding split, replicated parts counted on every card) and the KV cache by
    `placement.cache_sharding` (16-bit, `batch` rows of `cache` slots); the decode floor is those
    bytes over the card's memory bandwidth. Beside it, the published timings (`PUBLISHED`)."""
    auto = (jax.sharding.AxisType.Auto,) * 3
    rows = []
    for name, card, cards, quantization in GPU_SETUPS:
        config = serving_config(preset, list(overrides), quantization)
        mesh = jax.sharding.AbstractMesh((1, 1, cards), sh.AXES, axis_types=auto)
        params, kv = inference_shapes(config, mesh, batch, cache)
        weights, cache_bytes = bytes_per_device(params), bytes_per_device(kv)
        gpu = GPUS[card]
        row = {
            "bench": "130b_gpu_table",
            "setup": name,
            "gpu": card,
            "gpus": cards,
            "tensor": cards,
            "quantize": "fp16" if quantization == "none" else quantization,
            "batch": batch,
            "cache_slots": cache,
            "weights_gib_per_device": weights / GIB,
            "kv_cache_gib_per_device": cache_bytes / GIB,
            "resident_gib_per_device": (weights + cache_bytes) / GIB,
            "memory_gib_per_device": gpu["memory_gib"],
            "hbm_gb_per_s": gpu["gb_per_s"],
            "decode_ms_per_token_floor": decode_floor_ms(weights + cache_bytes, gpu["gb_per_s"]),
            "bandwidth_source": gpu["source"],
        }
        published = PUBLISHED.get(name)
        if published:
            row["published"] = published
            for tokens, seconds in published.get("fastertransformer_decode_s", {}).items():
                row[f"fastertransformer_ms_per_token_{tokens}"] = 1e3 * seconds / tokens
            for tokens, seconds in published.get("sat_decode_s", {}).items():
                row[f"sat_ms_per_token_{tokens}"] = 1e3 * seconds / tokens
        rows.append(row)
    return rows


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
        "--mesh",
        default=None,
        metavar="DxT",
        help="with --dry-run --topology: the sharded prefill + decode plan on this (data x tensor) mesh, e.g. 1x8",
    )
    ap.add_argument(
        "--prefill",
        type=int,
        default=None,
        metavar="TOKENS",
        help="with --mesh: the context the prefill writes (default: the whole --cache)",
    )
    ap.add_argument(
        "--quantize",
        choices=("int4", "int8", "none"),
        default="int4",
        help="int8 / none (bf16): the dry runs' comparisons",
    )
    ap.add_argument(
        "--gpu-table",
        action="store_true",
        help="print GLM-130B's GPU setups' per-device bytes and decode floors, counted from the shapes",
    )
    args = ap.parse_args(argv)
    if args.gpu_table:
        for row in gpu_table(args.preset, args.cache, args.batch, args.set):
            emit(row)
        return
    prompt_slots = bucket_length(args.prompt, multiple=BUCKET)
    if args.prompt <= 0 or prompt_slots + args.new + 1 > args.cache:
        ap.error(
            f"--prompt {args.prompt} (rounded up to {prompt_slots}) + --new {args.new} + 1 must fit in "
            f"--cache {args.cache}"
        )
    if args.topology and not args.dry_run:
        ap.error("--topology needs --dry-run (nothing runs on a described topology)")
    if args.quantize != "int4" and not args.dry_run:
        ap.error(f"--quantize {args.quantize} is for --dry-run (the run itself is the INT4 benchmark)")
    if args.mesh and not args.topology:
        ap.error("--mesh plans a TPU mesh: it needs --dry-run --topology NAME")
    if args.prefill is not None and not args.mesh:
        ap.error("--prefill is for the sharded plan (--mesh)")
    prefill_len = args.cache if args.prefill is None else args.prefill
    if args.mesh and not 0 < prefill_len <= args.cache:
        ap.error(f"--prefill {prefill_len} must be between 1 and --cache {args.cache}")
    config = serving_config(args.preset, args.set, args.quantize)
    if args.mesh:
        try:
            record = mesh_plan(config, args.topology, args.mesh, args.batch, args.cache, prefill_len, args.preset)
        except (TopologyError, sh.MeshError) as error:
            ap.error(str(error))
        for key, value in record.items():
            print(f"{key:>34}: {value:,.3f}" if isinstance(value, float) else f"{key:>34}: {value}", file=sys.stderr)
        emit(record)
        return record
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
