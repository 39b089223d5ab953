"""A training step compiled against its mesh without allocating anything: memory and FLOPs per device.

    report = dry_run(trainer, seq_len)     # the keys below; `python experiments/pretrain.py --dry-run`

On an AOT TPU topology (`topology.py`) the TPU compiler's figures; on CPU the CPU compiler's,
which schedule buffers differently (a plan's scale, not a TPU's exact bytes).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.objectives import CONTRACT_KEYS
from glm_jax.topology import out_of_memory
from glm_jax.train_state import state_bytes_per_device

GIB = 2.0**30


def dry_run(trainer, seq_len: int) -> dict:
    """Lower and compile one training step (train.Trainer's fused step over its whole batch) and
    report per-device memory: weights, optimizer state, checkpoint (what a device writes in a
    save and holds in a restore target), the rest XLA needs (activations at this microbatch size),
    and FLOPs per step. A compile refused for memory (an accelerator's compiler, e.g. an AOT TPU
    plan) is reported with `fits` false and the compiler's message."""
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
    try:
        with trainer.context():
            compiled = trainer._fused_step.lower(*args).compile()
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
        "compile_seconds": time.perf_counter() - started,
    }
