"""Train state, the jitted steps on a mesh, checkpoints, and the training loop.

One `Trainer` holds everything placement-related: the mesh, the pipeline plan, the logical rules
and the shardings of parameters (slot layout, `sharding.py`), optimizer state (ZeRO-1) and
batches. Its jitted functions:

- `grad_pass(params, batch, rng, alpha, scale)`: gradients of scale x (summed token loss) over one
  fixed-size pass (a pipelined global micro-batch), with the loss sum and token count;
- `update(state, grads, loss_sum, tokens, lr, alpha)`: unscale, divide by the step's token
  count (so the loss is normalised globally, whatever the number of passes), skip the step if
  any gradient is not finite, clip, AdamW, advance the loss scale;
- `step(state, batch, lr, alpha)`: the two fused, for the common one-pass step.

Checkpoints hold the parameters and optimizer state in the plain stacked layout (so they restore
onto any mesh), step, rng, loss scale, the data iterator's state and the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from glm_jax import sharding as sh
from glm_jax.config import ConfigError, GLMConfig
from glm_jax.data import DataIterator
from glm_jax.model import GLM, abstract_params, dummy_batch
from glm_jax.objectives import CONTRACT_KEYS
from glm_jax.peft import PeftConfig, combine, split, split_shapes
from glm_jax.optim import (BatchSchedule, LossScale, OptimConfig, all_finite, embedding_alpha, learning_rate,
                           make_optimizer)
from glm_jax.summary import flops_per_token
from glm_jax.platform import targeting

# dense bf16 FLOP/s per device, by device_kind. TPU kinds are matched exactly ("TPU v5 lite" is
# v5e, "TPU v5" is v5p; glm_jax/topology.py has the sources); GPU kinds by the longest name inside
# the reported kind ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run (another config, a damaged folder); says what."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # slot layout (sharding.PipelinePlan)
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array  # raw uint32 key data, so checkpoints need no key type
    skipped: jax.Array  # steps skipped for non-finite gradients, total
    consecutive_skips: jax.Array


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
    pass_batch: int  # sequences per gradient pass (the global micro-batch of the pipeline)
    microbatches: int | None = None
    fsdp: bool = False
    # which parameters train (peft.py); the rest are `frozen`, an argument of every step
    peft: PeftConfig = PeftConfig("full")

    def __post_init__(self):
        c, mesh, peft = self.config, self.mesh, self.peft
        if c.quantization != "none" and not peft.is_adapter:
            raise ConfigError(f"quantization={c.quantization} is weight-only quantization for serving: train in float "
                              "(quantization=none), then `python experiments/quantize.py`; a quantized base trains "
                              "LoRA or P-tuning adapters only")
        self.microbatches = sh.microbatch_count(self.microbatches, self.pass_batch, mesh)
        sh.check_splittable(c, mesh, self.pass_batch, self.microbatches)
        self.plan = sh.PipelinePlan(c.num_layers, sh.axis_size(mesh, "stage"))
        if peft.method == "freeze" and self.plan.stages > 1:
            raise ConfigError("freeze splits the layer stack at a layer; run it on a mesh without pipeline stages "
                              "(--mesh DATAx1xTENSOR), or use lora / ptuning / full on this mesh")
        self.rules = sh.rules_for(c, mesh, fsdp=self.fsdp)
        self.tx = make_optimizer(self.optim)
        self.dynamic_scale = c.dtype == "float16"
        boxed = abstract_params(c)
        same = lambda s, rows: s
        self.param_shardings, self.frozen_shardings = split(sh.named_shardings(boxed, mesh, self.rules), peft, c,
                                                            take=same)
        canonical_rules = tuple((k, None if k == "layers" else v) for k, v in self.rules)
        self.canonical_shardings = split(sh.named_shardings(boxed, mesh, canonical_rules), peft, c, take=same)[0]
        slotted = lambda p: tuple(sh.params_to_slots(t, self.plan) for t in split(p, peft, c))
        self.param_shapes, self.frozen_shapes = jax.eval_shape(slotted, nn.meta.unbox(boxed))
        self.frozen = {}
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = sh.batch_sharding(mesh)
        opt_shapes = jax.eval_shape(self.tx.init, self.param_shapes)
        moment = jax.tree_util.tree_map(lambda s, a: sh.zero1_sharding(s, a.shape),
                                        self.param_shardings, self.param_shapes)
        self.opt_shardings = self._param_like(opt_shapes, lambda _: moment, lambda _: self.replicated)
        self.state_shardings = TrainState(
            step=self.replicated, params=self.param_shardings, opt_state=self.opt_shardings,
            loss_scale=LossScale(self.replicated, self.replicated, self.replicated), rng=self.replicated,
            skipped=self.replicated, consecutive_skips=self.replicated)
        self._jit()

    # ---- helpers ------------------------------------------------------------------------------
    def _param_like(self, tree, on_params: Callable, on_other: Callable):
        """Map subtrees shaped like the parameters with on_params, other leaves with on_other."""
        target = jax.tree_util.tree_structure(self.param_shapes)

        def is_params(x):
            return jax.tree_util.tree_structure(x) == target and not isinstance(x, jax.ShapeDtypeStruct)

        return jax.tree_util.tree_map(lambda x: on_params(x) if is_params(x) else on_other(x), tree,
                                      is_leaf=is_params)

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical rules every trace runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), targeting(self.mesh):
            yield

    # ---- the jitted functions -----------------------------------------------------------------------
    def _jit(self):
        c, plan, m = self.config, self.plan, self.microbatches
        rep = self.replicated

        def scaled_mean_loss(params, frozen, batch, rng, alpha, scale):
            logits = sh.forward(combine(params, frozen, self.peft), batch, c, plan, m, embedding_alpha=alpha,
                                dropout_rng=rng if (c.hidden_dropout or c.attention_dropout) else None)
            loss, n = sh.token_loss(logits, batch)
            return loss * scale, (loss * n, n)

        def grad_pass(params, frozen, batch, rng, alpha, scale):
            """Gradients of scale x (summed loss): the backward sees scale x mean loss (what fp16
            loss scaling expects), the fp32 parameter gradients are then multiplied by n."""
            grads, (loss_sum, n) = jax.grad(scaled_mean_loss, has_aux=True)(params, frozen, batch, rng, alpha, scale)
            return jax.tree_util.tree_map(lambda g: g * n, grads), loss_sum, n

        def update(state: TrainState, grads, loss_sum, n, lr):
            scale = state.loss_scale.scale
            grads = jax.tree_util.tree_map(lambda g: g / (scale * jnp.maximum(n, 1.0)), grads)
            finite = all_finite(grads)
            opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
            updates, new_opt = self.tx.update(grads, opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
            skips = jnp.where(finite, 0, state.consecutive_skips + 1)
            new_state = TrainState(
                step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
                loss_scale=state.loss_scale.update(finite, self.optim, self.dynamic_scale), rng=state.rng,
                skipped=state.skipped + (~finite).astype(jnp.int32), consecutive_skips=skips)
            embed_norm = optax.global_norm(grads.get("word_embeddings", {}))
            rest = {k: v for k, v in grads.items() if k != "word_embeddings"}
            metrics = dict(loss=loss_sum / jnp.maximum(n, 1.0), tokens=n, learning_rate=lr,
                           grad_norm=optax.global_norm(grads), embedding_grad_norm=embed_norm,
                           other_grad_norm=optax.global_norm(rest), loss_scale=scale, finite=finite,
                           skipped=new_state.skipped, consecutive_skips=skips)
            return new_state, metrics

        def step_rng(state):
            return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def fused(state, frozen, batch, lr, alpha):
            grads, loss_sum, n = grad_pass(state.params, frozen, batch, step_rng(state), alpha, state.loss_scale.scale)
            return update(state, grads, loss_sum, n, lr)

        def eval_loss(params, frozen, batch):
            logits = sh.forward(combine(params, frozen, self.peft), batch, c, plan, m)
            return sh.token_loss(logits, batch)

        ss, ps, bs, fs = self.state_shardings, self.param_shardings, self.batch_sharding, self.frozen_shardings
        with self.context():
            self._grad_pass = jax.jit(grad_pass, in_shardings=(ps, fs, bs, rep, rep, rep), out_shardings=(ps, rep, rep))
            self.accumulate = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), donate_argnums=0,
                                      in_shardings=(ps, ps), out_shardings=ps)
            self.update = jax.jit(update, in_shardings=(ss, ps, rep, rep, rep), out_shardings=(ss, rep),
                                  donate_argnums=(0, 1))
            self._fused_step = jax.jit(fused, in_shardings=(ss, fs, bs, rep, rep), out_shardings=(ss, rep),
                                       donate_argnums=0)
            self._eval_loss = jax.jit(eval_loss, in_shardings=(ps, fs, bs), out_shardings=(rep, rep))
        self.step_rng = step_rng

    # the steps with this trainer's frozen parameters (`set_frozen`) as their second argument
    def grad_pass(self, params, batch, rng, alpha, scale):
        return self._grad_pass(params, self.frozen, batch, rng, alpha, scale)

    def fused_step(self, state, batch, lr, alpha):
        return self._fused_step(state, self.frozen, batch, lr, alpha)

    def eval_loss(self, params, batch):
        return self._eval_loss(params, self.frozen, batch)

    def set_frozen(self, frozen: dict) -> None:
        """Place the frozen parameters (plain stacked layout, `peft.split`) in their shardings."""
        with jax.set_mesh(self.mesh):
            self.frozen = jax.jit(lambda f: sh.params_to_slots(f, self.plan), out_shardings=self.frozen_shardings)(frozen)

    # ---- state ----------------------------------------------------------------------------------
    def fresh_state(self, key, trainable: dict | None = None) -> TrainState:
        """A new state from `key` (traceable: jit it with shardings, or eval_shape it); its
        parameters are `trainable` (plain stacked layout) or, without, freshly initialised ones
        (for an adapter: the adapter's, the base's random init is dead code XLA drops)."""
        if trainable is None:
            variables = GLM(self.config).init(key, dummy_batch(1, 8))
            trainable = split(nn.meta.unbox(variables["params"]), self.peft, self.config)[0]
        params = sh.params_to_slots(trainable, self.plan)
        return TrainState(step=jnp.int32(0), params=params, opt_state=self.tx.init(params),
                          loss_scale=LossScale.create(self.optim, self.dynamic_scale),
                          rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                          skipped=jnp.int32(0), consecutive_skips=jnp.int32(0))

    def init_state(self, seed: int, trainable: dict | None = None) -> TrainState:
        """Fresh (or the given `trainable`) parameters, placed directly in their shardings, and
        optimizer state."""
        # outside the rules context: init must not constrain the unpadded layer axis to `stage`
        with jax.set_mesh(self.mesh):
            return jax.jit(self.fresh_state, out_shardings=self.state_shardings)(jax.random.key(seed), trainable)

    def place_batch(self, local: dict) -> dict:
        """This process's rows -> global arrays sharded over `data` (one process: plain put)."""
        arrays = {k: v for k, v in local.items() if np.ndim(v) == 2}
        if jax.process_count() > 1:
            return sh.global_batch(arrays, self.mesh)
        return jax.device_put(arrays, self.batch_sharding)

    def to_canonical(self, state: TrainState) -> dict:
        """A checkpointable pytree: parameters and moments in the plain stacked layout."""
        unslot = lambda t: sh.params_from_slots(t, self.plan)
        with jax.set_mesh(self.mesh):
            convert = jax.jit(lambda s: {
                "step": s.step, "params": unslot(s.params),
                "opt_state": self._param_like(s.opt_state, unslot, lambda x: x),
                "loss_scale": s.loss_scale, "rng": s.rng, "skipped": s.skipped,
                "consecutive_skips": s.consecutive_skips})
            return convert(state)

    def canonical_target(self) -> dict:
        """Abstract canonical tree with this mesh's shardings (the restore target)."""
        canon_shapes = jax.eval_shape(lambda p: sh.params_from_slots(p, self.plan), self.param_shapes)
        opt_shapes = jax.eval_shape(self.tx.init, canon_shapes)
        moment = jax.tree_util.tree_map(lambda s, a: sh.zero1_sharding(s, a.shape), self.canonical_shardings,
                                        canon_shapes)
        sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        rep = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated)
        scalar_i = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        scalar_f = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
        return {
            "step": scalar_i,
            "params": jax.tree_util.tree_map(sds, canon_shapes, self.canonical_shardings),
            "opt_state": self._param_like(opt_shapes, lambda t: jax.tree_util.tree_map(sds, t, moment), rep),
            "loss_scale": LossScale(scalar_f, scalar_i, scalar_i),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated),
            "skipped": scalar_i, "consecutive_skips": scalar_i,
        }

    def from_canonical(self, tree: dict) -> TrainState:
        slot = lambda t: sh.params_to_slots(t, self.plan)
        with jax.set_mesh(self.mesh):
            convert = jax.jit(lambda t: TrainState(
                step=t["step"], params=slot(t["params"]),
                opt_state=self._param_like(t["opt_state"], slot, lambda x: x), loss_scale=t["loss_scale"],
                rng=t["rng"], skipped=t["skipped"], consecutive_skips=t["consecutive_skips"]),
                out_shardings=self.state_shardings)
            return convert(tree)

    def model_flops_per_step(self, tokens: int, seq_len: int) -> float:
        return flops_per_token(self.config, seq_len)["train"] * tokens


# ---- checkpoints --------------------------------------------------------------------------------------
class Checkpoints:
    """orbax CheckpointManager over a run folder: async saves, keep the last K, atomic steps.

    A save is written to a temporary folder and renamed when complete, so a crash mid-save
    leaves the previous checkpoints intact and `latest_step` never names a partial one.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, canonical_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(canonical_state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_state(self, step: int, target: dict) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_config_matches(saved: dict, config: GLMConfig, where: str) -> None:
    """A clear error naming every field where a checkpoint's config differs from this run's."""
    mine = config.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    structural = {k: d for k, d in diff.items() if k not in ("hidden_dropout", "attention_dropout", "remat_policy",
                                                              "attention_impl", "embedding_shrink_alpha")}
    if structural:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(structural.items()))
        raise CheckpointError(f"checkpoint {where} was trained with another model config ({lines}); "
                              "use the same --preset/--set or another --ckpt-dir")


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsWriter:
    """metrics.jsonl (one JSON object per step, flushed per line; a resumed run drops the lines
    past its restored step and appends) and TensorBoard events. Process 0 only."""

    def __init__(self, log_dir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def plot_metrics(jsonl: str, out_png: str) -> None:
    """Loss and gradient norms (total, embedding, rest) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl) as f:
        every = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in every if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], label="train loss")
    evals = [r for r in every if r.get("eval_loss") is not None]
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key in ("grad_norm", "embedding_grad_norm", "other_grad_norm"):
        ax2.semilogy(steps, [max(r[key], 1e-12) for r in rows], label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("gradient norm")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


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
    microbatches: int | None = None
    async_checkpoints: bool = True
    progress: bool = True
    fsdp: bool = False
    family: str = "glm"  # recorded in every checkpoint (families.py), with the tokenizer file
    tokenizer_file: str | None = None  # copied into ckpt_dir/tokenizer/ (None: ours, the package's)


def train(config: GLMConfig, optim: OptimConfig, run: RunConfig, mesh, builder, eval_builder=None,
          log: Callable[[str], None] = print, peft: PeftConfig = PeftConfig("full"), base: dict | None = None,
          meta: dict | None = None, on_done: Callable[[dict, int], None] | None = None) -> dict:
    """Train on `mesh` from `builder` (objectives.SequenceBuilder, or sft.SFTBuilder); resume from
    run.ckpt_dir.

    Fine-tuning: `base` is the base model's parameters (plain stacked layout) and `peft` says
    which of them train (peft.py); checkpoints then hold the trainable part only, with `meta`
    added to their metadata. With eval_every set, held-out loss is also measured before step 1.
    on_done(params, step): called on the lead process with the final trainable parameters (plain
    stacked layout) when the run reaches run.steps.
    Returns the summary (also written to log_dir/summary.json): final loss, steps, tokens/s, MFU.
    """
    from tqdm import tqdm

    pass_batch = run.pass_batch or run.global_batch
    trainer = Trainer(config, optim, mesh, pass_batch, run.microbatches, fsdp=run.fsdp, peft=peft)
    base_trainable = None
    if base is not None:
        base_trainable, frozen = split(base, peft, config)
        trainer.set_frozen(frozen)
        del frozen
        base_trainable = None if peft.is_adapter else base_trainable
    schedule = BatchSchedule(run.global_batch, pass_batch, run.steps, optim.ramp_start, optim.ramp_fraction,
                             optim.ramp_increment)
    log(sh.describe(mesh, trainer.plan, trainer.microbatches))
    lead = jax.process_index() == 0
    data = DataIterator(builder, pass_batch, jax.process_index(), jax.process_count())
    ckpt = Checkpoints(run.ckpt_dir, run.keep, run.async_checkpoints)
    tokenizer_meta = copy_tokenizer(run.tokenizer_file, ckpt.directory) if lead else None
    start = ckpt.latest_step()
    if start is not None:
        meta = ckpt.restore_meta(start)
        check_config_matches(meta["config"], config, os.path.join(ckpt.directory, str(start)))
        state = trainer.from_canonical(ckpt.restore_state(start, trainer.canonical_target()))
        data.restore(meta["data"])
        log(f"resumed from {ckpt.directory} at step {start}")
    else:
        start = 0
        state = trainer.init_state(run.seed, base_trainable)
    del base_trainable
    metrics_out = MetricsWriter(run.log_dir, start, enabled=lead)

    def save(step):
        record = {"config": config.to_dict(), "data": data.state(), "step": step, "family": run.family,
                  "tokenizer": tokenizer_meta, **(meta or {}),
                  "optim": dataclasses.asdict(optim) | {"embedding_alpha_schedule": list(optim.embedding_alpha_schedule)}}
        ckpt.save(step, trainer.to_canonical(state), record)

    def evaluate():
        if eval_builder is None:
            return None
        it = DataIterator(eval_builder, pass_batch, jax.process_index(), jax.process_count(), prefetch=0)
        total = count = 0.0
        with trainer.context():
            for _ in range(run.eval_batches):
                loss, n = trainer.eval_loss(state.params, trainer.place_batch(next(it)))
                total, count = total + float(loss) * float(n), count + float(n)
        return total / max(count, 1.0)

    peak = peak_flops(jax.devices()[0])
    initial_eval = None
    if run.eval_every and start == 0:
        initial_eval = evaluate()
        if initial_eval is not None:
            metrics_out.write({"step": 0, "eval_loss": initial_eval})
    first_loss = last = None
    timed, timed_tokens, timed_flops = 0.0, 0, 0.0
    try:
        bar = tqdm(range(start, run.steps), initial=start, total=run.steps, disable=not (lead and run.progress),
                   desc="train", unit="step")
        with StopSignal() as stop:
            for step in bar:
                lr = learning_rate(optim, schedule.samples_before(step), schedule.total_samples)
                alpha = embedding_alpha(optim, step, config.embedding_shrink_alpha)
                passes = schedule.passes(step)
                t0 = time.perf_counter()
                with trainer.context():
                    if passes == 1:
                        state, m = trainer.fused_step(state, trainer.place_batch(next(data)), lr, alpha)
                    else:
                        rng = trainer.step_rng(state)
                        grads = loss_sum = n = None
                        for i in range(passes):
                            g, ls, k = trainer.grad_pass(state.params, trainer.place_batch(next(data)),
                                                           jax.random.fold_in(rng, i), alpha, state.loss_scale.scale)
                            grads = g if grads is None else trainer.accumulate(grads, g)
                            loss_sum, n = (ls, k) if loss_sum is None else (loss_sum + ls, n + k)
                        state, m = trainer.update(state, grads, loss_sum, n, lr)
                m = {k: (bool(v) if k == "finite" else float(v)) for k, v in jax.device_get(m).items()}
                dt = time.perf_counter() - t0
                tokens = passes * pass_batch * run.seq_len
                flops = trainer.model_flops_per_step(tokens, run.seq_len)
                if step > start:  # the first step compiles
                    timed, timed_tokens, timed_flops = timed + dt, timed_tokens + tokens, timed_flops + flops
                record = {"step": step + 1, **{k: v for k, v in m.items() if k != "finite"},
                          "skipped_step": not m["finite"], "batch": passes * pass_batch, "passes": passes,
                          "embedding_alpha": float(alpha), "step_time": dt, "tokens_per_s": tokens / dt,
                          "mfu": flops / (dt * peak * jax.device_count()) if peak else None}
                first_loss = record["loss"] if first_loss is None else first_loss
                last = record
                metrics_out.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}")
                if not m["finite"]:
                    log(f"step {step + 1}: non-finite gradients, step skipped (loss scale {m['loss_scale']:g}, "
                        f"{int(m['consecutive_skips'])} in a row)")
                if m["consecutive_skips"] >= optim.max_consecutive_skips:
                    save(step + 1)
                    raise TrainingError(f"{int(m['consecutive_skips'])} consecutive steps had non-finite gradients "
                                        f"(limit {optim.max_consecutive_skips}); saved step {step + 1} to "
                                        f"{ckpt.directory}. Lower the learning rate or check the data.")
                if run.eval_every and (step + 1) % run.eval_every == 0 and step + 1 < run.steps:
                    record["eval_loss"] = evaluate()
                    metrics_out.write({"step": step + 1, "eval_loss": record["eval_loss"]})
                done = step + 1 == run.steps
                if (step + 1) % run.ckpt_every == 0 or done or stop.received:
                    save(step + 1)
                if stop.received:
                    log(f"signal {stop.received}: saved step {step + 1} to {ckpt.directory}; rerun to resume")
                    break
        eval_loss = evaluate() if last is not None and not stop.received else None
        if eval_loss is not None and lead:
            metrics_out.write({"step": last["step"], "eval_loss": eval_loss})
        if on_done is not None and lead and not stop.received:
            on_done(trainer.to_canonical(state)["params"], int(state.step))
    finally:  # a finished or failed run never leaves a checkpoint half-written
        ckpt.close()
        metrics_out.close()
        data.close()
    summary = {"steps": last["step"] if last else start, "first_loss": first_loss,
               "final_loss": last["loss"] if last else None, "initial_eval_loss": initial_eval, "eval_loss": eval_loss,
               "tokens_per_s": timed_tokens / timed if timed else None,
               "mfu": timed_flops / (timed * peak * jax.device_count()) if timed and peak else None,
               "skipped_steps": int(last["skipped"]) if last else 0, "checkpoint_dir": ckpt.directory,
               "log_dir": os.path.abspath(run.log_dir), "interrupted": bool(stop.received)}
    if lead and last is not None:
        plot_metrics(metrics_out.path, os.path.join(run.log_dir, "metrics.png"))
        with open(os.path.join(run.log_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return summary


# ---- dry run ----------------------------------------------------------------------------------------
def _per_device_bytes(shapes, shardings) -> float:
    """Bytes one device holds of a tree of ShapeDtypeStructs under NamedShardings."""
    total = 0.0
    for a, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(a.shape) if hasattr(s, "shard_shape") else a.shape
        total += float(np.prod(shard)) * np.dtype(a.dtype).itemsize
    return total


def dry_run(trainer: Trainer, seq_len: int) -> dict:
    """Lower and compile one training step against the mesh without allocating anything; report
    per-device memory (weights, optimizer state, the rest XLA needs: activations at this
    microbatch size) and FLOPs per step. A compile refused for memory (an accelerator's
    compiler, e.g. an AOT TPU plan) is reported with `fits` false and the compiler's message."""
    t0 = time.perf_counter()
    state_shapes = jax.eval_shape(trainer.fresh_state, jax.random.key(0))
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      state_shapes, trainer.state_shardings)
    batch = {k: jax.ShapeDtypeStruct((trainer.pass_batch, seq_len), jnp.int32, sharding=trainer.batch_sharding)
             for k in CONTRACT_KEYS}
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=trainer.replicated)
    frozen = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    trainer.frozen_shapes, trainer.frozen_shardings)
    weights = _per_device_bytes(state_shapes.params, trainer.param_shardings)
    optimizer = _per_device_bytes(state_shapes.opt_state, trainer.opt_shardings)
    tokens = trainer.pass_batch * seq_len
    gib = 2.0**30
    head = {
        "devices": int(np.prod(list(trainer.mesh.shape.values()))),
        "mesh": dict(trainer.mesh.shape), "layers_per_stage": trainer.plan.layers_per_stage,
        "microbatches": trainer.microbatches,
        "micro_batch_per_replica": trainer.pass_batch // trainer.microbatches // sh.axis_size(trainer.mesh, "data"),
        "bubble_fraction": trainer.plan.bubble_fraction(trainer.microbatches),
        "weights_gib_per_device": weights / gib, "optimizer_gib_per_device": optimizer / gib}
    flops = {"model_flops_per_step": trainer.model_flops_per_step(tokens, seq_len), "tokens_per_step": tokens}
    try:
        with trainer.context():
            compiled = trainer._fused_step.lower(abstract, frozen, batch, scalar, scalar).compile()
    except Exception as e:  # an accelerator's compiler refuses a plan over its memory: report it
        from glm_jax.topology import out_of_memory

        message = out_of_memory(e)
        if message is None:
            raise
        return {**head, "fits": False, "compiler_message": message, **flops,
                "compile_seconds": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return {
        **head,
        "arguments_gib_per_device": mem.argument_size_in_bytes / gib,
        "temp_gib_per_device": mem.temp_size_in_bytes / gib,
        "peak_gib_per_device": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                + mem.output_size_in_bytes - mem.alias_size_in_bytes) / gib,
        "compiled_flops_per_device": float(cost.get("flops", float("nan"))),
        **flops, "compile_seconds": time.perf_counter() - t0,
    }


# ---- loading a trained model ------------------------------------------------------------------------
TOKENIZER_DIR = "tokenizer"


def copy_tokenizer(model_file: str | None, directory: str) -> str | None:
    """Copy a tokenizer file into directory/tokenizer/ (so the checkpoint is self-contained) ->
    its path relative to directory, as checkpoint meta records it; None for ours (in the package)."""
    if model_file is None:
        return None
    rel = os.path.join(TOKENIZER_DIR, os.path.basename(model_file))
    dest = os.path.join(directory, rel)
    if os.path.abspath(model_file) != os.path.abspath(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(model_file, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    return rel


def _restore(path: str, step: int | None) -> tuple[GLMConfig, dict, int, dict, str]:
    """(config, params, step, meta, checkpoint folder) of a training or serving checkpoint."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} not found; train one with "
                              "`python experiments/pretrain.py` or pass --checkpoint DIR")
    base = os.path.basename(path)
    if base.isdigit() and step is None and os.path.isdir(os.path.join(path, "state")):
        path, step = os.path.dirname(path), int(base)
    ckpt = Checkpoints(path, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        meta = ckpt.restore_meta(step)
        config = GLMConfig.from_dict(meta["config"])
        if meta.get("adapter"):  # a fine-tuned adapter's parameters only (adapters.py)
            peft = PeftConfig.from_dict(meta["peft"])
            target = {"params": split_shapes(peft, config)[0]}
        elif meta.get("serving"):  # parameters only
            target = {"params": nn.meta.unbox(abstract_params(config))}
        else:
            mesh = sh.make_mesh("1x1", jax.devices()[:1])
            target = Trainer(config, OptimConfig(), mesh, 1).canonical_target()
        tree = ckpt.restore_state(step, target)
    finally:
        ckpt.close()
    return config, tree["params"], step, meta, path


def _quantize_on_load(config: GLMConfig, params: dict, quantize: str | None, path: str):
    if quantize and quantize not in ("none", config.quantization):
        if config.quantization != "none":
            raise CheckpointError(f"{path} holds {config.quantization} weights already; quantize the float "
                                  f"checkpoint it came from to get {quantize}")
        from glm_jax.int4 import quantize_params

        config = config.override(quantization=quantize)
        params = quantize_params(params, config)
    return config, params


def load_checkpoint(path: str, step: int | None = None, quantize: str | None = None) -> tuple[GLMConfig, dict, int]:
    """(config, params, step) from a run's checkpoint folder (its latest step, or `step`) or from
    one step's folder, onto the first device: a training checkpoint, or a quantized serving one
    written by `save_serving`. quantize "int4"/"int8": weight-only quantization of a float
    checkpoint's layer weights (int4.py) as it loads. Clear errors for a missing or empty
    folder, or for re-quantizing quantized weights."""
    config, params, step, _, path = _restore(path, step)
    config, params = _quantize_on_load(config, params, quantize, path)
    return config, params, step


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint with everything needed to prompt it: its family and tokenizer."""

    config: GLMConfig
    params: dict
    step: int
    family: Any  # families.Family
    tokenizer: Any  # tokenizer.Tokenizer
    path: str


def load_model(path: str, quantize: str | None = None, tokenizer_file: str | None = None,
               family: str | None = None, step: int | None = None, adapter: str | None = None) -> LoadedModel:
    """`load_checkpoint` plus the family and tokenizer the checkpoint records (a checkpoint from
    before families were recorded is ours, `glm`). tokenizer_file / family override them. A
    tokenizer whose ids do not fit the embedding is a clear error. adapter: a fine-tuned
    adapter folder (adapters.py) put on the (quantized) base, after checking it is its base."""
    from glm_jax.families import FamilyError, get_family
    from glm_jax.tokenizer import TokenizerError, check_fits

    config, params, step, meta, path = _restore(path, step)
    try:
        fam = get_family(family or meta.get("family") or "glm")
        if tokenizer_file is None and meta.get("tokenizer"):
            tokenizer_file = os.path.join(path, meta["tokenizer"])
        tok = fam.load_tokenizer(tokenizer_file)
        check_fits(tok, config.padded_vocab_size, f"the checkpoint {path}")
    except (FamilyError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
    if adapter is not None:
        from glm_jax.adapters import attach, load_adapter
        from glm_jax.peft import check_base

        ad = load_adapter(adapter)
        try:
            check_base(ad.base, config, params, step, ad.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    config, params = _quantize_on_load(config, params, quantize, path)
    if adapter is not None:
        config, params = attach(ad, config, params)
    return LoadedModel(config, params, step, fam, tok, path)


def move_to_device(tree: dict) -> dict:
    """Replace a nested dict's numpy leaves by device arrays in place, one leaf at a time, each
    numpy leaf dropped as soon as it is copied: one copy of the model at any moment (plus a leaf)."""
    for key, value in list(tree.items()):
        if isinstance(value, dict):
            move_to_device(value)
        elif isinstance(value, np.ndarray):
            tree[key] = None
            tree[key] = jnp.asarray(value)
            del value
    return tree


def save_serving(path: str, config: GLMConfig, params: dict, step: int, source: str, family: str = "glm",
                 tokenizer_file: str | None = None, extra: dict | None = None) -> None:
    """A serving checkpoint: parameters (float or quantized, no optimizer state), their config,
    the family and a copy of the tokenizer file, in the training checkpoints' folder layout, so
    `load_checkpoint` / `load_model` and every script take it. Written beside `path` and renamed
    into place when complete: a failure leaves no half-written folder. `path` must not exist yet
    (or be empty). Pass jax arrays (`move_to_device`): orbax copies numpy leaves before writing."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"{path} exists and is not empty; remove it or choose another output folder")
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rel = copy_tokenizer(tokenizer_file, tmp)
        ckpt = Checkpoints(tmp, keep=1, async_save=False)
        try:
            ckpt.save(step, {"params": params}, {"config": config.to_dict(), "serving": True, "source": source,
                                                 "family": family, "tokenizer": rel, **(extra or {})})
        finally:
            ckpt.close()
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
