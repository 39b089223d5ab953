"""A training step, or inference's prefill and decode step, compiled against a mesh without
allocating anything: memory (and FLOPs) per device.

    report = dry_run(trainer, seq_len)     # the keys below; `python experiments/pretrain.py --dry-run`
    report = inference_dry_run(config, mesh, batch=1, cache_len=2048, prefill_len=2048)
                                           # `python experiments/bench_130b_int4.py --dry-run --mesh 1x8 ...`

On an AOT TPU topology (`topology.py`) the TPU compiler's figures; on CPU the CPU compiler's,
which schedule buffers differently (a plan's scale, not a TPU's exact bytes).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax import pipeline, placement
from glm_jax import sharding as sh
from glm_jax.collectives import collective_bytes, executed_costs
from glm_jax.config import GLMConfig
from glm_jax.generate import decode_step, init_cache, prefill
from glm_jax.layers import recording_attention
from glm_jax.model import abstract_params
from glm_jax.objectives import CONTRACT_KEYS
from glm_jax.target import targeting
from glm_jax.topology import out_of_memory
from glm_jax.train_state import state_bytes_per_device

GIB = 2.0**30


def compiled_fields(text: str, mesh, trip_count_default: int | None = None) -> dict:
    """What a compiled program's HLO text says one device does per execution (`collectives.py`):
    `collectives` (bytes, wire bytes and executions by kind and mesh axis, loops times their trip
    counts), `executed_flops_per_device` (dot/convolution FLOPs, loops counted, a conditional's
    busiest branch) and `uncosted_kernels` (kernel calls without a FLOP estimate: not in the
    FLOPs). A loop whose trip count is only known at run time counts trip_count_default times."""
    costs = executed_costs(text, trip_count_default)
    return {
        "collectives": collective_bytes(text, mesh, trip_count_default),
        "executed_flops_per_device": costs["flops"],
        "uncosted_kernels": costs["uncosted_kernels"],
    }


def tick_count(trainer) -> int | None:
    """The trip count of a 1F1B step's tick loop at the trainer's microbatches (M + 2 (S - 1)):
    the one loop of a step whose count is only known at run time; None for other schedules."""
    if trainer.schedule != "1f1b":
        return None
    return trainer.microbatches + 2 * (trainer.plan.stages - 1)


def dry_run(trainer, seq_len: int, hlo_file: str | None = None) -> dict:
    """Lower and compile one training step (train.Trainer's fused step over its whole batch) and
    report per-device memory: weights, optimizer state, checkpoint (what a device writes in a
    save and holds in a restore target), the rest XLA needs (activations at this microbatch size),
    FLOPs per step, the attention each layer kind traced to (`attention_impl_used`, see
    `layers.recording_attention`) and what the compiled step executes (`compiled_fields`, the 1F1B
    tick loop counted `tick_count` times); hlo_file: write the compiled step's HLO text there. A
    compile refused for memory (an accelerator's compiler, e.g. an AOT TPU plan) is reported with
    `fits` false and the compiler's message."""
    sh.check_splittable(trainer.config, trainer.mesh, seq_len=seq_len)  # the context axis splits each sequence
    started = time.perf_counter()
    shapes = trainer.state_shapes(trainer.plan)
    batch = {
        k: jax.ShapeDtypeStruct((trainer.pass_batch, seq_len), jnp.int32, sharding=trainer.batch_sharding)
        for k in CONTRACT_KEYS
    }
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=trainer.replicated)
    used = jax.ShapeDtypeStruct((), jnp.int32, sharding=trainer.replicated)
    votes = jax.ShapeDtypeStruct((trainer.mesh.size,), jnp.int32, sharding=trainer.vote_sharding)
    tokens = trainer.pass_batch * seq_len
    head = {
        "devices": int(trainer.mesh.size),
        "mesh": dict(trainer.mesh.shape),
        "layers_per_stage": trainer.plan.layers_per_stage,
        "schedule": trainer.schedule,
        "fsdp": trainer.fsdp,
        "fsdp_gather": trainer.fsdp_gather if trainer.fsdp else None,
        "sequence_parallel": trainer.sequence_parallel,
        "microbatches": trainer.microbatches,
        "micro_batch_per_replica": trainer.microbatch_rows // sh.axis_size(trainer.mesh, "data"),
        "bubble_fraction": pipeline.bubble_fraction(trainer.schedule, trainer.plan.stages, trainer.microbatches),
        "weights_gib_per_device": sh.per_device_bytes(shapes.params, trainer.state_shardings.params) / GIB,
        "optimizer_gib_per_device": sh.per_device_bytes(shapes.opt_state, trainer.state_shardings.opt_state) / GIB,
        "checkpoint_gib_per_device": state_bytes_per_device(trainer) / GIB,
    }
    flops = {"model_flops_per_step": trainer.model_flops_per_step(tokens, seq_len), "tokens_per_step": tokens}
    args = (  # the fused step's: state, frozen, batch, used microbatches, stop votes, lr, alpha
        sh.abstract_tree(shapes, trainer.state_shardings),
        sh.abstract_tree(trainer.frozen_shapes, trainer.frozen_shardings),
        batch,
        used,
        votes,
        scalar,
        scalar,
    )
    with trainer.context(), recording_attention() as attention:
        lowered = trainer._fused_step.lower(*args)
    head["attention_impl_used"] = attention
    try:
        with trainer.context():
            compiled = lowered.compile()
    except Exception as error:  # an accelerator's compiler refuses a plan over its memory: report it
        message = out_of_memory(error)
        if message is None:
            raise
        return {
            **head,
            "fits": False,
            "compiler_message": message,
            **flops,
            "compile_seconds": time.perf_counter() - started,
        }
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    text = compiled.as_text()
    if hlo_file:
        with open(hlo_file, "w") as f:
            f.write(text)
    return {
        **head,
        "arguments_gib_per_device": memory.argument_size_in_bytes / GIB,
        "temp_gib_per_device": memory.temp_size_in_bytes / GIB,
        "peak_gib_per_device": (
            memory.argument_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
        / GIB,
        "compiled_flops_per_device": float(cost.get("flops", float("nan"))),
        **flops,
        **compiled_fields(text, trainer.mesh, tick_count(trainer)),
        "compile_seconds": time.perf_counter() - started,
    }


# ---- inference ---------------------------------------------------------------------------------------
def serving_shapes(config: GLMConfig) -> dict:
    """ShapeDtypeStructs of the generation layout (`generate.serving_params`): one tree per layer."""
    stacked = nn.meta.unbox(abstract_params(config))
    layer = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), stacked.pop("layers"))
    return {**stacked, "layers": (layer,) * config.num_layers}


def serving_shardings(config: GLMConfig, mesh) -> dict:
    """`placement.param_shardings` in the generation layout (what `placement.place` does to a
    per-layer tree): each layer's leaves without the stacked `layers` axis. mesh: a Mesh, or an
    AbstractMesh to count bytes without devices."""
    specs = placement.param_shardings(config, mesh)
    specs.pop("layers")
    return {**specs, "layers": (placement.layer_shardings(config, mesh),) * config.num_layers}


def inference_shapes(config: GLMConfig, mesh, batch: int, cache_len: int, cache_dtype=jnp.bfloat16):
    """(parameters, KV cache) as ShapeDtypeStructs carrying their inference shardings: weights by
    `placement.param_shardings`, the cache [B, M, K, D] by `placement.cache_sharding` (rows padded
    to the data axis). Nothing is allocated; an AbstractMesh serves for counting bytes."""
    params = sh.abstract_tree(serving_shapes(config), serving_shardings(config, mesh))
    rows = placement.padded_rows(batch, mesh)
    on = placement.cache_sharding(config, mesh)
    cache = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on),
        jax.eval_shape(lambda: init_cache(config, rows, cache_len, cache_dtype)),
    )
    return params, cache


def bytes_per_device(tree) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (replicated parts in full)."""
    return sh.per_device_bytes(tree, jax.tree_util.tree_map(lambda s: s.sharding, tree))


def inference_dry_run(
    config: GLMConfig, mesh, batch: int, cache_len: int, prefill_len: int, cache_dtype=jnp.bfloat16
) -> dict:
    """Compile generation's two programs sharded on an inference mesh (data, 1, tensor) for
    abstract arrays: `generate.prefill` of a `prefill_len`-token context into a `cache_len`-slot
    KV cache, and one `generate.decode_step` attending over every slot; report per-device bytes of
    the weights and the cache, and each program's temporaries and peak (arguments + temporaries +
    outputs - donated) and what it executes (`compiled_fields`, keys prefixed by the program's
    name), and the attention each layer kind traced to (`attention_impl_used`);
    `temp_gib_per_device` / `peak_gib_per_device` are the larger program's. A
    compile refused for memory (an accelerator's compiler) gives `fits` false, that program's
    `compiler_message` and no plan-wide temp / peak (the other program's figures stay)."""
    placement.check_inference_mesh(config, mesh)
    if not 0 < prefill_len <= cache_len - config.prefix_slots:
        raise ValueError(f"a prefill of {prefill_len} tokens does not fit a cache of {cache_len} slots")
    started = time.perf_counter()
    params, cache = inference_shapes(config, mesh, batch, cache_len, cache_dtype)
    rows = placement.padded_rows(batch, mesh)
    per_row, whole = NamedSharding(mesh, P("data")), placement.replicated(mesh)
    arg = lambda shape, on, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
    tokens = arg((rows, prefill_len), sh.batch_sharding(mesh))
    row, scalar = arg((rows,), per_row), arg((), whole)
    # prefill(config, params, cache, tokens, lengths, causal) and
    # decode_step(config, params, cache, token, step, lengths, mask_pos, cont, prompt_len)
    programs = {
        "prefill": (prefill, (config, params, cache, tokens, row, False)),
        "decode": (decode_step, (config, params, cache, row, scalar, row, row, arg((rows,), per_row, bool), scalar)),
    }
    report = {
        "devices": int(mesh.size),
        "mesh": dict(mesh.shape),
        "batch": batch,
        "rows": rows,
        "cache_slots": cache_len,
        "prefill_tokens": prefill_len,
        "weights_gib_per_device": bytes_per_device(params) / GIB,
        "kv_cache_gib_per_device": bytes_per_device(cache) / GIB,
        "fits": True,
    }
    temps, peaks = [], []
    with recording_attention() as attention:
        for name, (fn, args) in programs.items():
            begun = time.perf_counter()
            try:
                with targeting(mesh):  # kernel choices for the devices compiled for
                    compiled = fn.lower(*args).compile()
            except Exception as error:  # an accelerator's compiler refuses a program over its memory: report it
                message = out_of_memory(error)
                if message is None:
                    raise
                report.update({"fits": False, f"{name}_compiler_message": message})
                report[f"{name}_compile_seconds"] = time.perf_counter() - begun
                continue
            memory = compiled.memory_analysis()
            peak = (
                memory.argument_size_in_bytes
                + memory.temp_size_in_bytes
                + memory.output_size_in_bytes
                - memory.alias_size_in_bytes
            ) / GIB
            temps.append(memory.temp_size_in_bytes / GIB)
            peaks.append(peak)
            report[f"{name}_temp_gib_per_device"] = temps[-1]
            report[f"{name}_peak_gib_per_device"] = peak
            report |= {f"{name}_{k}": v for k, v in compiled_fields(compiled.as_text(), mesh).items()}
            report[f"{name}_compile_seconds"] = time.perf_counter() - begun
    report["attention_impl_used"] = attention
    accepted = report["fits"]  # both compiled: the plan's figures are the larger program's
    report["temp_gib_per_device"] = max(temps) if accepted else None
    report["peak_gib_per_device"] = max(peaks) if accepted else None
    report["compile_seconds"] = time.perf_counter() - started
    return report
