"""GLM-130B's optimizer (docs/reference.md#5-training-setup) in optax, plus loss scaling and the batch ramp-up.

- AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1 on every matrix incl. the embedding, not on
  biases and norms; global-norm clipping at 1.0.
- Learning rate by samples seen: linear warm-up from 1e-7 to the peak over `warmup_fraction` of
  the run's samples, then cosine decay to `min_lr_ratio` x peak at the end.
- Batch ramp-up (192 -> 4224 over the first 2.5% of samples in steps of 24 for GLM-130B): the
  batch is a whole number of fixed-size units, 1F1B microbatches on a pipelined mesh (one
  compiled step, its schedule as long as the step's batch) or passes otherwise (one compiled
  gradient pass, accumulated); the ramp's granularity is one unit (`pass_batch` here).
- Dynamic loss scaling for fp16 as Megatron does it (initial 2^16, growth window 2000, growth x2,
  hysteresis 2: the scale halves after that many overflows). Fine-tuning starts lower and grows
  fast (`FINETUNE_LOSS_SCALE`): from 2^7 (fairseq's initial scale) the scale doubles every finite
  step up to 2^16, and the first overflows halve it at once; Megatron's rule from the first
  finite step after them. A base whose ceiling is below 2^16 but above 2^7 then skips one step
  at the start, where Megatron's start skips one for every halving down to the ceiling and one
  more, the overflow its hysteresis absorbs (ChatGLM2-6B: two).
- The embedding gradient shrink alpha on a schedule: piecewise-constant (step, alpha) pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 8e-5
    init_lr: float = 1e-7
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.005  # of the run's samples
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # batch ramp-up: from `ramp_start` sequences to the full global batch over `ramp_fraction`
    # of the samples, in increments of `ramp_increment` (all rounded to whole passes)
    ramp_start: int | None = None  # None: no ramp
    ramp_fraction: float = 0.025
    ramp_increment: int = 24
    # fp16 loss scaling
    loss_scale_init: float = 2.0**16
    loss_scale_window: int = 2000
    loss_scale_hysteresis: int = 2
    loss_scale_min: float = 1.0
    # None: start at loss_scale_init. Else start here and double every finite step up to
    # loss_scale_init; until a step is finite after the run's first overflow, each overflow
    # halves the scale at once (no hysteresis)
    loss_scale_start: float | None = None
    max_consecutive_skips: int = 20
    # embedding gradient shrink schedule: ((from_step, alpha), ...); empty: the model config's
    embedding_alpha_schedule: tuple = ()


# Per-preset starting points: GLM-130B's numbers for the big models; short CPU runs of the tiny
# model need a higher peak and a warm-up that is a visible fraction of --steps.
PRESET_OPTIM = {
    "glm-130b": dict(ramp_start=192),
    "glm-tiny": dict(peak_lr=2e-3, init_lr=1e-5, warmup_fraction=0.05),
    "glm-1b": dict(peak_lr=3e-4, warmup_fraction=0.01),
}


# fp16 fine-tuning (finetune.py): start at fairseq's initial scale (2^7) and double every finite
# step up to Megatron's and torch's 2^16: at most one skipped step at the start where the base's
# ceiling is above 2^7, none where it is above 2^16
FINETUNE_LOSS_SCALE = dict(loss_scale_start=2.0**7)


def optim_for(preset: str, **overrides) -> OptimConfig:
    return OptimConfig(**{**PRESET_OPTIM.get(preset, {}), **overrides})


# ---- schedules -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    """Global batch per step, in whole passes of `pass_batch` sequences.

    Without a ramp every step has global_batch // pass_batch passes. With one (Megatron's rule),
    after c samples the batch is ramp_start + ramp_increment * floor(c / (R / n)), R being
    ramp_fraction of the planned samples (total_steps x global_batch) and n the number of
    increments, rounded up to whole passes and capped at the global batch.
    """

    global_batch: int
    pass_batch: int
    total_steps: int
    ramp_start: int | None = None
    ramp_fraction: float = 0.025
    ramp_increment: int = 24

    def __post_init__(self):
        if self.pass_batch <= 0 or self.global_batch % self.pass_batch:
            raise ValueError(
                f"global batch {self.global_batch} is not a whole number of passes of {self.pass_batch} sequences"
            )
        full = self.global_batch // self.pass_batch
        passes, seen = [], 0
        if self.ramp_start is not None:
            ramp_samples = self.ramp_fraction * self.total_steps * self.global_batch
            per_increment = ramp_samples / max((self.global_batch - self.ramp_start) / self.ramp_increment, 1)
            while seen < ramp_samples and len(passes) < self.total_steps:
                batch = self.ramp_start + self.ramp_increment * int(seen // per_increment)
                step_passes = max(1, min(full, -(-batch // self.pass_batch)))
                if step_passes == full:
                    break
                passes.append(step_passes)
                seen += step_passes * self.pass_batch
        object.__setattr__(self, "_ramp", tuple(passes))
        object.__setattr__(self, "_ramp_samples", seen)

    @property
    def ramp_note(self) -> str | None:
        """Why a requested ramp-up does not happen with these flags (None: it does, or none asked)."""
        if self.ramp_start is None or self._ramp:
            return None
        if self.ramp_start >= self.global_batch:
            return (
                f"batch ramp-up from {self.ramp_start} is off: the global batch {self.global_batch} is not "
                "larger; every step has the full batch"
            )
        if self.pass_batch >= self.global_batch:
            return (
                f"batch ramp-up from {self.ramp_start} is off: a step is one pass of {self.pass_batch} "
                "sequences; ramp in passes (--pass-batch) or microbatches (the 1f1b schedule of a pipelined mesh)"
            )
        return (
            f"batch ramp-up from {self.ramp_start} is off: {self.total_steps} steps leave no ramp at "
            f"{self.pass_batch}-sequence granularity"
        )

    def passes(self, step: int) -> int:
        """Gradient passes accumulated at `step`."""
        return self._ramp[step] if step < len(self._ramp) else self.global_batch // self.pass_batch

    def batch(self, step: int) -> int:
        return self.passes(step) * self.pass_batch

    def samples_before(self, step: int) -> int:
        """Sequences consumed by steps 0 .. step-1."""
        ramp = min(step, len(self._ramp))
        return self.pass_batch * sum(self._ramp[:ramp]) + (step - ramp) * self.global_batch

    @property
    def total_samples(self) -> int:
        return self.samples_before(self.total_steps)


def learning_rate(cfg: OptimConfig, samples_seen, total_samples: int):
    """Warm-up from init_lr to peak over warmup_fraction of the samples, cosine to min_lr_ratio x peak."""
    warm = max(cfg.warmup_fraction * total_samples, 1.0)
    samples = jnp.asarray(samples_seen, jnp.float32)
    warm_lr = cfg.init_lr + (cfg.peak_lr - cfg.init_lr) * jnp.minimum(samples / warm, 1.0)
    progress = jnp.clip((samples - warm) / jnp.maximum(total_samples - warm, 1.0), 0.0, 1.0)
    floor = cfg.min_lr_ratio * cfg.peak_lr
    cos_lr = floor + (cfg.peak_lr - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(samples < warm, warm_lr, cos_lr)


def embedding_alpha(cfg: OptimConfig, step, default: float):
    """The shrink alpha in force at `step` (piecewise constant from the schedule)."""
    alpha = jnp.asarray(default, jnp.float32)
    for from_step, value in sorted(cfg.embedding_alpha_schedule):
        alpha = jnp.where(step >= from_step, jnp.float32(value), alpha)
    return alpha


# ---- the optimizer ---------------------------------------------------------------------------------
def decay_mask(params) -> Any:
    """True where weight decay applies: matrices incl. the embedding; not biases or norms."""

    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not (names[-1] == "bias" or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip -> Adam -> decoupled weight decay -> x(-lr); lr is passed per step as a hyperparameter."""

    def build(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(cfg.clip_norm),
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(build)(learning_rate=cfg.init_lr)


# ---- dynamic loss scaling ----------------------------------------------------------------------------
@flax.struct.dataclass
class LossScale:
    """Megatron's DynamicGradScaler state. For bf16/fp32 the scale stays 1 (`dynamic=False`)."""

    scale: jax.Array
    growth_tracker: jax.Array
    hysteresis_tracker: jax.Array

    @classmethod
    def create(cls, cfg: OptimConfig, dynamic: bool) -> LossScale:
        return cls(
            scale=jnp.float32((cfg.loss_scale_start or cfg.loss_scale_init) if dynamic else 1.0),
            growth_tracker=jnp.int32(0),
            hysteresis_tracker=jnp.int32(cfg.loss_scale_hysteresis),
        )

    def update(self, finite, cfg: OptimConfig, dynamic: bool, skipped=0, consecutive_skips=0) -> LossScale:
        """The scale after a step whose gradients were `finite` or not. skipped, consecutive_skips:
        the run's skip counters before this step. With cfg.loss_scale_start, the start: until the
        first overflow the scale doubles every finite step up to loss_scale_init, and until a
        step is finite again every overflow halves it at once."""
        if not dynamic:
            return self
        hysteresis = jnp.where(finite, self.hysteresis_tracker, self.hysteresis_tracker - 1)
        back_off = (~finite) & (hysteresis <= 0)
        growth = jnp.where(finite, self.growth_tracker + 1, 0)
        grow = finite & (growth >= cfg.loss_scale_window)
        scale = jnp.where(back_off, jnp.maximum(self.scale * 0.5, cfg.loss_scale_min), self.scale)
        megatron = LossScale(
            scale=jnp.where(grow, scale * 2.0, scale),
            growth_tracker=jnp.where(grow, 0, growth),
            hysteresis_tracker=jnp.where(grow, cfg.loss_scale_hysteresis, hysteresis),
        )
        if cfg.loss_scale_start is None:
            return megatron
        ramp = finite & (skipped == 0) & (self.scale < cfg.loss_scale_init)
        halve = (~finite) & (skipped == consecutive_skips)  # no finite step since the run's first overflow
        start = LossScale(
            scale=jnp.where(
                finite,
                jnp.minimum(self.scale * 2.0, cfg.loss_scale_init),
                jnp.maximum(self.scale * 0.5, cfg.loss_scale_min),
            ),
            growth_tracker=jnp.int32(0),
            hysteresis_tracker=jnp.int32(cfg.loss_scale_hysteresis),
        )
        return jax.tree_util.tree_map(lambda a, b: jnp.where(ramp | halve, a, b), start, megatron)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
