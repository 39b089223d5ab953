"""Train state, the jitted step on a mesh, and the training loop.

One `Trainer` holds everything placement-related: the mesh, the pipeline plan and schedule, the
logical rules and the shardings of parameters (slot layout, `sharding.py`), optimizer state
(ZeRO-1) and batches. Its jitted functions:

- `grad_pass(params, batch, rng, alpha, scale, microbatches)`: gradients of scale x (summed token
  loss) over one batch, with the loss sum and token count;
- `update(state, grads, loss_sum, tokens, lr, stop)`: unscale, divide by the step's token count
  (the loss is normalised globally, whatever the number of passes), skip the step if any gradient
  is not finite, clip, AdamW, advance the loss scale; reduce the processes' stop votes;
- `fused_step(state, batch, lr, alpha, microbatches, stop)`: the two fused.

Schedules (`pipeline.py`): on a pipelined mesh "1f1b" (the default) runs every microbatch of a
step, a ramped batch included, through one schedule, one compiled step for every batch size;
"gpipe" runs a step as passes of `pass_batch` sequences, accumulated. Without stages the plain
model runs, in passes. Checkpoints: `checkpoints.py`; stop signals and metrics files: `runlog.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints, check_config_matches, copy_tokenizer
from glm_jax.config import ConfigError, GLMConfig
from glm_jax.data import DataIterator
from glm_jax.model import GLM, abstract_params, dummy_batch
from glm_jax.optim import (
    BatchSchedule,
    LossScale,
    OptimConfig,
    all_finite,
    embedding_alpha,
    learning_rate,
    make_optimizer,
)
from glm_jax.peft import PeftConfig, combine, split
from glm_jax.runlog import MetricsWriter, StopSignal, plot_metrics
from glm_jax.summary import flops_per_token
from glm_jax.target import targeting
from glm_jax.train_state import TrainState, restore_state, save_state

# dense bf16 FLOP/s per device, by device_kind. TPU kinds are matched exactly ("TPU v5 lite" is
# v5e, "TPU v5" is v5p; glm_jax/topology.py has the sources); GPU kinds by the longest name inside
# the reported kind ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    if kind.startswith("TPU"):
        return PEAK_FLOPS.get(kind)
    found = [k for k in PEAK_FLOPS if not k.startswith("TPU") and k.lower() in kind.lower()]
    return PEAK_FLOPS[max(found, key=len)] if found else None


@dataclasses.dataclass
class Trainer:
    config: GLMConfig
    optim: OptimConfig
    mesh: jax.sharding.Mesh
    pass_batch: int  # sequences per gradient pass; with 1f1b the largest batch of a step
    microbatches: int | None = None  # per pass (default: one sequence per data replica each)
    fsdp: bool = False
    # which parameters train (peft.py); the rest are `frozen`, an argument of every step
    peft: PeftConfig = PeftConfig("full")
    schedule: str | None = None  # "1f1b" or "gpipe" on a pipelined mesh (default 1f1b); "none" without

    def __post_init__(self):
        c, mesh, peft = self.config, self.mesh, self.peft
        if c.quantization != "none" and not peft.is_adapter:
            raise ConfigError(
                f"quantization={c.quantization} is weight-only quantization for serving: train in float "
                "(quantization=none), then `python experiments/quantize.py`; a quantized base trains "
                "LoRA or P-tuning adapters only"
            )
        self.microbatches = pipeline.microbatch_count(self.microbatches, self.pass_batch, mesh)
        sh.check_splittable(c, mesh, self.pass_batch, self.microbatches)
        self.plan = pipeline.PipelinePlan(c.num_layers, sh.axis_size(mesh, "stage"))
        if self.plan.stages == 1:
            self.schedule = "none"
        elif (self.schedule or "1f1b") not in pipeline.SCHEDULES:
            raise ConfigError(f"pipeline schedule {self.schedule!r}; choose one of {pipeline.SCHEDULES}")
        self.schedule = self.schedule or "1f1b"
        if peft.method == "freeze" and self.plan.stages > 1:
            raise ConfigError(
                "freeze splits the layer stack at a layer; run it on a mesh without pipeline stages "
                "(--mesh DATAx1xTENSOR), or use lora / ptuning / full on this mesh"
            )
        self.rules = sh.rules_for(c, mesh, fsdp=self.fsdp)
        self.tx = make_optimizer(self.optim)
        self.dynamic_scale = c.dtype == "float16"
        boxed = abstract_params(c)
        self.param_shardings, self.frozen_shardings = split(
            sh.named_shardings(boxed, mesh, self.rules), peft, c, take=lambda s, rows: s
        )
        self.trainable_shapes, frozen = jax.eval_shape(lambda p: split(p, peft, c), nn.meta.unbox(boxed))
        self.frozen_shapes = jax.eval_shape(lambda f: pipeline.params_to_slots(f, self.plan), frozen)
        self.frozen = {}
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = sh.batch_sharding(mesh)
        self.vote_sharding = NamedSharding(mesh, P(sh.AXES))  # one stop vote per device
        self.state_shardings = self.shardings_for(self.state_shapes(self.plan))
        self._jit()

    @property
    def microbatch_rows(self) -> int:
        """Sequences in one microbatch (all data replicas): the unit of a 1F1B step's batch."""
        return self.pass_batch // self.microbatches

    # ---- shapes and shardings -------------------------------------------------------------------
    def param_like(self, tree, on_params: Callable, on_other: Callable):
        """Map subtrees shaped like the parameters with on_params, other leaves with on_other."""
        target = jax.tree_util.tree_structure(self.trainable_shapes)

        def is_params(x):
            return jax.tree_util.tree_structure(x) == target and not isinstance(x, jax.ShapeDtypeStruct)

        return jax.tree_util.tree_map(lambda x: on_params(x) if is_params(x) else on_other(x), tree, is_leaf=is_params)

    def _new_state(self, params, key) -> TrainState:
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=self.tx.init(params),
            loss_scale=LossScale.create(self.optim, self.dynamic_scale),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            skipped=jnp.int32(0),
            consecutive_skips=jnp.int32(0),
        )

    def state_shapes(self, plan: pipeline.PipelinePlan) -> TrainState:
        """The training state's ShapeDtypeStructs with the layers in `plan`'s slot layout."""
        params = jax.eval_shape(lambda t: pipeline.params_to_slots(t, plan), self.trainable_shapes)
        return jax.eval_shape(lambda p: self._new_state(p, jax.random.key(0)), params)

    def shardings_for(self, shapes: TrainState) -> TrainState:
        """Shardings of a state of these shapes on this mesh: the rules' (layers over `stage` where
        the stage axis divides the slots), ZeRO-1 moments, the rest replicated."""
        rep, stages = self.replicated, self.plan.stages

        def fit(s, a):
            if s.spec and s.spec[0] == "stage" and a.shape[0] % stages:
                return NamedSharding(self.mesh, P(None, *s.spec[1:]))
            return s

        params = jax.tree_util.tree_map(fit, self.param_shardings, shapes.params)
        moment = jax.tree_util.tree_map(lambda s, a: sh.zero1_sharding(s, a.shape), params, shapes.params)
        return TrainState(
            step=rep,
            params=params,
            opt_state=self.param_like(shapes.opt_state, lambda _: moment, lambda _: rep),
            loss_scale=LossScale(rep, rep, rep),
            rng=rep,
            skipped=rep,
            consecutive_skips=rep,
        )

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical rules every trace runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), targeting(self.mesh):
            yield

    # ---- the jitted functions -----------------------------------------------------------------------
    def _jit(self):
        c, plan, m, peft = self.config, self.plan, self.microbatches, self.peft
        rep = self.replicated
        dropout = bool(c.hidden_dropout or c.attention_dropout)

        def scaled_mean_loss(params, frozen, batch, rng, alpha, scale):
            loss_sum, n = pipeline.loss_sum(
                combine(params, frozen, peft), batch, c, plan, m, embedding_alpha=alpha, dropout_rng=rng
            )
            return loss_sum / jnp.maximum(n, 1.0) * scale, (loss_sum, n)

        def grad_pass(params, frozen, batch, used, rng, alpha, scale):
            """Gradients of scale x (summed loss): the backward sees scale x mean loss (what fp16
            loss scaling expects), the fp32 parameter gradients are then multiplied by n."""
            rng = rng if dropout else None
            if self.schedule == "1f1b":
                grads, loss_sum, n = pipeline.one_f_one_b(
                    params,
                    frozen,
                    lambda t, f: combine(t, f, peft),
                    batch,
                    used,
                    c,
                    plan,
                    m,
                    embedding_alpha=alpha,
                    dropout_rng=rng,
                    scale=scale,
                )
            else:
                grads, (loss_sum, n) = jax.grad(scaled_mean_loss, has_aux=True)(
                    params, frozen, batch, rng, alpha, scale
                )
            return jax.tree_util.tree_map(lambda g: g * n, grads), loss_sum, n

        def update(state: TrainState, grads, loss_sum, n, lr, votes):
            scale = state.loss_scale.scale
            grads = jax.tree_util.tree_map(lambda g: g / (scale * jnp.maximum(n, 1.0)), grads)
            finite = all_finite(grads)
            opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
            updates, new_opt = self.tx.update(grads, opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
            skips = jnp.where(finite, 0, state.consecutive_skips + 1)
            new_state = TrainState(
                step=state.step + 1,
                params=keep(new_params, state.params),
                opt_state=keep(new_opt, state.opt_state),
                loss_scale=state.loss_scale.update(finite, self.optim, self.dynamic_scale),
                rng=state.rng,
                skipped=state.skipped + (~finite).astype(jnp.int32),
                consecutive_skips=skips,
            )
            embed_norm = optax.global_norm(grads.get("word_embeddings", {}))
            rest = {k: v for k, v in grads.items() if k != "word_embeddings"}
            metrics = dict(
                loss=loss_sum / jnp.maximum(n, 1.0),
                tokens=n,
                learning_rate=lr,
                grad_norm=optax.global_norm(grads),
                embedding_grad_norm=embed_norm,
                other_grad_norm=optax.global_norm(rest),
                loss_scale=scale,
                finite=finite,
                skipped=new_state.skipped,
                consecutive_skips=skips,
                stop=jnp.max(votes) > 0,
            )
            return new_state, metrics

        def step_rng(state):
            return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def fused(state, frozen, batch, used, votes, lr, alpha):
            grads, loss_sum, n = grad_pass(
                state.params, frozen, batch, used, step_rng(state), alpha, state.loss_scale.scale
            )
            return update(state, grads, loss_sum, n, lr, votes)

        def eval_loss(params, frozen, batch):
            loss_sum, n = pipeline.loss_sum(combine(params, frozen, peft), batch, c, plan, m)
            return loss_sum / jnp.maximum(n, 1.0), n

        ss, ps, bs, fs, vs = (
            self.state_shardings,
            self.state_shardings.params,
            self.batch_sharding,
            self.frozen_shardings,
            self.vote_sharding,
        )
        with self.context():
            self._grad_pass = jax.jit(
                grad_pass, in_shardings=(ps, fs, bs, rep, rep, rep, rep), out_shardings=(ps, rep, rep)
            )
            self.accumulate = jax.jit(
                lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                donate_argnums=0,
                in_shardings=(ps, ps),
                out_shardings=ps,
            )
            self._update = jax.jit(
                update, in_shardings=(ss, ps, rep, rep, rep, vs), out_shardings=(ss, rep), donate_argnums=(0, 1)
            )
            self._fused_step = jax.jit(
                fused, in_shardings=(ss, fs, bs, rep, vs, rep, rep), out_shardings=(ss, rep), donate_argnums=0
            )
            self._eval_loss = jax.jit(eval_loss, in_shardings=(ps, fs, bs), out_shardings=(rep, rep))
        self.step_rng = step_rng

    # the steps with this trainer's frozen parameters (`set_frozen`) as their second argument
    def grad_pass(self, params, batch, rng, alpha, scale, microbatches: int | None = None):
        return self._grad_pass(
            params, self.frozen, batch, jnp.int32(microbatches or self.microbatches), rng, alpha, scale
        )

    def update(self, state, grads, loss_sum, n, lr, stop: bool = False):
        return self._update(state, grads, loss_sum, n, lr, self.votes(stop))

    def fused_step(self, state, batch, lr, alpha, microbatches: int | None = None, stop: bool = False):
        """One step; microbatches: how many of a 1F1B batch's microbatches this step uses
        (`place_batch(rows, microbatches)`); stop: this process's stop vote."""
        return self._fused_step(
            state, self.frozen, batch, jnp.int32(microbatches or self.microbatches), self.votes(stop), lr, alpha
        )

    def eval_loss(self, params, batch):
        return self._eval_loss(params, self.frozen, batch)

    def votes(self, stop: bool) -> jax.Array:
        """This process's stop vote on each of its devices, as one global [devices] array."""
        local = np.full((len(self.mesh.local_devices),), int(bool(stop)), np.int32)
        return jax.make_array_from_process_local_data(self.vote_sharding, local, (self.mesh.size,))

    def set_frozen(self, frozen: dict) -> None:
        """Place the frozen parameters (plain stacked layout, `peft.split`) in their shardings."""
        with jax.set_mesh(self.mesh):
            self.frozen = jax.jit(
                lambda f: pipeline.params_to_slots(f, self.plan), out_shardings=self.frozen_shardings
            )(frozen)

    # ---- state ----------------------------------------------------------------------------------
    def fresh_state(self, key, trainable: dict | None = None) -> TrainState:
        """A new state from `key` (traceable: jit it with shardings, or eval_shape it); its
        parameters are `trainable` (plain stacked layout) or, without, freshly initialised ones
        (for an adapter: the adapter's, the base's random init is dead code XLA drops)."""
        if trainable is None:
            variables = GLM(self.config).init(key, dummy_batch(1, 8))
            trainable = split(nn.meta.unbox(variables["params"]), self.peft, self.config)[0]
        return self._new_state(pipeline.params_to_slots(trainable, self.plan), key)

    def init_state(self, seed: int, trainable: dict | None = None) -> TrainState:
        """Fresh (or the given `trainable`) parameters, placed directly in their shardings, and
        optimizer state."""
        # outside the rules context: init must not constrain the unpadded layer axis to `stage`
        with jax.set_mesh(self.mesh):
            return jax.jit(self.fresh_state, out_shardings=self.state_shardings)(jax.random.key(seed), trainable)

    def place_batch(self, local: dict, microbatches: int | None = None) -> dict:
        """This process's rows -> global arrays sharded over `data` (one process: plain put).
        microbatches: the rows are that many 1F1B microbatches, one after the other; they are laid
        out for `pipeline.split_microbatches` over this trainer's microbatches, the rest zero."""
        arrays = {k: np.asarray(v) for k, v in local.items() if np.ndim(v) == 2}
        if microbatches is not None:
            arrays = pipeline.pad_microbatches(arrays, microbatches, self.microbatches)
        if jax.process_count() > 1:
            return sh.global_batch(arrays, self.mesh)
        return jax.device_put(arrays, self.batch_sharding)

    def plain_params(self, params) -> dict:
        """Trainable parameters in the plain stacked layout (slots undone)."""
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda p: pipeline.params_from_slots(p, self.plan))(params)

    def model_flops_per_step(self, tokens: int, seq_len: int) -> float:
        return flops_per_token(self.config, seq_len)["train"] * tokens


# ---- the loop -------------------------------------------------------------------------------------------
class TrainingError(RuntimeError):
    """The run cannot go on (too many skipped steps); a checkpoint was written first."""


@dataclasses.dataclass
class RunConfig:
    steps: int  # train up to this step (a resumed run with the same flags finishes the same job)
    global_batch: int
    seq_len: int
    seed: int = 0
    ckpt_dir: str = "runs/default/checkpoints"
    ckpt_every: int = 100
    keep: int = 3
    log_dir: str = "runs/default/logs"
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 2
    pass_batch: int | None = None  # sequences per gradient pass (default: the global batch)
    microbatches: int | None = None  # per pass
    schedule: str | None = None  # pipeline schedule (Trainer)
    async_checkpoints: bool = True
    progress: bool = True
    fsdp: bool = False
    family: str = "glm"  # recorded in every checkpoint (families.py), with the tokenizer file
    tokenizer_file: str | None = None  # copied into ckpt_dir/tokenizer/ (None: ours, the package's)


def make_trainer(
    config: GLMConfig, optim: OptimConfig, run: RunConfig, mesh, peft: PeftConfig = PeftConfig("full")
) -> tuple[Trainer, BatchSchedule]:
    """The trainer of a run and its batch schedule (in 1F1B microbatches, or in passes). A 1F1B
    trainer holds the whole global batch, in microbatches of pass_batch / microbatches rows."""
    pass_batch, microbatches = run.pass_batch or run.global_batch, run.microbatches
    one_schedule = sh.axis_size(mesh, "stage") > 1 and (run.schedule or "1f1b") == "1f1b"
    if one_schedule and pass_batch != run.global_batch:  # the microbatches of a pass, over the global batch
        microbatches = pipeline.microbatch_count(microbatches, pass_batch, mesh)
        sh.check_splittable(config, mesh, pass_batch, microbatches)
        rows = pass_batch // microbatches
        if run.global_batch % rows:
            raise ConfigError(
                f"global batch {run.global_batch} is not a whole number of microbatches of {rows} sequences"
            )
        pass_batch, microbatches = run.global_batch, run.global_batch // rows
    trainer = Trainer(config, optim, mesh, pass_batch, microbatches, fsdp=run.fsdp, peft=peft, schedule=run.schedule)
    unit = trainer.microbatch_rows if trainer.schedule == "1f1b" else trainer.pass_batch
    return trainer, BatchSchedule(
        run.global_batch, unit, run.steps, optim.ramp_start, optim.ramp_fraction, optim.ramp_increment
    )


def train(
    config: GLMConfig,
    optim: OptimConfig,
    run: RunConfig,
    mesh,
    builder,
    eval_builder=None,
    log: Callable[[str], None] = print,
    peft: PeftConfig = PeftConfig("full"),
    base: dict | None = None,
    meta: dict | None = None,
    on_done: Callable[[dict, int], None] | None = None,
) -> dict:
    """Train on `mesh` from `builder` (objectives.SequenceBuilder, or sft.SFTBuilder); resume from
    run.ckpt_dir.

    Fine-tuning: `base` is the base model's parameters (plain stacked layout) and `peft` says
    which of them train (peft.py); checkpoints then hold the trainable part only, with `meta`
    added to their metadata. With eval_every set, held-out loss is also measured before step 1.
    on_done(params, step): called on the lead process with the final trainable parameters (plain
    stacked layout) when the run reaches run.steps. Step n's metrics are read while step n + 1
    runs. Returns the summary (also written to log_dir/summary.json): final loss, steps, tokens/s, MFU.
    """
    from tqdm import tqdm

    trainer, batches = make_trainer(config, optim, run, mesh, peft)
    one_schedule = trainer.schedule == "1f1b"
    base_trainable = None
    if base is not None:
        base_trainable, frozen = split(base, peft, config)
        trainer.set_frozen(frozen)
        del frozen
        base_trainable = None if peft.is_adapter else base_trainable
    log(
        pipeline.describe(
            mesh,
            trainer.plan,
            batches.passes(batches.total_steps - 1) if one_schedule else trainer.microbatches,
            trainer.schedule,
        )
    )
    if batches.ramp_note:
        log(f"warning: {batches.ramp_note}")
    lead = jax.process_index() == 0
    data = DataIterator(builder, batches.pass_batch, jax.process_index(), jax.process_count())
    ckpt = Checkpoints(run.ckpt_dir, run.keep, run.async_checkpoints)
    tokenizer_meta = copy_tokenizer(run.tokenizer_file, ckpt.directory) if lead else None
    start = ckpt.latest_step()
    if start is not None:
        meta = ckpt.restore_meta(start)
        check_config_matches(meta["config"], config, os.path.join(ckpt.directory, str(start)))
        state = restore_state(ckpt, trainer, start, meta)
        data.restore(meta["data"])
        log(f"resumed from {ckpt.directory} at step {start}")
    else:
        start = 0
        state = trainer.init_state(run.seed, base_trainable)
    del base_trainable
    metrics_out = MetricsWriter(run.log_dir, start, enabled=lead)
    extra_meta = {k: v for k, v in (meta or {}).items() if k not in ("data", "step", "layout")}

    def save(step):
        record = {
            "config": config.to_dict(),
            "data": data.state(),
            "step": step,
            "family": run.family,
            "tokenizer": tokenizer_meta,
            **extra_meta,
            "optim": dataclasses.asdict(optim) | {"embedding_alpha_schedule": list(optim.embedding_alpha_schedule)},
        }
        save_state(ckpt, trainer, step, state, record)

    def evaluate():
        if eval_builder is None:
            return None
        it = DataIterator(eval_builder, trainer.pass_batch, jax.process_index(), jax.process_count(), prefetch=0)
        total = count = 0.0
        with trainer.context():
            for _ in range(run.eval_batches):
                loss, n = trainer.eval_loss(state.params, trainer.place_batch(next(it)))
                total, count = total + float(loss) * float(n), count + float(n)
        return total / max(count, 1.0)

    def run_step(step, vote):
        """Dispatch step `step` (nothing waits on the device) -> (state, metrics on device)."""
        lr = learning_rate(optim, batches.samples_before(step), batches.total_samples)
        alpha = embedding_alpha(optim, step, config.embedding_shrink_alpha)
        k = batches.passes(step)
        with trainer.context():
            if one_schedule:
                rows = [next(data) for _ in range(k)]
                rows = {key: np.concatenate([r[key] for r in rows]) for key in rows[0] if np.ndim(rows[0][key]) == 2}
                return trainer.fused_step(state, trainer.place_batch(rows, k), lr, alpha, k, vote)
            if k == 1:
                return trainer.fused_step(state, trainer.place_batch(next(data)), lr, alpha, stop=vote)
            rng = trainer.step_rng(state)
            grads = loss_sum = n = None
            for i in range(k):
                g, ls, c = trainer.grad_pass(
                    state.params,
                    trainer.place_batch(next(data)),
                    jax.random.fold_in(rng, i),
                    alpha,
                    state.loss_scale.scale,
                )
                grads = g if grads is None else trainer.accumulate(grads, g)
                loss_sum, n = (ls, c) if loss_sum is None else (loss_sum + ls, n + c)
            return trainer.update(state, grads, loss_sum, n, lr, vote)

    peak = peak_flops(jax.devices()[0])
    initial_eval = None
    if run.eval_every and start == 0:
        initial_eval = evaluate()
        if initial_eval is not None:
            metrics_out.write({"step": 0, "eval_loss": initial_eval})
    log_state = {
        "first_loss": None,
        "last": None,
        "timed": 0.0,
        "tokens": 0,
        "flops": 0.0,
        "clock": time.perf_counter(),
    }

    def finish(step, metrics) -> bool:
        """Read step `step`'s metrics (waiting for it), log them; -> the processes' agreed stop."""
        m = {k: (bool(v) if k in ("finite", "stop") else float(v)) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, log_state["clock"] = now - log_state["clock"], now
        k = batches.passes(step)
        tokens = k * batches.pass_batch * run.seq_len
        flops = trainer.model_flops_per_step(tokens, run.seq_len)
        if step > start:  # the first step compiles
            log_state.update(
                timed=log_state["timed"] + dt, tokens=log_state["tokens"] + tokens, flops=log_state["flops"] + flops
            )
        record = {
            "step": step + 1,
            **{k: v for k, v in m.items() if k not in ("finite", "stop")},
            "skipped_step": not m["finite"],
            "batch": k * batches.pass_batch,
            "passes": 1 if one_schedule else k,
            "microbatches": k * (1 if one_schedule else trainer.microbatches),
            "embedding_alpha": float(embedding_alpha(optim, step, config.embedding_shrink_alpha)),
            "step_time": dt,
            "tokens_per_s": tokens / dt,
            "mfu": flops / (dt * peak * jax.device_count()) if peak else None,
        }
        log_state["first_loss"] = log_state["first_loss"] if log_state["first_loss"] is not None else record["loss"]
        log_state["last"] = record
        metrics_out.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}")
        if not m["finite"]:
            log(
                f"step {step + 1}: non-finite gradients, step skipped (loss scale {m['loss_scale']:g}, "
                f"{int(m['consecutive_skips'])} in a row)"
            )
        if m["consecutive_skips"] >= optim.max_consecutive_skips:
            saved = int(state.step)
            save(saved)
            raise TrainingError(
                f"{int(m['consecutive_skips'])} consecutive steps had non-finite gradients "
                f"(limit {optim.max_consecutive_skips}) by step {step + 1}; saved step {saved} to "
                f"{ckpt.directory}. Lower the learning rate or check the data."
            )
        return m["stop"]

    stopped = False
    try:
        bar = tqdm(
            range(start, run.steps),
            initial=start,
            total=run.steps,
            disable=not (lead and run.progress),
            desc="train",
            unit="step",
        )
        with StopSignal() as signals:
            pending = None
            for step in bar:
                state, metrics = run_step(step, signals.received is not None)
                stopped = pending is not None and finish(*pending)
                pending = (step, metrics)
                if run.eval_every and (step + 1) % run.eval_every == 0 and step + 1 < run.steps:
                    stopped = finish(*pending) or stopped
                    pending = None
                    metrics_out.write({"step": step + 1, "eval_loss": evaluate()})
                if (step + 1) % run.ckpt_every == 0 or step + 1 == run.steps or stopped:
                    save(step + 1)
                if stopped:
                    log(f"stop requested: every process saved step {step + 1} to {ckpt.directory}; rerun to resume")
                    break
            if pending is not None:
                finish(*pending)
        last = log_state["last"]
        eval_loss = evaluate() if last is not None and not stopped else None
        if eval_loss is not None and lead:
            metrics_out.write({"step": last["step"], "eval_loss": eval_loss})
        if on_done is not None and lead and not stopped:
            on_done(trainer.plain_params(state.params), int(state.step))
    finally:  # a finished or failed run never leaves a checkpoint half-written
        ckpt.close()
        metrics_out.close()
        data.close()
    timed = log_state["timed"]
    summary = {
        "steps": last["step"] if last else start,
        "first_loss": log_state["first_loss"],
        "final_loss": last["loss"] if last else None,
        "initial_eval_loss": initial_eval,
        "eval_loss": eval_loss,
        "tokens_per_s": log_state["tokens"] / timed if timed else None,
        "mfu": log_state["flops"] / (timed * peak * jax.device_count()) if timed and peak else None,
        "skipped_steps": int(last["skipped"]) if last else 0,
        "checkpoint_dir": ckpt.directory,
        "log_dir": os.path.abspath(run.log_dir),
        "interrupted": stopped,
    }
    if lead and last is not None:
        plot_metrics(metrics_out.path, os.path.join(run.log_dir, "metrics.png"))
        with open(os.path.join(run.log_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return summary
