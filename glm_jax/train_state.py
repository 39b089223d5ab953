"""The training state and its checkpoints: what a step folder holds and how it comes back.

A step folder (`checkpoints.Checkpoints`) holds the state as the run lies on its mesh: `params`
(the trainable parameters, layers in the run's slot layout), `opt_state` (ZeRO-1 moments),
`train` (step, loss scale, rng, skip counters) and `meta`. Each process writes and reads its own
shards; onto another stage count the saved slots are re-slotted on the devices.

The functions take a `train.Trainer` (duck-typed: `plan`, `config`, `mesh`, `state_shapes`,
`shardings_for`, `state_shardings`, `param_like`), so this module sits below `train.py`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints, layout, saved_plan
from glm_jax.optim import LossScale


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # slot layout (pipeline.PipelinePlan)
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array  # raw uint32 key data, so checkpoints need no key type
    skipped: jax.Array  # steps skipped for non-finite gradients, total
    consecutive_skips: jax.Array


def train_item(state) -> dict:
    """The `train` item of a TrainState (arrays, or ShapeDtypeStructs as a restore target)."""
    return {
        "step": state.step,
        "loss_scale": state.loss_scale,
        "rng": state.rng,
        "skipped": state.skipped,
        "consecutive_skips": state.consecutive_skips,
    }


def save_state(ckpt: Checkpoints, trainer, step: int, state, meta: dict) -> None:
    """Write `state` (a TrainState) as it lies on the mesh: no conversion, nothing compiled."""
    ckpt.save(
        step,
        {"params": state.params, "opt_state": state.opt_state, "train": train_item(state)},
        {**meta, "layout": layout(trainer.plan)},
    )


def restore_state(ckpt: Checkpoints, trainer, step: int, meta: dict):
    """The TrainState of `step` in `trainer`'s shardings. Same stage count: every device
    reads its own shards. Another stage count: the saved slots are read sharded over the new mesh
    (layers over `stage` where it divides them) and re-slotted on the devices."""
    saved = saved_plan(meta, trainer.config)
    same_stages = saved.stages == trainer.plan.stages
    shapes = trainer.state_shapes(saved)
    shardings = trainer.state_shardings if same_stages else trainer.shardings_for(shapes)
    target = sh.abstract_tree(shapes, shardings)
    items = ckpt.restore(step, {"params": target.params, "opt_state": target.opt_state, "train": train_item(target)})
    state = TrainState(params=items["params"], opt_state=items["opt_state"], **items["train"])
    if same_stages:
        return state
    reslot = lambda tree: pipeline.params_to_slots(pipeline.params_from_slots(tree, saved), trainer.plan)
    with jax.set_mesh(trainer.mesh):
        return jax.jit(
            lambda restored: restored.replace(
                params=reslot(restored.params), opt_state=trainer.param_like(restored.opt_state, reslot, lambda x: x)
            ),
            out_shardings=trainer.state_shardings,
        )(state)


def state_bytes_per_device(trainer) -> float:
    """Bytes of the training state on one device: what it holds in a restore target and, at
    most (replicated shards are written once), what it writes in a save."""
    return sh.per_device_bytes(trainer.state_shapes(trainer.plan), trainer.state_shardings)
