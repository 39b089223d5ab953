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
    idx = np.maximum(plan.layer_of_slot, 0)
    active = plan.active

    def one(x):
        x = jnp.take(jnp.asarray(x), idx, axis=0)
        return jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

    return jax.tree_util.tree_map(one, layers)


def from_slots(slots, plan: PipelinePlan):
    """Slot layout [S*K, ...] -> stacked layers [L, ...]."""
    if plan.stages == 1:
        return slots
    idx = np.flatnonzero(plan.active)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), slots)


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


def split_microbatches(x, m: int):
    """[B, ...] -> [M, B/M, ...], microbatch i = rows i, M + i, 2M + i, ...: each data shard's
    contiguous rows stay on that shard."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)


def merge_microbatches(x):
    m, mb = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((m * mb,) + x.shape[2:])


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

    def layer(p, x, mask, tables, rng, pre):
        rngs = {"dropout": rng} if rng is not None else None
        return block.apply({"params": p}, x, mask, tables, None, None, pre, rngs=rngs)[0]

    if config.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES.get(config.remat_policy), prevent_cse=False)

    def stage(params, active, x, fields, rng, pre):
        mask, tables = attention_inputs(fields, config)

        def slot(x, inp):
            p, on, j, pr = inp
            r = None if rng is None else jax.random.fold_in(rng, j)
            return jnp.where(on, layer(p, x, mask, tables, r, pr), x), None

        return jax.lax.scan(slot, x, (params, active, jnp.arange(plan.slots), pre))[0]

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


def _microbatch_fields(batch, m: int, with_loss: bool):
    names = BATCH_FIELDS + (LOSS_FIELDS if with_loss else ("tokens",))
    zeros = jnp.zeros_like(batch["position_ids"])
    return {f: split_microbatches(batch.get(f, zeros), m) for f in names}


def _stage_prefix(config: GLMConfig, plan: PipelinePlan, params, rng):
    """P-tuning keys/values in slot layout by stage [S, K, P, 2, K, D], or None."""
    if not config.pre_seq_len:
        return None
    rngs = {"dropout": rng} if rng is not None else None
    return _by_stage(to_slots(GLM(config).apply({"params": params}, method=GLM.prefix, rngs=rngs), plan), plan)


def _split_layers(params):
    return params.get("layers"), {k: v for k, v in params.items() if k != "layers"}


def _gpipe(
    params,
    batch,
    config: GLMConfig,
    plan: PipelinePlan,
    m: int,
    alpha,
    dropout_rng,
    bubble_value: float,
    with_loss: bool,
):
    n_st = plan.stages
    fields = _microbatch_fields(batch, m, with_loss)
    layers, rest = _split_layers(params)
    rest_s, layers_s = _per_stage(rest, n_st), _by_stage(layers, plan)
    active = jnp.asarray(plan.active.reshape(n_st, plan.slots))
    embed_key = layers_key = None
    if dropout_rng is not None:
        embed_key, layers_key = jax.random.split(dropout_rng)
    prefix = _stage_prefix(config, plan, params, embed_key)
    stage = stage_function(config, plan)
    head_loss = jax.checkpoint(lambda p, h, f: _head_loss(config, p, h, f), prevent_cse=False)
    stages = jnp.arange(n_st)
    mb_shape = fields["tokens"].shape[1:]

    def run_stage(rest_p, layer_p, active, x, mb, valid, s, key, pre):
        ek = lk = None
        if key is not None:
            ek, lk = jax.random.split(key)
        x = jnp.where(s == 0, _embed(config, rest_p, mb, alpha, ek), x)
        x = jnp.where(valid, x, jnp.zeros_like(x))
        y = stage(layer_p, active, x, mb, lk, pre)
        if not with_loss:
            return y, jnp.float32(0), jnp.float32(0)
        loss_sum, n = head_loss(rest_p, y, mb)
        on = valid & (s == n_st - 1)
        return y, jnp.where(on, loss_sum, 0.0), jnp.where(on, n, 0.0)

    act_spec = P("stage", "data", None, None)

    def tick(carry, t):
        state, outputs, loss_sum, count = carry
        micro = t - stages  # the microbatch each stage works on
        valid = (micro >= 0) & (micro < m)
        take = jnp.clip(micro, 0, m - 1)
        mb = {f: v[take] for f, v in fields.items()}
        keys = (
            None
            if layers_key is None
            else jax.vmap(lambda s, mi: jax.random.fold_in(jax.random.fold_in(layers_key, mi), s))(stages, take)
        )
        state = jax.lax.with_sharding_constraint(state, act_spec)
        out, ls, n = jax.vmap(run_stage, spmd_axis_name="stage")(
            rest_s, layers_s, active, state, mb, valid, stages, keys, prefix
        )
        if not with_loss:
            done = t - (n_st - 1)
            last = jnp.where(done >= 0, out[n_st - 1], outputs[jnp.clip(done, 0, m - 1)])
            outputs = jax.lax.dynamic_update_index_in_dim(outputs, last, jnp.clip(done, 0, m - 1), 0)
        state = jnp.roll(out, 1, axis=0)  # stage s's output becomes stage s+1's input
        return (state, outputs, loss_sum + ls, count + n), None

    e = config.hidden_size
    state = jnp.full((n_st,) + mb_shape + (e,), bubble_value, config.compute_dtype)
    outputs = jnp.zeros((m,) + mb_shape + (e,), config.compute_dtype) if not with_loss else jnp.zeros(())
    zeros = jnp.zeros((n_st,), jnp.float32)
    (_, outputs, loss_sum, count), _ = jax.lax.scan(tick, (state, outputs, zeros, zeros), jnp.arange(m + n_st - 1))
    return (loss_sum.sum(), count.sum()) if with_loss else merge_microbatches(outputs)


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
    n_st, k = plan.stages, plan.slots
    ring = 2 * n_st - 1
    fields = _microbatch_fields(batch, max_microbatches, True)
    m = jnp.asarray(microbatches, jnp.int32)
    used = jnp.arange(max_microbatches) < m
    n_total = jnp.sum(fields["loss_mask"].astype(jnp.float32) * used[:, None, None])
    cotangent = jnp.asarray(scale, jnp.float32) / jnp.maximum(n_total, 1.0)
    t_layers, t_rest = _split_layers(trainable)
    f_layers, f_rest = _split_layers(frozen)
    view = lambda layers, rest: {
        **_per_stage(rest, n_st),
        **({} if layers is None else {"layers": _by_stage(layers, plan)}),
    }
    t_view, f_view = view(t_layers, t_rest), view(f_layers, f_rest)
    embed_key = layers_key = None
    if dropout_rng is not None:
        embed_key, layers_key = jax.random.split(dropout_rng)
    stage = stage_function(config, plan)
    active = jnp.asarray(plan.active.reshape(n_st, k))
    stages = jnp.arange(n_st)

    def run(tv, fv, x, mb, s, act, micro, with_head):
        """One stage on one microbatch: (output [mb, S, E], loss sum of the head, or 0)."""
        p = combine(tv, fv)
        ek = lk = None
        if layers_key is not None:
            ek = jax.random.fold_in(embed_key, micro)
            lk = jax.random.fold_in(jax.random.fold_in(layers_key, micro), s)
        x = jnp.where(s == 0, _embed(config, p, mb, embedding_alpha, ek), x)
        pre = None
        if config.pre_seq_len:
            pre = jax.tree_util.tree_map(lambda a: a[s], _stage_prefix(config, plan, p, embed_key))
        y = stage(p["layers"], act, x, mb, lk, pre)
        if not with_head:
            return y, jnp.float32(0)
        return y, _head_loss(config, p, y, mb)[0]

    def stage_tick(tv, fv, act, s, fwd_in, bwd_in, buf, t):
        f, b = t - s, t - 2 * (n_st - 1) + s
        f_ok, b_ok = (f >= 0) & (f < m), (b >= 0) & (b < m)
        fi, bi = jnp.clip(f, 0, max_microbatches - 1), jnp.clip(b, 0, max_microbatches - 1)
        mb_f = {name: v[fi] for name, v in fields.items()}
        mb_b = {name: v[bi] for name, v in fields.items()}
        fwd_in = jnp.where(f_ok, fwd_in, jnp.zeros_like(fwd_in))
        y_f, _ = run(tv, fv, fwd_in, mb_f, s, act, fi, False)
        slot = f % ring
        kept = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(f_ok, fwd_in, kept), slot, 0)
        x_b = jax.lax.dynamic_index_in_dim(buf, b % ring, 0, keepdims=False)
        x_b = jnp.where(b_ok, x_b, jnp.zeros_like(x_b))
        last = s == n_st - 1
        (_, loss_b), pullback = jax.vjp(lambda p, x: run(p, fv, x, mb_b, s, act, bi, True), tv, x_b)
        g_y = jnp.where(b_ok & ~last, bwd_in, jnp.zeros_like(bwd_in))
        d_tv, d_x = pullback((g_y, jnp.where(b_ok & last, cotangent, 0.0)))
        return y_f, d_x, buf, d_tv, jnp.where(b_ok & last, loss_b, 0.0)

    act_spec = P("stage", "data", None, None)
    ticks = jax.vmap(stage_tick, in_axes=(0, 0, 0, 0, 0, 0, 0, None), spmd_axis_name="stage")

    def body(t, carry):
        fwd_in, bwd_in, buf, grads, losses = carry
        fwd_in = jax.lax.with_sharding_constraint(fwd_in, act_spec)
        bwd_in = jax.lax.with_sharding_constraint(bwd_in, act_spec)
        y, d_x, buf, d_tv, loss = ticks(t_view, f_view, active, stages, fwd_in, bwd_in, buf, t)
        grads = jax.tree_util.tree_map(jnp.add, grads, d_tv)
        # forward activations move one stage on, cotangents one stage back
        return jnp.roll(y, 1, axis=0), jnp.roll(d_x, -1, axis=0), buf, grads, losses + loss

    mb_shape = fields["tokens"].shape[1:] + (config.hidden_size,)
    act = jnp.full((n_st,) + mb_shape, bubble_value, config.compute_dtype)
    buf = jax.lax.with_sharding_constraint(
        jnp.full((n_st, ring) + mb_shape, bubble_value, config.compute_dtype), P("stage", None, "data", None, None)
    )
    grads = jax.tree_util.tree_map(jnp.zeros_like, t_view)
    carry = (act, act, buf, grads, jnp.zeros((n_st,), jnp.float32))
    _, _, _, grads, losses = jax.lax.fori_loop(0, m + 2 * (n_st - 1), body, carry)
    out = {key: jax.tree_util.tree_map(lambda g: g.sum(0), v) for key, v in grads.items() if key != "layers"}
    if "layers" in grads:
        out["layers"] = jax.tree_util.tree_map(lambda g: g.reshape((n_st * k,) + g.shape[2:]), grads["layers"])
    return out, losses.sum(), n_total


def pad_microbatches(rows: dict, microbatches: int, max_microbatches: int) -> dict:
    """A step's rows, microbatch after microbatch (numpy [m * g, ...]), -> the [max_microbatches * g, ...]
    layout in which `split_microbatches(x, max_microbatches)[i]` is microbatch i, those past m zero.
    Per process: its own rows of each microbatch, as its data shards hold them."""
    out = {}
    for key, v in rows.items():
        g = v.shape[0] // microbatches
        full = np.zeros((g, max_microbatches) + v.shape[1:], v.dtype)
        full[:, :microbatches] = np.swapaxes(v.reshape((microbatches, g) + v.shape[1:]), 0, 1)
        out[key] = full.reshape((g * max_microbatches,) + v.shape[1:])
    return out
