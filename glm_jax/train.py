"""The trainer (the jitted step on a mesh) and the training loop.

One `Trainer` holds everything placement-related: the mesh, the pipeline plan and schedule, the
logical rules and the shardings of parameters (slot layout, `sharding.py`), optimizer state
(ZeRO-1) and batches. Its jitted functions:

- `grad_pass(params, batch, rng, alpha, scale, microbatches)`: gradients of scale x (summed token
  loss) over one batch, with the loss sum and token count;
- `update(state, grads, loss_sum, tokens, lr, stop)`: unscale, divide by the step's token count
  (the loss is normalised globally, whatever the number of passes), skip the step if any gradient
  is not finite, clip, AdamW, advance the loss scale; reduce the processes' stop votes;
- `fused_step(state, batch, lr, alpha, microbatches, stop)`: the two fused.

Schedules: on a pipelined mesh "1f1b" (the default) runs every microbatch of a step, a ramped
batch included, through one schedule, one compiled step for every batch size; "gpipe" runs a step
as passes of `pass_batch` sequences, accumulated. Without stages the plain model runs, in passes.

The loop (`train`), in named steps: resume or initialise (`_resume_or_initialise`), dispatch a
step (`_Run.dispatch`), log it one step late (`_Run.log_step`: step n's metrics are read while
step n + 1 runs), evaluate (the mixture's held-out loss and each source's), save, finish; what
changes as it runs is a `RunProgress`, with the seconds the host spent dispatching and waiting
(the summary's step-time split); `StepProfiler` traces the steps `--profile` names.

Where the rest lives: checkpoint I/O in `checkpoints.py`; `TrainState` and its save / restore in
`train_state.py`; the pipeline plan and the schedules in `pipeline.py`; token losses in
`losses.py`; the optimizer, loss scaling and the batch ramp-up in `optim.py`; stop signals and
metrics files in `runlog.py`; the compile-only dry run in `dry_run.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from tqdm import tqdm

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.alignment import token_logprobs
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
from glm_jax.pair_objectives import REFERENCE_FIELD, held_out_metrics
from glm_jax.peft import VALUE_HEAD, PeftConfig, combine, split
from glm_jax.profiling import StepProfiler
from glm_jax.prompts import check_pipeline
from glm_jax.reference import cached_reference
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


FSDP_GATHER = ("once", "tick")


def as_master(tree):
    """The tree with its floating leaves in fp32: what trains (and its Adam moments) is held in
    fp32 whatever the base's dtype, the layers casting it to the compute dtype where they use it
    (THUDM's recipes: ChatGLM-6B's `prefix_encoder.float()`, ChatGLM3's trainable parameters cast
    to fp32). A 16-bit copy would lose small updates (bf16) or underflow squared gradients (fp16)."""
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def base_shardings(config: GLMConfig, mesh: jax.sharding.Mesh, fsdp: bool = False, sequence_parallel: bool = False):
    """NamedShardings of `config`'s parameter tree in the plain stacked layout, by the rules a
    `Trainer` with these settings uses: where a fine-tuning base is read (`loading.load_model(...,
    shardings=)`), each device reading only its share, before the trainer lays the layers into
    its slots. A stacked layer leaf [L, ...] whose L the stage axis does not divide is split over
    `stage` on its largest dimension that it does divide instead (else replicated over it)."""
    sh.check_splittable(config, mesh)
    rules = sh.rules_for(config, mesh, fsdp=fsdp, sequence_parallel=sequence_parallel)
    boxed = abstract_params(config)
    shapes = nn.meta.unbox(boxed)
    stages = sh.axis_size(mesh, "stage")
    return jax.tree_util.tree_map(
        lambda s, a: _stage_fit(s, a.shape, stages), sh.named_shardings(boxed, mesh, rules), shapes
    )


def _stage_fit(sharding: NamedSharding, shape: tuple, stages: int) -> NamedSharding:
    """`sharding` of a plain stacked leaf, its leading `stage` moved where `stages` divides (above)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    if not spec or spec[0] != "stage" or shape[0] % stages == 0:
        return sharding
    spec[0] = None
    free = [i for i, axis in enumerate(spec) if axis is None and i > 0 and shape[i] % stages == 0]
    if free:
        spec[max(free, key=lambda i: shape[i])] = "stage"
    return NamedSharding(sharding.mesh, P(*spec))


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    if kind.startswith("TPU"):
        return PEAK_FLOPS.get(kind)
    found = [k for k in PEAK_FLOPS if not k.startswith("TPU") and k.lower() in kind.lower()]
    return PEAK_FLOPS[max(found, key=len)] if found else None


@dataclasses.dataclass
class Trainer:
    """Placement and the jitted steps of one run's model on its mesh (module docstring)."""

    config: GLMConfig
    optim: OptimConfig
    mesh: jax.sharding.Mesh
    pass_batch: int  # sequences per gradient pass; with 1f1b the largest batch of a step
    microbatches: int | None = None  # per pass (default: one sequence per data replica each)
    fsdp: bool = False
    # which parameters train (peft.py); the rest are `frozen`, an argument of every step
    peft: PeftConfig = PeftConfig("full")
    schedule: str | None = None  # "1f1b" or "gpipe" on a pipelined mesh (default 1f1b); "none" without
    # FSDP on a pipelined mesh: gather a stage's weights once a step ("once": the gathered weights
    # stay for the step) or on every tick ("tick": less memory, a gather per tick)
    fsdp_gather: str = "once"
    sequence_parallel: bool = False  # the residual stream's positions over `tensor` (Megatron's)
    # what a step minimises: `pipeline.TokenLoss`'s interface (`pair_objectives.PairObjective`: DPO,
    # its variants, the reward model; their loss is a mean over pairs, not tokens)
    objective: object = pipeline.TOKEN_LOSS

    def __post_init__(self):
        config, mesh, peft = self.config, self.mesh, self.peft
        if config.quantization != "none" and not peft.is_adapter:
            raise ConfigError(
                f"quantization={config.quantization} is weight-only quantization for serving: train in float "
                "(quantization=none), then `python experiments/quantize.py`; a quantized base trains "
                "adapter methods only (lora, ptuning, prompt, ptuning-v1, adapter, ia3)"
            )
        self.microbatches = pipeline.microbatch_count(self.microbatches, self.pass_batch, mesh)
        sh.check_splittable(config, mesh, self.pass_batch, self.microbatches)
        self.plan = pipeline.PipelinePlan(config.num_layers, sh.axis_size(mesh, "stage"))
        if self.plan.stages == 1:
            self.schedule = "none"
        elif (self.schedule or "1f1b") not in pipeline.SCHEDULES:
            raise ConfigError(f"pipeline schedule {self.schedule!r}; choose one of {pipeline.SCHEDULES}")
        self.schedule = self.schedule or "1f1b"
        if peft.method == "freeze" and self.plan.stages > 1:
            raise ConfigError(
                "freeze splits the layer stack at a layer; run it on a mesh without pipeline stages "
                "(--mesh DATAx1xTENSOR), or use lora / ptuning / adapter / ia3 / full on this mesh"
            )
        check_pipeline(config, self.plan.stages)  # virtual tokens: the same, for their pass over every layer
        if self.fsdp_gather not in FSDP_GATHER:
            raise ConfigError(f"fsdp gather {self.fsdp_gather!r}; choose one of {FSDP_GATHER}")
        self.rules = sh.rules_for(config, mesh, fsdp=self.fsdp, sequence_parallel=self.sequence_parallel)
        self.tx = make_optimizer(self.optim)
        self.dynamic_scale = config.dtype == "float16"
        boxed = abstract_params(config)
        self.param_shardings, self.frozen_shardings = split(
            sh.named_shardings(boxed, mesh, self.rules), peft, config, take=lambda s, rows: s
        )
        trainable, frozen = jax.eval_shape(lambda p: split(p, peft, config), nn.meta.unbox(boxed))
        self.trainable_shapes = jax.eval_shape(as_master, trainable)
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

    @property
    def gather_once(self) -> bool:
        """FSDP weights gathered once a step (and, with or without FSDP, one program per data shard)."""
        return not self.fsdp or self.fsdp_gather == "once"

    @property
    def uses_dropout(self) -> bool:
        """Whether a step draws dropout: the model's own, or its adapter's (a released base sets
        its own to 0, LoRA and P-tuning keep theirs)."""
        c = self.config
        adapter = (c.lora_dropout if c.lora_rank else 0.0) or (c.prefix_dropout if c.pre_seq_len else 0.0)
        return bool(c.hidden_dropout or c.attention_dropout or adapter)

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
        replicated, stages = self.replicated, self.plan.stages

        def fit(sharding, shape):
            if sharding.spec and sharding.spec[0] == "stage" and shape.shape[0] % stages:
                return NamedSharding(self.mesh, P(None, *sharding.spec[1:]))
            return sharding

        params = jax.tree_util.tree_map(fit, self.param_shardings, shapes.params)
        moment = jax.tree_util.tree_map(lambda s, a: sh.zero1_sharding(s, a.shape), params, shapes.params)
        return TrainState(
            step=replicated,
            params=params,
            opt_state=self.param_like(shapes.opt_state, lambda _: moment, lambda _: replicated),
            loss_scale=LossScale(replicated, replicated, replicated),
            rng=replicated,
            skipped=replicated,
            consecutive_skips=replicated,
        )

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical rules every trace runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), targeting(self.mesh):
            yield

    # ---- the step functions, traced by the jitted ones (`_jit`) -------------------------------------
    def step_rng(self, state: TrainState) -> jax.Array:
        """The dropout key of the step `state` is at (traceable)."""
        return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def _combine(self, trainable, frozen) -> dict:
        """The model's parameters from the trainable and the frozen part (`peft.combine`)."""
        return combine(trainable, frozen, self.peft)

    def _scaled_mean_loss(self, params, frozen, batch, rng, alpha, scale):
        """scale x mean token loss of a pass (GPipe on a pipelined mesh, else the plain model),
        with (loss sum, tokens)."""
        loss_sum, tokens = pipeline.loss_sum(
            self._combine(params, frozen),
            batch,
            self.config,
            self.plan,
            self.microbatches,
            embedding_alpha=alpha,
            dropout_rng=rng,
            gather_once=self.gather_once,
            objective=self.objective,
        )
        return loss_sum / jnp.maximum(tokens, 1.0) * scale, (loss_sum, tokens)

    def _scaled_gradients(self, params, frozen, batch, used, rng, alpha, scale):
        """Gradients of scale x mean loss by this trainer's schedule, with (loss sum, tokens): 1F1B
        runs the first `used` microbatches of the batch; GPipe and the plain model differentiate a pass."""
        if self.schedule == "1f1b":
            return pipeline.one_f_one_b(
                params,
                frozen,
                self._combine,
                batch,
                used,
                self.config,
                self.plan,
                self.microbatches,
                embedding_alpha=alpha,
                dropout_rng=rng,
                scale=scale,
                gather_once=self.gather_once,
                objective=self.objective,
            )
        grads, (loss_sum, tokens) = jax.grad(self._scaled_mean_loss, has_aux=True)(
            params, frozen, batch, rng, alpha, scale
        )
        return grads, loss_sum, tokens

    def _pass_gradients(self, params, frozen, batch, used, rng, alpha, scale):
        """Gradients of scale x (summed loss): the backward sees scale x mean loss (what fp16
        loss scaling expects), the fp32 parameter gradients are then multiplied by the token count."""
        rng = rng if self.uses_dropout else None
        grads, loss_sum, tokens = self._scaled_gradients(params, frozen, batch, used, rng, alpha, scale)
        return jax.tree_util.tree_map(lambda g: g * tokens, grads), loss_sum, tokens

    def _apply_gradients(self, state: TrainState, grads, loss_sum, tokens, lr, votes):
        """Unscale the summed gradients and divide by the step's tokens, update (or skip a step
        with a non-finite gradient) -> (new state, the step's metrics with the reduced stop votes)."""
        scale = state.loss_scale.scale
        grads = jax.tree_util.tree_map(lambda g: g / (scale * jnp.maximum(tokens, 1.0)), grads)
        finite = all_finite(grads)
        new_state = self._next_state(state, grads, lr, finite)
        return new_state, _step_metrics(grads, loss_sum, tokens, lr, scale, finite, new_state, votes)

    def _next_state(self, state: TrainState, grads, lr, finite) -> TrainState:
        """AdamW at `lr` (clipped) and the next loss scale; where a gradient is not finite the
        parameters and moments stay as they were and the step counts as skipped."""
        opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
        updates, new_opt = self.tx.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        skips = jnp.where(finite, 0, state.consecutive_skips + 1)
        return TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            loss_scale=state.loss_scale.update(
                finite, self.optim, self.dynamic_scale, state.skipped, state.consecutive_skips
            ),
            rng=state.rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            consecutive_skips=skips,
        )

    def _train_step(self, state: TrainState, frozen, batch, used, votes, lr, alpha):
        """One pass's gradients and the update: the fused step."""
        grads, loss_sum, tokens = self._pass_gradients(
            state.params, frozen, batch, used, self.step_rng(state), alpha, state.loss_scale.scale
        )
        return self._apply_gradients(state, grads, loss_sum, tokens, lr, votes)

    def _mean_loss(self, params, frozen, batch):
        """(mean token loss, tokens) of a batch, no dropout: held-out evaluation."""
        loss_sum, tokens = pipeline.loss_sum(
            self._combine(params, frozen),
            batch,
            self.config,
            self.plan,
            self.microbatches,
            gather_once=self.gather_once,
        )
        return loss_sum / jnp.maximum(tokens, 1.0), tokens

    def _hidden(self, params, batch, config: GLMConfig):
        """Final hidden states [B, S, E] (before the final norm) of a batch, no dropout."""
        if self.plan.stages == 1:
            return pipeline.hidden_states(params, batch, config)
        return pipeline.pipeline_blocks(params, batch, config, self.plan, self.microbatches)

    def _pair_stats(self, params, frozen, batch) -> dict:
        """A pair objective's held-out sums of a batch (`PairObjective.stats`), no dropout."""
        params = self._combine(params, frozen)
        return self.objective.stats(self.config, params, self._hidden(params, batch, self.config), batch)

    def _answer_logps(self, params, frozen, batch):
        """log p(target) [B, S] where `loss_mask` is set (0 elsewhere), no dropout: the frozen base
        alone (adapter off) for an adapter method, else the model of `params` (the reference cache)."""
        if self.peft.is_adapter:
            config, params = self.peft.base_config(self.config), frozen
        else:
            config, params = self.config, self._combine(params, frozen)
        logits = GLM(config).apply({"params": params}, self._hidden(params, batch, config), method=GLM.head)
        return token_logprobs(logits, batch["targets"]) * batch["loss_mask"]

    # ---- the jitted functions -----------------------------------------------------------------------
    def _jit(self):
        """Jit the step functions in their shardings. An update consumes (donates) the state and
        the gradients, a fused step the state, an accumulation the running sum."""
        # the shardings of the arguments and results
        replicated, votes, batch = self.replicated, self.vote_sharding, self.batch_sharding
        state, params, frozen = self.state_shardings, self.state_shardings.params, self.frozen_shardings
        with self.context():
            self._grad_pass = jax.jit(
                self._pass_gradients,
                in_shardings=(params, frozen, batch, replicated, replicated, replicated, replicated),
                out_shardings=(params, replicated, replicated),
            )
            self.accumulate = jax.jit(_add_trees, donate_argnums=0, in_shardings=(params, params), out_shardings=params)
            self._update = jax.jit(
                self._apply_gradients,
                in_shardings=(state, params, replicated, replicated, replicated, votes),
                out_shardings=(state, replicated),
                donate_argnums=(0, 1),
            )
            self._fused_step = jax.jit(
                self._train_step,
                in_shardings=(state, frozen, batch, replicated, votes, replicated, replicated),
                out_shardings=(state, replicated),
                donate_argnums=0,
            )
            self._eval_loss = jax.jit(
                self._mean_loss, in_shardings=(params, frozen, batch), out_shardings=(replicated, replicated)
            )
            if isinstance(self.objective, pipeline.TokenLoss):
                return
            self._eval_pairs = jax.jit(self._pair_stats, in_shardings=(params, frozen, batch), out_shardings=replicated)
            self._reference = jax.jit(self._answer_logps, in_shardings=(params, frozen, batch), out_shardings=batch)

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

    def eval_pairs(self, params, batch) -> dict:
        return self._eval_pairs(params, self.frozen, batch)

    def answer_logps(self, params, batch):
        """`_answer_logps` of a placed batch (params: the trainable part, unused by an adapter method)."""
        return self._reference(params, self.frozen, batch)

    def with_reference(self, params, batch: dict) -> dict:
        """A placed batch with the reference's `ref_logps` beside it where the objective compares with
        one and the frozen base is that reference (an adapter method); freeze / full rows carry
        theirs from the cache (`reference.py`)."""
        if not self.objective.needs_reference or not self.peft.is_adapter:
            return batch
        return {**batch, REFERENCE_FIELD: self.answer_logps(params, batch)}

    def votes(self, stop: bool) -> jax.Array:
        """This process's stop vote on each of its devices, as one global [devices] array."""
        every = np.full((self.mesh.size,), int(bool(stop)), np.int32)  # each device reads only its own
        return jax.make_array_from_callback(every.shape, self.vote_sharding, lambda index: every[index])

    def set_frozen(self, frozen: dict) -> None:
        """Place the frozen parameters (plain stacked layout, `peft.split`) in their shardings. A
        base read into `base_shardings` on a mesh without stages is there already: it is kept as
        it is, not copied (the caller's references to it are then the trainer's)."""
        if self.plan.stages == 1 and _placed(frozen, self.frozen_shardings):
            self.frozen = frozen
            return
        with jax.set_mesh(self.mesh):
            self.frozen = jax.jit(
                lambda f: pipeline.params_to_slots(f, self.plan), out_shardings=self.frozen_shardings
            )(frozen)

    def release(self) -> None:
        """Drop the frozen base (its device memory is freed with the caller's last reference)."""
        self.frozen = {}

    # ---- state ----------------------------------------------------------------------------------
    def fresh_state(self, key, trainable: dict | None = None) -> TrainState:
        """A new state from `key` (traceable: jit it with shardings, or eval_shape it); its
        parameters are `trainable` (plain stacked layout) or, without, freshly initialised ones
        (for an adapter: the adapter's, the base's random init is dead code XLA drops; a value head
        the config has and `trainable` lacks is initialised the same way)."""
        if trainable is None or (self.config.value_head and VALUE_HEAD not in trainable):
            variables = GLM(self.config).init(key, dummy_batch(1, 8))
            fresh = split(nn.meta.unbox(variables["params"]), self.peft, self.config)[0]
            # a base has no value head (a reward model trained with freeze / full): a fresh one
            trainable = fresh if trainable is None else {**trainable, VALUE_HEAD: fresh[VALUE_HEAD]}
        return self._new_state(pipeline.params_to_slots(as_master(trainable), self.plan), key)

    def place_trainable(self, trainable: dict):
        """Trainable parameters (plain stacked layout) as a state holds them: master dtype, slot
        layout, placed in their shardings."""
        with jax.set_mesh(self.mesh):
            return jax.jit(
                lambda t: pipeline.params_to_slots(as_master(t), self.plan), out_shardings=self.state_shardings.params
            )(trainable)

    def init_state(self, seed: int, trainable: dict | None = None) -> TrainState:
        """Fresh (or the given `trainable`) parameters, placed directly in their shardings, and
        optimizer state."""
        # outside the rules context: init must not constrain the unpadded layer axis to `stage`
        with jax.set_mesh(self.mesh):
            return jax.jit(self.fresh_state, out_shardings=self.state_shardings)(jax.random.key(seed), trainable)

    def place_batch(self, local: dict, microbatches: int | None = None) -> dict:
        """This process's rows of a batch -> global arrays [B, S] sharded over `data` (one process:
        all rows, a plain put). Several processes: the rows its devices hold (`sh.rows_held` of the
        batch), ascending; with microbatches, those of each microbatch (`sh.microbatch_rows_held`).
        microbatches: the rows are that many 1F1B microbatches, one after the other; they are laid
        out for `pipeline.split_microbatches` over this trainer's microbatches, the rest zero."""
        arrays = {k: np.asarray(v) for k, v in local.items() if np.ndim(v) == 2}
        if microbatches is not None:
            arrays = pipeline.pad_microbatches(arrays, microbatches, self.microbatches)
        if jax.process_count() > 1:
            return sh.global_batch(arrays, self.mesh)
        return jax.device_put(arrays, self.batch_sharding)

    def plain_params(self, params) -> dict:
        """Trainable parameters in the plain stacked layout (slots undone). Collective: with
        several processes every process calls it."""
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda p: pipeline.params_from_slots(p, self.plan))(params)

    def model_flops_per_step(self, tokens: int, seq_len: int) -> float:
        return flops_per_token(self.config, seq_len)["train"] * tokens


def _add_trees(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _placed(tree, shardings) -> bool:
    """Whether every leaf of `tree` is a jax.Array already in the sharding of the same path."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    if structure != jax.tree_util.tree_structure(shardings):
        return False
    return all(
        isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(leaves, jax.tree_util.tree_leaves(shardings))
    )


def _step_metrics(grads, loss_sum, tokens, lr, scale, finite, state: TrainState, votes) -> dict:
    """What an update reports (on device): the normalised loss, the gradient norms (the embedding's
    apart), the loss scale it unscaled by, whether it stepped, the skip counters, the agreed stop."""
    embedding_norm = optax.global_norm(grads.get("word_embeddings", {}))
    rest = {k: v for k, v in grads.items() if k != "word_embeddings"}
    return dict(
        loss=loss_sum / jnp.maximum(tokens, 1.0),
        tokens=tokens,
        learning_rate=lr,
        grad_norm=optax.global_norm(grads),
        embedding_grad_norm=embedding_norm,
        other_grad_norm=optax.global_norm(rest),
        loss_scale=scale,
        finite=finite,
        skipped=state.skipped,
        consecutive_skips=state.consecutive_skips,
        stop=jnp.max(votes) > 0,
    )


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
    fsdp_gather: str = "once"  # Trainer.fsdp_gather
    sequence_parallel: bool = False
    family: str = "glm"  # recorded in every checkpoint (families.py), with the tokenizer file
    tokenizer_file: str | None = None  # copied into ckpt_dir/tokenizer/ (None: ours, the package's)
    # (START, STOP): a jax.profiler trace of steps START..STOP-1 (metrics.jsonl's numbers) under
    # log_dir/profile (`StepProfiler`)
    profile: tuple[int, int] | None = None
    # freeze / full DPO: where the base's reference log-probabilities are cached (`reference.py`);
    # None: beside ckpt_dir, in its parent's `reference` folder
    reference_dir: str | None = None


def make_trainer(
    config: GLMConfig,
    optim: OptimConfig,
    run: RunConfig,
    mesh,
    peft: PeftConfig = PeftConfig("full"),
    objective=pipeline.TOKEN_LOSS,
) -> tuple[Trainer, BatchSchedule]:
    """The trainer of a run and its batch schedule (in 1F1B microbatches, or in passes). A 1F1B
    trainer holds the whole global batch, in microbatches of pass_batch / microbatches rows."""
    pass_batch, microbatches = run.pass_batch or run.global_batch, run.microbatches
    sh.check_splittable(config, mesh, seq_len=run.seq_len)  # a context axis must divide the sequence
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
    trainer = Trainer(
        config,
        optim,
        mesh,
        pass_batch,
        microbatches,
        fsdp=run.fsdp,
        peft=peft,
        schedule=run.schedule,
        fsdp_gather=run.fsdp_gather,
        sequence_parallel=run.sequence_parallel,
        objective=objective,
    )
    unit = trainer.microbatch_rows if trainer.schedule == "1f1b" else trainer.pass_batch
    return trainer, BatchSchedule(
        run.global_batch, unit, run.steps, optim.ramp_start, optim.ramp_fraction, optim.ramp_increment
    )


@dataclasses.dataclass
class RunProgress:
    """The run's mutable state: the training state and what the logged steps add up to."""

    state: TrainState
    clock: float  # time.perf_counter() when the last step's metrics were read (or the loop began)
    first_loss: float | None = None
    last: dict | None = None  # the last logged step's metrics record
    timed: float = 0.0  # seconds of the logged steps but the run's first (it compiles)
    tokens: int = 0  # their tokens
    flops: float = 0.0  # their model FLOPs
    host: float = 0.0  # their seconds waiting for batches and dispatching (`_Run.loop`)
    device: float = 0.0  # their seconds waiting for the steps' results (`_Run.log_step`)


@dataclasses.dataclass
class _Run:
    """What the steps of one `train` call share, fixed once the state is resumed or initialised;
    its methods are the loop's steps."""

    config: GLMConfig
    optim: OptimConfig
    run: RunConfig
    trainer: Trainer
    batches: BatchSchedule
    data: DataIterator
    ckpt: Checkpoints
    metrics: MetricsWriter
    eval_builder: object | None
    source_evals: dict  # source name -> a builder of its own held-out sequences
    log: Callable[[str], None]
    lead: bool  # process 0: writes the metrics, the summary and calls on_done
    start: int  # the step the run resumed at (0: a fresh run)
    tokenizer_meta: str | None
    extra_meta: dict  # the rest of a checkpoint's metadata: the given `meta`, or the resumed checkpoint's
    peak: float | None  # FLOP/s of one device
    profiler: StepProfiler

    @property
    def pairs(self) -> bool:
        """The objective is a pair objective (its held-out metrics are pair accuracy and margin)."""
        return not isinstance(self.trainer.objective, pipeline.TokenLoss)

    def placed(self, state: TrainState, rows: dict, microbatches: int | None = None) -> dict:
        """This process's rows placed (`Trainer.place_batch`), with the reference beside them where
        the objective needs it (`Trainer.with_reference`)."""
        return self.trainer.with_reference(state.params, self.trainer.place_batch(rows, microbatches))

    @property
    def one_schedule(self) -> bool:
        """1F1B: a step's whole batch runs through one schedule."""
        return self.trainer.schedule == "1f1b"

    def save(self, state: TrainState, step: int) -> None:
        record = {
            "config": self.config.to_dict(),
            "data": self.data.state(),
            "step": step,
            "family": self.run.family,
            "tokenizer": self.tokenizer_meta,
            **self.extra_meta,
            "optim": dataclasses.asdict(self.optim)
            | {"embedding_alpha_schedule": list(self.optim.embedding_alpha_schedule)},
        }
        save_state(self.ckpt, self.trainer, step, state, record)

    def evaluate(self, params) -> dict:
        """{"eval_loss": the mixture's held-out loss (None without held-out data), "eval_loss/<name>":
        each source's on its own held-out split}, each over run.eval_batches batches. A pair
        objective: its mean pair loss, eval_pair_accuracy, eval_reward_margin (`held_out_metrics`)."""
        if self.pairs and self.eval_builder is not None:
            return self._held_out_pairs(params)
        losses = {"eval_loss": None if self.eval_builder is None else self._held_out_loss(self.eval_builder, params)}
        for name, builder in self.source_evals.items():
            losses[f"eval_loss/{name}"] = self._held_out_loss(builder, params)
        return losses

    def _held_out_loss(self, builder, params) -> float:
        """Mean token loss of run.eval_batches batches of `builder`'s sequences."""
        trainer = self.trainer
        rows = sh.rows_held(trainer.batch_sharding, trainer.pass_batch)
        held_out = DataIterator(builder, trainer.pass_batch, prefetch=0, rows=rows)
        total = count = 0.0
        with trainer.context():
            for _ in range(self.run.eval_batches):
                loss, tokens = trainer.eval_loss(params, trainer.place_batch(next(held_out)))
                total, count = total + float(loss) * float(tokens), count + float(tokens)
        return total / max(count, 1.0)

    def _held_out_pairs(self, params) -> dict:
        trainer = self.trainer
        rows = sh.rows_held(trainer.batch_sharding, trainer.pass_batch)
        held_out = DataIterator(self.eval_builder, trainer.pass_batch, prefetch=0, rows=rows)
        sums = {}
        with trainer.context():
            for _ in range(self.run.eval_batches):
                batch = trainer.with_reference(params, trainer.place_batch(next(held_out)))
                batch_sums = jax.device_get(trainer.eval_pairs(params, batch))
                sums = {k: sums.get(k, 0.0) + float(v) for k, v in batch_sums.items()}
        return held_out_metrics(sums)

    def initial_evaluation(self, state: TrainState) -> dict:
        """With eval_every set, a fresh run's held-out losses before step 1 (logged as step 0)."""
        if not (self.run.eval_every and self.start == 0):
            return {}
        losses = self.evaluate(state.params)
        if losses["eval_loss"] is not None:
            self.metrics.write({"step": 0, **losses})
        return losses

    # ---- dispatch a step ----------------------------------------------------------------------------
    def dispatch(self, state: TrainState, step: int, vote: bool):
        """Dispatch step `step` (nothing waits on the device) -> (state, metrics on device)."""
        lr = learning_rate(self.optim, self.batches.samples_before(step), self.batches.total_samples)
        alpha = embedding_alpha(self.optim, step, self.config.embedding_shrink_alpha)
        passes = self.batches.passes(step)  # with 1F1B: microbatches
        trainer = self.trainer
        with trainer.context():
            if self.one_schedule:
                rows = self._microbatch_rows(passes)
                return trainer.fused_step(state, self.placed(state, rows, passes), lr, alpha, passes, vote)
            if passes == 1:
                return trainer.fused_step(state, self.placed(state, next(self.data)), lr, alpha, stop=vote)
            return self._accumulated_step(state, passes, lr, alpha, vote)

    def _microbatch_rows(self, microbatches: int) -> dict:
        """This process's rows of `microbatches` 1F1B microbatches, one after the other."""
        parts = [next(self.data) for _ in range(microbatches)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if np.ndim(parts[0][key]) == 2}

    def _accumulated_step(self, state: TrainState, passes: int, lr, alpha, vote: bool):
        """A step of several gradient passes, accumulated, then one update."""
        trainer = self.trainer
        rng = trainer.step_rng(state)
        grads = loss_sum = tokens = None
        for i in range(passes):
            pass_grads, pass_loss, pass_tokens = trainer.grad_pass(
                state.params,
                self.placed(state, next(self.data)),
                jax.random.fold_in(rng, i),
                alpha,
                state.loss_scale.scale,
            )
            grads = pass_grads if grads is None else trainer.accumulate(grads, pass_grads)
            if loss_sum is None:
                loss_sum, tokens = pass_loss, pass_tokens
            else:
                loss_sum, tokens = loss_sum + pass_loss, tokens + pass_tokens
        return trainer.update(state, grads, loss_sum, tokens, lr, vote)

    # ---- log a step ---------------------------------------------------------------------------------
    def log_step(self, progress: RunProgress, step: int, metrics: dict, bar) -> bool:
        """Read step `step`'s metrics (waiting for it), log them; -> the processes' agreed stop."""
        waited = time.perf_counter()
        values = {k: (bool(v) if k in ("finite", "stop") else float(v)) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds, progress.clock = now - progress.clock, now
        passes = self.batches.passes(step)
        tokens = passes * self.batches.pass_batch * self.run.seq_len
        flops = self.trainer.model_flops_per_step(tokens, self.run.seq_len)
        if step > self.start:  # the first step compiles
            progress.timed += seconds
            progress.tokens += tokens
            progress.flops += flops
            progress.device += now - waited
        record = self._record(step, values, passes, seconds, tokens, flops)
        if progress.first_loss is None:
            progress.first_loss = record["loss"]
        progress.last = record
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}")
        self._check_finite(progress.state, step, values)
        return values["stop"]

    def _record(self, step: int, values: dict, passes: int, seconds: float, tokens: int, flops: float) -> dict:
        """Step `step`'s line of metrics.jsonl."""
        return {
            "step": step + 1,
            **{k: v for k, v in values.items() if k not in ("finite", "stop")},
            "skipped_step": not values["finite"],
            "batch": passes * self.batches.pass_batch,
            "passes": 1 if self.one_schedule else passes,
            "microbatches": passes * (1 if self.one_schedule else self.trainer.microbatches),
            "embedding_alpha": float(embedding_alpha(self.optim, step, self.config.embedding_shrink_alpha)),
            "step_time": seconds,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / (seconds * self.peak * jax.device_count()) if self.peak else None,
        }

    def _check_finite(self, state: TrainState, step: int, values: dict) -> None:
        """Say that step `step` was skipped; after optim.max_consecutive_skips in a row save `state`
        (the latest dispatched) and raise TrainingError."""
        if not values["finite"]:
            self.log(
                f"step {step + 1}: non-finite gradients, step skipped (loss scale {values['loss_scale']:g}, "
                f"{int(values['consecutive_skips'])} in a row)"
            )
        if values["consecutive_skips"] >= self.optim.max_consecutive_skips:
            saved = int(state.step)
            self.save(state, saved)
            raise TrainingError(
                f"{int(values['consecutive_skips'])} consecutive steps had non-finite gradients "
                f"(limit {self.optim.max_consecutive_skips}) by step {step + 1}; saved step {saved} to "
                f"{self.ckpt.directory}. Lower the learning rate or check the data."
            )

    # ---- the loop and its end -----------------------------------------------------------------------
    def loop(self, progress: RunProgress) -> bool:
        """Steps start .. run.steps - 1, each step's metrics read while the next one runs, held-out
        loss every eval_every steps, checkpoints every ckpt_every and at the end or on an agreed
        stop; -> whether a stop signal ended the run."""
        run, stopped = self.run, False
        bar = tqdm(
            range(self.start, run.steps),
            initial=self.start,
            total=run.steps,
            disable=not (self.lead and run.progress),
            desc="train",
            unit="step",
        )
        with StopSignal() as signals, self.profiler:
            pending = None  # (step, metrics): dispatched, not logged yet
            for step in bar:
                self.profiler.before(step + 1, progress.state)
                started = time.perf_counter()
                with self.profiler.annotate(step + 1):
                    progress.state, metrics = self.dispatch(progress.state, step, signals.received is not None)
                if step > self.start:  # the first step compiles
                    progress.host += time.perf_counter() - started
                self.profiler.after(step + 1, metrics)
                stopped = pending is not None and self.log_step(progress, *pending, bar)
                pending = (step, metrics)
                if run.eval_every and (step + 1) % run.eval_every == 0 and step + 1 < run.steps:
                    stopped = self.log_step(progress, *pending, bar) or stopped
                    pending = None
                    self.metrics.write({"step": step + 1, **self.evaluate(progress.state.params)})
                if (step + 1) % run.ckpt_every == 0 or step + 1 == run.steps or stopped:
                    self.save(progress.state, step + 1)
                if stopped:
                    self.log(
                        f"stop requested: every process saved step {step + 1} to {self.ckpt.directory}; rerun to resume"
                    )
                    break
            if pending is not None:
                self.log_step(progress, *pending, bar)
        return stopped

    def finish(self, progress: RunProgress, stopped: bool, on_done) -> dict:
        """After the loop: the final held-out losses (none after a stop or without a logged step)
        and on_done with the final trainable parameters, on every process (both are collective),
        once the training state and the trainer's frozen base are dropped (on_done may load a
        model in their place); -> those losses (`evaluate`; {} without)."""
        last, state = progress.last, progress.state
        losses = self.evaluate(state.params) if last is not None and not stopped else {}
        if losses.get("eval_loss") is not None:
            self.metrics.write({"step": last["step"], **losses})
        if on_done is not None and not stopped:
            params, step = self.trainer.plain_params(state.params), int(state.step)
            progress.state = state = None  # the state and the frozen base leave the devices first
            self.trainer.release()
            on_done(params, step)
        return losses

    def step_time_split(self, progress: RunProgress) -> dict:
        """Seconds per step (the logged steps but the run's first, which compiles): host (waiting
        for batches and dispatching), device (waiting for results), collectives (device seconds
        in collective ops, read from the profile where the backend's trace reports them)."""
        steps = max(progress.last["step"] - self.start - 1, 0) if progress.last else 0
        collectives, note = self.profiler.collectives()
        return {
            "host_s": progress.host / steps if steps else None,
            "device_s": progress.device / steps if steps else None,
            "collectives_s": collectives,
            "collectives_note": note,
        }

    def close(self) -> None:
        self.ckpt.close()
        self.metrics.close()
        self.data.close()

    def summarise(self, progress: RunProgress, initial_eval: dict, final_eval: dict, stopped: bool) -> dict:
        """The run's summary; the lead process also writes it to log_dir/summary.json and plots the metrics."""
        last, timed, peak = progress.last, progress.timed, self.peak
        summary = {
            "steps": last["step"] if last else self.start,
            "first_loss": progress.first_loss,
            "final_loss": last["loss"] if last else None,
            "initial_eval_loss": initial_eval.get("eval_loss"),
            "eval_loss": final_eval.get("eval_loss"),
            **{k: v for k, v in final_eval.items() if k != "eval_loss"},
            "tokens_per_s": progress.tokens / timed if timed else None,
            "mfu": progress.flops / (timed * peak * jax.device_count()) if timed and peak else None,
            "skipped_steps": int(last["skipped"]) if last else 0,
            "checkpoint_dir": self.ckpt.directory,
            "log_dir": os.path.abspath(self.run.log_dir),
            "interrupted": stopped,
            "step_time_split": self.step_time_split(progress),
            "profile_dir": self.profiler.folder if self.profiler.traced else None,
        }
        if self.lead and last is not None:
            plot_metrics(self.metrics.path, os.path.join(self.run.log_dir, "metrics.png"))
            with open(os.path.join(self.run.log_dir, "summary.json"), "w") as f:
                json.dump(summary, f)
        return summary


def _unit_rows(trainer: Trainer) -> np.ndarray:
    """The rows of each data unit (a 1F1B microbatch, else a pass) this process's devices hold."""
    if trainer.schedule == "1f1b":
        return sh.microbatch_rows_held(trainer.batch_sharding, trainer.microbatch_rows, trainer.microbatches)
    return sh.rows_held(trainer.batch_sharding, trainer.pass_batch)


def _split_base(trainer: Trainer, base: dict | None) -> dict | None:
    """Fine-tuning: place the base's frozen part on the trainer; -> the base's trainable part where
    training starts from it (freeze, full), None for an adapter (initialised fresh) or without a base.
    `base` is emptied: from here its arrays are held by the trainer (and the part returned), so a
    base read into `base_shardings` lies on the devices once. Several processes: a base each
    process read onto its own device goes in as host values (the same on every process), which
    the placing jits take."""
    if base is None:
        return None
    tree = dict(base)
    base.clear()
    if jax.process_count() > 1:
        on_every_process = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable
        tree = jax.tree_util.tree_map(lambda x: x if on_every_process(x) else np.asarray(x), tree)
    base_trainable, frozen = split(tree, trainer.peft, trainer.config)
    del tree
    trainer.set_frozen(frozen)
    return None if trainer.peft.is_adapter else base_trainable


def _resume_or_initialise(
    trainer: Trainer, ckpt: Checkpoints, data: DataIterator, seed: int, base_trainable, meta, log
) -> tuple[int, TrainState, dict | None]:
    """The latest checkpoint in ckpt (its state; the data iterator restored to its position) or a
    fresh state (from base_trainable if given) -> (start step, state, the metadata every checkpoint
    carries on: the resumed checkpoint's, or `meta`)."""
    start = ckpt.latest_step()
    if start is None:
        return 0, trainer.init_state(seed, base_trainable), meta
    meta = ckpt.restore_meta(start)
    check_config_matches(meta["config"], trainer.config, os.path.join(ckpt.directory, str(start)))
    state = restore_state(ckpt, trainer, start, meta)
    data.restore(meta["data"])
    log(f"resumed from {ckpt.directory} at step {start}")
    return start, state, meta


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
    source_evals: dict | None = None,
    objective=pipeline.TOKEN_LOSS,
) -> dict:
    """Train on `mesh` from `builder` (objectives.SequenceBuilder, or sft.SFTBuilder); resume from
    run.ckpt_dir. Held-out loss: `eval_builder`'s (the mixture: `eval_loss`) and, with
    source_evals {name: builder}, each source's own (`eval_loss/<name>`), run.eval_batches each.

    Fine-tuning: `base` is the base model's parameters (plain stacked layout; read into
    `base_shardings(config, mesh)` no device holds it whole, and without stages it is used where
    it lies) and `peft` says which of them train (peft.py); checkpoints then hold the trainable
    part only, with `meta` added to their metadata. `base` is emptied (the trainer holds its
    arrays) and the trainer drops them before on_done. With eval_every set, held-out loss is
    also measured before step 1.
    on_done(params, step): called on every process with the final trainable parameters (plain
    stacked layout, global arrays) when the run reaches run.steps, the training state and the
    frozen base released; collective work in it (orbax
    saves, gathers) runs on every process, file writes and moves once (process 0). Step n's
    metrics are read while step n + 1 runs. Returns the summary (also written to
    log_dir/summary.json): final loss, steps, tokens/s, MFU.

    objective: what a step minimises (`Trainer.objective`). A pair objective's held-out metrics
    are eval_loss (its mean pair loss), eval_pair_accuracy and eval_reward_margin, and `tokens`
    in the step metrics counts pairs; with freeze / full and a reference (DPO, IPO) every row
    of `builder` and `eval_builder` is first scored by the base into run.reference_dir
    (`reference.cached_reference`, keyed by meta["base"] and the rows).
    """
    trainer, batches = make_trainer(config, optim, run, mesh, peft, objective)
    base_trainable = _split_base(trainer, base)
    if objective.needs_reference and not peft.is_adapter:
        if base_trainable is None:
            raise ConfigError(f"{objective.kind} compares with a reference model: give the base checkpoint")
        folder = run.reference_dir or os.path.join(os.path.dirname(os.path.abspath(run.ckpt_dir)), "reference")
        cached = cached_reference(
            trainer,
            functools.partial(trainer.place_trainable, base_trainable),
            {"train": builder, "eval": eval_builder},
            folder,
            (meta or {}).get("base"),
            log,
        )
        builder, eval_builder = cached["train"], cached["eval"]
    microbatches = batches.passes(batches.total_steps - 1) if trainer.schedule == "1f1b" else trainer.microbatches
    log(pipeline.describe(mesh, trainer.plan, microbatches, trainer.schedule))
    if batches.ramp_note:
        log(f"warning: {batches.ramp_note}")
    lead = jax.process_index() == 0
    data = DataIterator(builder, batches.pass_batch, rows=_unit_rows(trainer))
    ckpt = Checkpoints(run.ckpt_dir, run.keep, run.async_checkpoints)
    tokenizer_meta = copy_tokenizer(run.tokenizer_file, ckpt.directory)
    start, state, meta = _resume_or_initialise(trainer, ckpt, data, run.seed, base_trainable, meta, log)
    del base_trainable
    job = _Run(
        config=config,
        optim=optim,
        run=run,
        trainer=trainer,
        batches=batches,
        data=data,
        ckpt=ckpt,
        metrics=MetricsWriter(run.log_dir, start, enabled=lead),
        eval_builder=eval_builder,
        source_evals=dict(source_evals or {}),
        profiler=StepProfiler(run.profile, run.log_dir, log),
        log=log,
        lead=lead,
        start=start,
        tokenizer_meta=tokenizer_meta,
        extra_meta={k: v for k, v in (meta or {}).items() if k not in ("data", "step", "layout")},
        peak=peak_flops(jax.devices()[0]),
    )
    initial_eval = job.initial_evaluation(state)
    progress = RunProgress(state, clock=time.perf_counter())
    del state
    try:
        stopped = job.loop(progress)
        final_eval = job.finish(progress, stopped, on_done)
    finally:  # a finished or failed run never leaves a checkpoint half-written
        job.close()
    return job.summarise(progress, initial_eval, final_eval, stopped)
