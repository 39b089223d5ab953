"""Pipeline parallelism: the plan (layers in slots, stages, microbatches, bubble) and the schedules.

The plan: `PipelinePlan` puts the stacked layers into `stages` x `slots` slots over the mesh's
`stage` axis (padding slots are identities); `to_slots` / `from_slots` convert layer stacks;
`microbatch_count` and `pad_microbatches` decide and lay out a step's microbatches.

The schedules run on that slot layout.

Every schedule runs in lockstep ticks: at each tick every stage runs its K slots on one
microbatch, vmapped over stages with the stage axis sharded (`spmd_axis_name`), then activations
move one stage on. The first stage embeds its microbatch and the last computes the head and the
loss of the microbatch leaving it, so no pass-wide logits (and no [M, mb, S, V] buffer) exist.

- GPipe (`gpipe_loss`, `pipeline_blocks`): all forwards over M + S - 1 ticks in a `lax.scan`,
  differentiated by autodiff (all backwards after). Activation memory grows with M.
- 1F1B (`one_f_one_b`): one forward and one backward per stage per tick, the backward of a
  microbatch recomputing its stage from the stored stage input (`jax.vjp` per tick). A stage
  holds at most 2S - 1 stage inputs whatever M is, so all microbatches of a step (a ramped batch
  included) flow through one schedule, and the tick loop is a `fori_loop` whose trip count
  M + 2S - 2 is a traced number: one compiled step serves every batch size of a ramp-up.

Bubble (idle share of the lockstep ticks): GPipe (S - 1) / (M + S - 1); 1F1B (2S - 2) / (M + 2S - 2),
paid once per step rather than once per pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glm_jax.config import GLMConfig
from glm_jax.layers import GLMBlock
from glm_jax.losses import token_loss_sum
from glm_jax.model import GLM, REMAT_POLICIES, attention_inputs
from glm_jax.sharding import axis_size

BATCH_FIELDS = ("position_ids", "block_position_ids", "segment_ids", "prefix_mask")
LOSS_FIELDS = ("tokens", "targets", "loss_mask")
SCHEDULES = ("gpipe", "1f1b")


# ---- the plan: slots, stages, microbatches ---------------------------------------------------------
def default_microbatches(global_batch: int, data: int) -> int:
    """One sequence per data replica per microbatch (GLM-130B's micro-batch 1)."""
    return max(1, global_batch // max(data, 1))


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """Layers in slots: `stages` x `slots` slots, padding slots being identities.

    With L layers on S stages each stage has K = ceil(L / S) slots; the S*K - L padding slots go
    to the first and last stages first (they also hold the embedding and the head), then inwards:
    GLM-130B's 70 layers on 8 stages are 8, 9, 9, 9, 9, 9, 9, 8.
    """

    num_layers: int
    stages: int

    @property
    def slots(self) -> int:
        return -(-self.num_layers // self.stages)

    @property
    def layers_per_stage(self) -> list[int]:
        pads = [0] * self.stages
        order = [i for pair in zip(range(self.stages), reversed(range(self.stages))) for i in pair]
        order = list(dict.fromkeys(order))  # 0, S-1, 1, S-2, ...
        for j in range(self.stages * self.slots - self.num_layers):
            pads[order[j % self.stages]] += 1
        return [self.slots - p for p in pads]

    @property
    def layer_of_slot(self) -> np.ndarray:
        """[stages * slots] layer index held by each slot, -1 for padding."""
        out, layer = [], 0
        for n in self.layers_per_stage:
            out += list(range(layer, layer + n)) + [-1] * (self.slots - n)
            layer += n
        return np.array(out)

    @property
    def active(self) -> np.ndarray:
        return self.layer_of_slot >= 0


def to_slots(layers, plan: PipelinePlan):
    """Stacked layer params [L, ...] -> slot layout [S*K, ...] (padding slots zero). One stage:
    the same arrays (also for a slice of the layers, as freeze trains)."""
    if plan.stages == 1:
        return layers
    source = np.maximum(plan.layer_of_slot, 0)  # the layer each slot copies (padding: layer 0, zeroed)
    active = plan.active

    def one(x):
        x = jnp.take(jnp.asarray(x), source, axis=0)
        return jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

    return jax.tree_util.tree_map(one, layers)


def from_slots(slots, plan: PipelinePlan):
    """Slot layout [S*K, ...] -> stacked layers [L, ...]."""
    if plan.stages == 1:
        return slots
    layer_slots = np.flatnonzero(plan.active)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, layer_slots, axis=0), slots)


def params_to_slots(params: dict, plan: PipelinePlan) -> dict:
    """The tree with its `layers` (if it has them: an adapter may not) in slot layout."""
    return {**params, "layers": to_slots(params["layers"], plan)} if "layers" in params else params


def params_from_slots(params: dict, plan: PipelinePlan) -> dict:
    return {**params, "layers": from_slots(params["layers"], plan)} if "layers" in params else params


def describe(mesh: jax.sharding.Mesh, plan: PipelinePlan, microbatches: int, schedule: str = "gpipe") -> str:
    head = (
        f"mesh data={axis_size(mesh, 'data')} x stage={axis_size(mesh, 'stage')} x tensor={axis_size(mesh, 'tensor')}"
    )
    if plan.stages == 1:
        return head + "; no pipeline"
    return (
        head + f"; layers per stage {plan.layers_per_stage} ({plan.slots} slots); {schedule}, {microbatches} "
        f"microbatches a step, bubble {bubble_fraction(schedule, plan.stages, microbatches):.1%}"
    )


def microbatch_count(requested: int | None, global_batch: int, mesh: jax.sharding.Mesh) -> int:
    return requested or default_microbatches(global_batch, axis_size(mesh, "data"))


def bubble_fraction(schedule: str, stages: int, microbatches: int) -> float:
    """Idle share of a step's lockstep ticks (module docstring)."""
    if stages == 1:
        return 0.0
    fill = stages - 1 if schedule == "gpipe" else 2 * (stages - 1)
    return fill / (microbatches + fill)


# ---- the schedules ------------------------------------------------------------------------------------


def split_microbatches(x, microbatches: int):
    """[B, ...] -> [M, B/M, ...], microbatch i = rows i, M + i, 2M + i, ...: each data shard's
    contiguous rows stay on that shard."""
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape((rows // microbatches, microbatches) + x.shape[1:]), 0, 1)


def merge_microbatches(x):
    """[M, B/M, ...] -> [B, ...], undoing `split_microbatches`."""
    microbatches, rows = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((microbatches * rows,) + x.shape[2:])


def _head_loss(config: GLMConfig, params, h, fields):
    """Final norm, head and loss of one microbatch: h [mb, S, E] -> (loss sum, tokens). Under
    `jax.checkpoint`, so a scan keeps h, never the microbatch's logits."""
    logits = GLM(config).apply({"params": params}, h, method=GLM.head)
    return token_loss_sum(logits, fields)


def _embed(config: GLMConfig, params, fields, alpha, rng):
    rngs = {"dropout": rng} if rng is not None else None
    return GLM(config).apply({"params": params}, fields, alpha, method=GLM.embed, rngs=rngs)


def stage_function(config: GLMConfig, plan: PipelinePlan):
    """stage(layer_params [K, ...], active [K], x [mb, S, E], fields, rng, prefix [K, ...]) -> [mb, S, E]:
    one stage's slots in a scan, padding slots passing x through."""
    block = GLMBlock(config)

    def layer(params, x, mask, tables, rng, prefix):
        rngs = {"dropout": rng} if rng is not None else None
        return block.apply({"params": params}, x, mask, tables, None, None, prefix, rngs=rngs)[0]

    if config.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES.get(config.remat_policy), prevent_cse=False)

    def stage(params, active, x, fields, rng, prefix):
        mask, tables = attention_inputs(fields, config)

        def slot(x, inputs):
            layer_params, slot_active, index, slot_prefix = inputs
            slot_rng = None if rng is None else jax.random.fold_in(rng, index)
            return jnp.where(slot_active, layer(layer_params, x, mask, tables, slot_rng, slot_prefix), x), None

        return jax.lax.scan(slot, x, (params, active, jnp.arange(plan.slots), prefix))[0]

    return stage


def _by_stage(tree, plan: PipelinePlan):
    """Slot layout [S*K, ...] -> [S, K, ...]."""
    return jax.tree_util.tree_map(lambda x: x.reshape((plan.stages, plan.slots) + x.shape[1:]), tree)


def _per_stage(tree, stages: int):
    """Broadcast leaves over a leading stage axis, sharded over `stage`: every stage uses its own
    copy (the one it already holds), so gradients accumulate per stage inside a loop and are
    summed over stages once, after it (not an all-reduce per tick)."""

    def one(x):
        x = jnp.broadcast_to(x, (stages,) + x.shape)
        return jax.lax.with_sharding_constraint(x, P("stage", *([P.UNCONSTRAINED] * (x.ndim - 1))))

    return jax.tree_util.tree_map(one, tree)


def _microbatch_fields(batch, microbatches: int, with_loss: bool):
    """The batch's fields a schedule reads, [M, B/M, S] each (a missing field: zeros)."""
    names = BATCH_FIELDS + (LOSS_FIELDS if with_loss else ("tokens",))
    zeros = jnp.zeros_like(batch["position_ids"])
    return {name: split_microbatches(batch.get(name, zeros), microbatches) for name in names}


def _stage_prefix(config: GLMConfig, plan: PipelinePlan, params, rng):
    """P-tuning keys/values in slot layout by stage [S, K, P, 2, K, D], or None."""
    if not config.pre_seq_len:
        return None
    rngs = {"dropout": rng} if rng is not None else None
    return _by_stage(to_slots(GLM(config).apply({"params": params}, method=GLM.prefix, rngs=rngs), plan), plan)


def _split_layers(params):
    return params.get("layers"), {k: v for k, v in params.items() if k != "layers"}


def _dropout_keys(dropout_rng):
    """The step's dropout key -> (embedding key, layers key); (None, None) without dropout."""
    if dropout_rng is None:
        return None, None
    embed_key, layers_key = jax.random.split(dropout_rng)
    return embed_key, layers_key


def _take_microbatch(fields, index) -> dict:
    """Microbatch `index` of fields split by `_microbatch_fields`."""
    return {name: values[index] for name, values in fields.items()}


def _gpipe(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    microbatches: int,
    alpha,
    dropout_rng,
    bubble_value: float,
    with_loss: bool,
):
    """GPipe's M + S - 1 ticks in a scan: (loss sum, tokens) with `with_loss`, else the hidden
    states [B, S, E] leaving the last stage."""
    stages = plan.stages
    fields = _microbatch_fields(batch, microbatches, with_loss)
    layers, rest = _split_layers(params)
    rest_by_stage, layers_by_stage = _per_stage(rest, stages), _by_stage(layers, plan)
    active = jnp.asarray(plan.active.reshape(stages, plan.slots))
    embed_key, layers_key = _dropout_keys(dropout_rng)
    prefix = _stage_prefix(config, plan, params, embed_key)
    run_stage = _gpipe_stage(config, plan, alpha, with_loss)
    stage_ids = jnp.arange(stages)
    activation_spec = P("stage", "data", None, None)

    def tick(carry, t):
        inputs, outputs, loss_sum, count = carry
        micro = t - stage_ids  # the microbatch each stage works on
        valid = (micro >= 0) & (micro < microbatches)
        index = jnp.clip(micro, 0, microbatches - 1)
        microbatch = _take_microbatch(fields, index)
        keys = None if layers_key is None else jax.vmap(_layer_key, in_axes=(None, 0, 0))(layers_key, index, stage_ids)
        inputs = jax.lax.with_sharding_constraint(inputs, activation_spec)
        stage_outputs, losses, tokens = jax.vmap(run_stage, spmd_axis_name="stage")(
            rest_by_stage, layers_by_stage, active, inputs, microbatch, valid, stage_ids, keys, prefix
        )
        if not with_loss:
            outputs = _keep_last_stage_output(outputs, stage_outputs, t, stages, microbatches)
        inputs = jnp.roll(stage_outputs, 1, axis=0)  # stage s's output becomes stage s+1's input
        return (inputs, outputs, loss_sum + losses, count + tokens), None

    activation_shape = fields["tokens"].shape[1:] + (config.hidden_size,)
    inputs = jnp.full((stages,) + activation_shape, bubble_value, config.compute_dtype)
    outputs = jnp.zeros((microbatches,) + activation_shape, config.compute_dtype) if not with_loss else jnp.zeros(())
    zeros = jnp.zeros((stages,), jnp.float32)
    ticks = jnp.arange(microbatches + stages - 1)
    (_, outputs, loss_sum, count), _ = jax.lax.scan(tick, (inputs, outputs, zeros, zeros), ticks)
    return (loss_sum.sum(), count.sum()) if with_loss else merge_microbatches(outputs)


def _layer_key(layers_key, micro, stage):
    """The dropout key of one stage's layers on one microbatch."""
    return jax.random.fold_in(jax.random.fold_in(layers_key, micro), stage)


def _gpipe_stage(config: GLMConfig, plan: PipelinePlan, alpha, with_loss: bool):
    """run(rest, layers, active, x, microbatch, valid, stage, key, prefix) -> (output, loss sum,
    tokens): one GPipe stage on one microbatch (vmapped over stages): the first stage embeds, the
    last computes the head and loss of a valid microbatch (0 elsewhere)."""
    stage_fn = stage_function(config, plan)
    head_loss = jax.checkpoint(
        lambda params, hidden, fields: _head_loss(config, params, hidden, fields), prevent_cse=False
    )
    last = plan.stages - 1

    def run(rest, layers, active, x, microbatch, valid, stage, key, prefix):
        embed_key, layer_key = _dropout_keys(key)
        x = jnp.where(stage == 0, _embed(config, rest, microbatch, alpha, embed_key), x)
        x = jnp.where(valid, x, jnp.zeros_like(x))
        y = stage_fn(layers, active, x, microbatch, layer_key, prefix)
        if not with_loss:
            return y, jnp.float32(0), jnp.float32(0)
        loss_sum, tokens = head_loss(rest, y, microbatch)
        on = valid & (stage == last)
        return y, jnp.where(on, loss_sum, 0.0), jnp.where(on, tokens, 0.0)

    return run


def _keep_last_stage_output(outputs, stage_outputs, t, stages: int, microbatches: int):
    """outputs [M, ...] with the last stage's output at tick t stored as microbatch t - (S - 1),
    once there is one."""
    done = t - (stages - 1)
    index = jnp.clip(done, 0, microbatches - 1)
    last = jnp.where(done >= 0, stage_outputs[stages - 1], outputs[index])
    return jax.lax.dynamic_update_index_in_dim(outputs, last, index, 0)


def pipeline_blocks(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    microbatches: int,
    *,
    embedding_alpha=None,
    dropout_rng=None,
    bubble_value: float = 0.0,
):
    """Embedding and blocks as a GPipe schedule: the final hidden states [B, S, E] (before the
    final norm). Bubble ticks compute on zeros (`bubble_value` fills the idle buffer, NaN in
    tests) and their results are never read."""
    return _gpipe(params, batch, config, plan, microbatches, embedding_alpha, dropout_rng, bubble_value, False)


def gpipe_loss(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    microbatches: int,
    *,
    embedding_alpha=None,
    dropout_rng=None,
    bubble_value: float = 0.0,
):
    """(summed token loss, loss tokens) of a batch through a GPipe schedule, the head and loss
    of each microbatch on the last stage as it leaves the pipeline."""
    return _gpipe(params, batch, config, plan, microbatches, embedding_alpha, dropout_rng, bubble_value, True)


def forward(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    microbatches: int = 1,
    *,
    embedding_alpha=None,
    dropout_rng=None,
    bubble_value: float = 0.0,
):
    """Logits [B, S, vocab] on whatever mesh the caller's jit places things on (evaluation and
    tests: training uses the loss functions, which never hold a pass's logits).

    params: the model tree with `layers` in `plan`'s slot layout (identical to the plain stacked
    layout when plan.stages == 1, which runs the plain model).
    """
    model = GLM(config)
    if plan.stages == 1:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return model.apply({"params": params}, batch, embedding_alpha=embedding_alpha, rngs=rngs)
    h = pipeline_blocks(
        params,
        batch,
        config,
        plan,
        microbatches,
        embedding_alpha=embedding_alpha,
        dropout_rng=dropout_rng,
        bubble_value=bubble_value,
    )
    return model.apply({"params": params}, h, method=GLM.head)


def loss_sum(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    microbatches: int = 1,
    *,
    embedding_alpha=None,
    dropout_rng=None,
):
    """(summed token loss, loss tokens): the plain model on one stage, GPipe on several."""
    if plan.stages > 1:
        return gpipe_loss(
            params, batch, config, plan, microbatches, embedding_alpha=embedding_alpha, dropout_rng=dropout_rng
        )
    return token_loss_sum(
        forward(params, batch, config, plan, embedding_alpha=embedding_alpha, dropout_rng=dropout_rng), batch
    )


def one_f_one_b(
    trainable,
    frozen,
    combine,
    batch,
    microbatches,
    config: GLMConfig,
    plan: PipelinePlan,
    max_microbatches: int,
    *,
    embedding_alpha=None,
    dropout_rng=None,
    scale=1.0,
    bubble_value: float = 0.0,
):
    """Gradients of scale x mean token loss w.r.t. `trainable` through a 1F1B schedule, with
    (summed loss, loss tokens); the same quantities as `jax.grad` of GPipe's mean loss.

    batch: [B, S] arrays, B = max_microbatches x microbatch size; only the first `microbatches`
    (a traced int32, at most max_microbatches) microbatches of `split_microbatches(x,
    max_microbatches)` are used. combine(trainable, frozen) -> the model's parameters (peft.combine).

    Stage s does the forward of microbatch t - s and the backward of microbatch t - 2(S-1) + s at
    tick t: the last stage runs the head, the loss and their backward right after its forward,
    and a cotangent reaches stage s one tick after stage s + 1 made it. Stage inputs wait in a
    ring of 2S - 1 slots per stage until their backward. Idle halves of a tick compute on zeros
    (`bubble_value` fills the buffers, NaN in tests) and reach neither gradients nor the loss.
    """
    stages = plan.stages
    fields = _microbatch_fields(batch, max_microbatches, True)
    used = jnp.asarray(microbatches, jnp.int32)
    is_used = jnp.arange(max_microbatches) < used
    total_tokens = jnp.sum(fields["loss_mask"].astype(jnp.float32) * is_used[:, None, None])
    cotangent = jnp.asarray(scale, jnp.float32) / jnp.maximum(total_tokens, 1.0)
    trainable_view, frozen_view = _stage_view(trainable, plan), _stage_view(frozen, plan)
    run = _one_f_one_b_stage(config, plan, combine, embedding_alpha, dropout_rng)
    stage_tick = _one_f_one_b_tick(run, fields, used, max_microbatches, cotangent, stages)
    ticks = jax.vmap(stage_tick, in_axes=(0, 0, 0, 0, 0, 0, 0, None), spmd_axis_name="stage")
    active = jnp.asarray(plan.active.reshape(stages, plan.slots))
    stage_ids = jnp.arange(stages)
    activation_spec = P("stage", "data", None, None)

    def body(t, carry):
        forward_in, backward_in, buffer, grads, losses = carry
        forward_in = jax.lax.with_sharding_constraint(forward_in, activation_spec)
        backward_in = jax.lax.with_sharding_constraint(backward_in, activation_spec)
        y, d_x, buffer, d_trainable, loss = ticks(
            trainable_view, frozen_view, active, stage_ids, forward_in, backward_in, buffer, t
        )
        grads = jax.tree_util.tree_map(jnp.add, grads, d_trainable)
        # forward activations move one stage on, cotangents one stage back
        return jnp.roll(y, 1, axis=0), jnp.roll(d_x, -1, axis=0), buffer, grads, losses + loss

    activation_shape = fields["tokens"].shape[1:] + (config.hidden_size,)
    activations = jnp.full((stages,) + activation_shape, bubble_value, config.compute_dtype)
    buffer = jax.lax.with_sharding_constraint(
        jnp.full((stages, 2 * stages - 1) + activation_shape, bubble_value, config.compute_dtype),
        P("stage", None, "data", None, None),
    )
    grads = jax.tree_util.tree_map(jnp.zeros_like, trainable_view)
    carry = (activations, activations, buffer, grads, jnp.zeros((stages,), jnp.float32))
    _, _, _, grads, losses = jax.lax.fori_loop(0, used + 2 * (stages - 1), body, carry)
    return _unstage_gradients(grads, plan), losses.sum(), total_tokens


def _stage_view(params, plan: PipelinePlan) -> dict:
    """A parameter tree as the vmapped stages take it: layers [S, K, ...] by stage, the other
    leaves broadcast over stages (`_per_stage`)."""
    layers, rest = _split_layers(params)
    return {**_per_stage(rest, plan.stages), **({} if layers is None else {"layers": _by_stage(layers, plan)})}


def _unstage_gradients(grads, plan: PipelinePlan) -> dict:
    """Per-stage gradients of a `_stage_view` -> the tree's: the other leaves summed over stages,
    the layers back in slot layout [S*K, ...]."""
    out = {key: jax.tree_util.tree_map(lambda g: g.sum(0), tree) for key, tree in grads.items() if key != "layers"}
    if "layers" in grads:
        out["layers"] = jax.tree_util.tree_map(
            lambda g: g.reshape((plan.stages * plan.slots,) + g.shape[2:]), grads["layers"]
        )
    return out


def _one_f_one_b_stage(config: GLMConfig, plan: PipelinePlan, combine, embedding_alpha, dropout_rng):
    """run(trainable_view, frozen_view, x, microbatch, stage, active, micro, with_head) -> (output
    [mb, S, E], the head's loss sum or 0): one stage on one microbatch, its dropout keys folded
    from the step's by microbatch (and stage)."""
    stage_fn = stage_function(config, plan)
    embed_key, layers_key = _dropout_keys(dropout_rng)

    def run(trainable_view, frozen_view, x, microbatch, stage, active, micro, with_head):
        params = combine(trainable_view, frozen_view)
        microbatch_embed_key = layer_key = None
        if layers_key is not None:
            microbatch_embed_key = jax.random.fold_in(embed_key, micro)
            layer_key = _layer_key(layers_key, micro, stage)
        x = jnp.where(stage == 0, _embed(config, params, microbatch, embedding_alpha, microbatch_embed_key), x)
        prefix = None
        if config.pre_seq_len:
            prefix = jax.tree_util.tree_map(lambda a: a[stage], _stage_prefix(config, plan, params, embed_key))
        y = stage_fn(params["layers"], active, x, microbatch, layer_key, prefix)
        if not with_head:
            return y, jnp.float32(0)
        return y, _head_loss(config, params, y, microbatch)[0]

    return run


def _one_f_one_b_tick(run, fields, used, max_microbatches: int, cotangent, stages: int):
    """stage_tick(trainable_view, frozen_view, active, stage, forward_in, backward_in, buffer, t) ->
    (forward output, input cotangent, buffer, parameter cotangents, loss): one stage's tick (vmapped
    over stages): the forward of microbatch t - s, its input kept in the ring, and the backward of
    microbatch t - 2(S-1) + s, recomputed from its kept input."""
    ring = 2 * stages - 1

    def stage_tick(trainable_view, frozen_view, active, stage, forward_in, backward_in, buffer, t):
        forward, backward = t - stage, t - 2 * (stages - 1) + stage
        forward_ok, backward_ok = (forward >= 0) & (forward < used), (backward >= 0) & (backward < used)
        forward_index = jnp.clip(forward, 0, max_microbatches - 1)
        backward_index = jnp.clip(backward, 0, max_microbatches - 1)
        forward_microbatch = _take_microbatch(fields, forward_index)
        backward_microbatch = _take_microbatch(fields, backward_index)
        forward_in = jnp.where(forward_ok, forward_in, jnp.zeros_like(forward_in))
        y, _ = run(trainable_view, frozen_view, forward_in, forward_microbatch, stage, active, forward_index, False)
        buffer = _ring_store(buffer, forward_in, forward % ring, forward_ok)
        x = jax.lax.dynamic_index_in_dim(buffer, backward % ring, 0, keepdims=False)
        x = jnp.where(backward_ok, x, jnp.zeros_like(x))
        last = stage == stages - 1

        def recompute(trainable_view, x):
            return run(trainable_view, frozen_view, x, backward_microbatch, stage, active, backward_index, True)

        (_, loss), pullback = jax.vjp(recompute, trainable_view, x)
        d_y = jnp.where(backward_ok & ~last, backward_in, jnp.zeros_like(backward_in))
        d_trainable, d_x = pullback((d_y, jnp.where(backward_ok & last, cotangent, 0.0)))
        return y, d_x, buffer, d_trainable, jnp.where(backward_ok & last, loss, 0.0)

    return stage_tick


def _ring_store(buffer, x, slot, ok):
    """buffer [ring, ...] with x in `slot` where ok (else that slot unchanged)."""
    kept = jax.lax.dynamic_index_in_dim(buffer, slot, 0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(ok, x, kept), slot, 0)


def pad_microbatches(rows: dict, microbatches: int, max_microbatches: int) -> dict:
    """A step's rows, microbatch after microbatch (numpy [microbatches * rows, ...]), -> the
    [max_microbatches * rows, ...] layout in which `split_microbatches(x, max_microbatches)[i]` is
    microbatch i, those past `microbatches` zero. Per process: its own rows of each microbatch, as
    its data shards hold them."""
    out = {}
    for key, values in rows.items():
        per_microbatch = values.shape[0] // microbatches
        full = np.zeros((per_microbatch, max_microbatches) + values.shape[1:], values.dtype)
        full[:, :microbatches] = np.swapaxes(values.reshape((microbatches, per_microbatch) + values.shape[1:]), 0, 1)
        out[key] = full.reshape((per_microbatch * max_microbatches,) + values.shape[1:])
    return out
