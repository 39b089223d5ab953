"""Pipeline parallelism: the plan (layers in slots, stages, microbatches, bubble) and the schedules.

The plan: `PipelinePlan` puts the stacked layers into `stages` x `slots` slots over the mesh's
`stage` axis (padding slots are identities); `to_slots` / `from_slots` convert layer stacks;
`microbatch_count` and `pad_microbatches` decide and lay out a step's microbatches.

The schedules run on that slot layout.

Every schedule runs in lockstep ticks as one program per stage and data shard (`StageLayout`:
`jax.shard_map` manual over `stage` and `data`, `tensor` left to the partitioner): at each tick a
stage runs its K slots on one microbatch, then `ppermute` moves activations one stage on. Each
part of a stage's work is under `lax.cond`: the first stage embeds its microbatch, the last
computes the head and the loss of the microbatch leaving it (no pass-wide logits, no [M, mb, S, V]
buffer), and nothing runs on a bubble tick. FSDP weights are gathered once a step before the
programs, or on every tick inside them (`gather_once`).

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
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec as P

from glm_jax.config import GLMConfig
from glm_jax.layers import GLMBlock
from glm_jax.losses import token_loss_sum
from glm_jax.model import GLM, REMAT_POLICIES, abstract_params, attention_inputs
from glm_jax.prompts import check_pipeline
from glm_jax.sharding import AXES, CONTEXT, axis_size, has_context, zero1_spec

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
    if has_context(mesh):
        head += f" x context={axis_size(mesh, CONTEXT)}"
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


class TokenLoss:
    """The language-modelling objective every schedule runs by default: cross-entropy over the
    loss tokens. Another objective (`pair_objectives.PairObjective`) provides the same three
    members: the batch fields it reads besides the model's, its loss from the hidden states, and
    the units its summed loss is divided by."""

    extra_fields: tuple[str, ...] = ()
    needs_reference = False  # a pair objective's DPO / IPO compare with a reference model

    def head_loss(self, config: GLMConfig, params, h, fields):
        """Final norm, head and loss of one microbatch: h [mb, S, E] (before the final norm) ->
        (loss sum, loss tokens)."""
        logits = GLM(config).apply({"params": params}, h, method=GLM.head)
        return token_loss_sum(logits, fields)

    def units(self, fields):
        """What the summed loss of fields [mb, S] is divided by: its loss tokens."""
        return jnp.sum(fields["loss_mask"].astype(jnp.float32))


TOKEN_LOSS = TokenLoss()


def _embed(config: GLMConfig, params, fields, alpha, rng):
    rngs = {"dropout": rng} if rng is not None else None
    return GLM(config).apply({"params": params}, fields, alpha, method=GLM.embed, rngs=rngs)


def stage_function(config: GLMConfig, plan: PipelinePlan, gather=None):
    """stage(layer_params [K, ...], active [K], x [mb, S, E], fields, rng, prefix [K, ...]) -> [mb, S, E]:
    one stage's slots in a scan, padding slots passing x through. gather(one layer's parameters):
    what each slot does to its layer's parameters first (FSDP's per-layer gather, recomputed in
    the backward under remat)."""
    block = GLMBlock(config)

    def layer(params, x, mask, tables, rng, prefix):
        if gather is not None:
            params = gather(params)
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


# ---- one program per stage and data shard: shard_map over `stage` and `data` -----------------------------
MANUAL_AXES = ("stage", "data")


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """How the schedules see the mesh: one program per stage and data shard (shard_map manual over
    `stage` and `data`: a stage computes only its own work, under `lax.cond`; gradients accumulate
    per data shard and are reduced once, after the tick loop); `tensor` is left to the partitioner.

    FSDP weights (the rules shard them over `data`) reach the programs whole, in the compute dtype
    and keeping their `tensor` sharding: gathered once a step, before them (`gather`, by the
    partitioner), or inside them on every tick, each layer in its slot (`gather_inside`,
    `gather_layer`: per `tensor` shard, `_on_tensor_shards`).
    """

    config: GLMConfig
    plan: PipelinePlan
    rules: tuple  # the logical rules outside; inside, the manual axes map to nothing
    gather_once: bool

    @property
    def inner_rules(self) -> tuple:
        return tuple((logical, _keep(physical, lambda n: n not in MANUAL_AXES)) for logical, physical in self.rules)

    def specs(self, tree, keep=MANUAL_AXES) -> dict:
        """Each leaf's PartitionSpec by the rules in force, on the mesh axes in `keep` only (the
        layers' leading slot axis over `stage` when `keep` has it)."""
        logical = _logical_specs(self.config)

        def one(path, leaf):
            names = [getattr(k, "key", None) for k in path]
            spec = _lookup(logical, names)
            axes = tuple(nn.logical_to_mesh_axes(spec, self.rules)) if spec is not None else ()
            axes = [_keep(a, lambda n: n in keep) for a in axes] + [None] * (np.ndim(leaf) - len(axes))
            if "stage" in keep and names and names[0] == "layers":
                axes[0] = "stage"
            return P(*axes)

        return jax.tree_util.tree_map_with_path(one, tree)

    def param_specs(self, tree) -> dict:
        """in_specs of parameters: layers over `stage`, FSDP leaves over `data` unless gathered once."""
        return self.specs(tree, ("stage",) if self.gather_once else MANUAL_AXES)

    def gather(self, tree, cast: bool = True):
        """Once a step, before the programs: FSDP leaves whole, in the rules' other shardings;
        with `cast`, kernels and embeddings in the compute dtype (the layers cast them anyway)."""
        if not self.gather_once:
            return tree
        dtype = self.config.compute_dtype if cast else None
        return jax.tree_util.tree_map_with_path(
            lambda path, x, spec, placed: _whole(
                path, x, spec, dtype, lambda y: jax.lax.with_sharding_constraint(y, placed)
            ),
            tree,
            self.specs(tree),
            self.specs(tree, tuple(a for a in AXES if a != "data")),
        )

    def gather_inside(self, tree):
        """On every tick, inside a program, the leaves outside the layers (each layer's are
        gathered by its slot, `gather_layer`)."""
        if self.gather_once:
            return tree
        return {**tree, **self._gathered({k: v for k, v in tree.items() if k != "layers"})}

    def gather_layer(self, params):
        """One layer's parameters (a slot of a stage's scan), gathered inside the program."""
        stacked = self._gathered({"layers": jax.tree_util.tree_map(lambda x: x[None], params)})
        return jax.tree_util.tree_map(lambda x: x[0], stacked["layers"])

    def _gathered(self, tree):
        """FSDP leaves all-gathered over `data` inside a program, in the compute dtype; their
        gradients reduce-scattered back in their own dtype (`_gather_leaf`)."""
        dtype = self.config.compute_dtype

        def one(path, x, spec, tensor):
            gather = lambda y: _gather_leaf(tuple(spec).index("data"), _cast_dtype(path, y, dtype), tensor, y)  # noqa: E731
            return _whole(path, x, spec, None, gather)

        return jax.tree_util.tree_map_with_path(one, tree, self.specs(tree), self.specs(tree, ("tensor",)))

    def run(self, body, in_specs, out_specs, *args):
        """body(*args) as one program per stage and data shard on the current mesh."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.shape.get("stage") != self.plan.stages:
            raise ValueError(
                f"a {self.plan.stages}-stage pipeline runs under a mesh whose stage axis has {self.plan.stages} "
                "devices (jax.set_mesh)"
            )

        def inner(*a):
            with nn.logical_axis_rules(self.inner_rules):
                return body(*a)

        return jax.shard_map(
            inner, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(MANUAL_AXES), check_vma=False
        )(*args)

    def constrain(self, x):
        """An activation [mb, S, E] as the rules place it inside a stage (sequence parallelism:
        positions over `tensor`)."""
        return nn.with_logical_constraint(x, ("batch", "sequence", "embed"))


def _keep(physical, wanted):
    """A rule's mesh axes (a name, a tuple of names or None) reduced to those `wanted`."""
    names = (physical,) if isinstance(physical, str) else tuple(physical or ())
    kept = tuple(n for n in names if wanted(n))
    return kept[0] if len(kept) == 1 else (kept or None)


@functools.lru_cache(maxsize=8)
def _logical_specs(config: GLMConfig):
    """The model's parameters' logical PartitionSpecs (a tree like the parameters)."""
    return nn.get_partition_spec(abstract_params(config))


def _lookup(tree, names):
    for name in names:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree if isinstance(tree, P) else None


def _layout(config: GLMConfig, plan: PipelinePlan, gather_once: bool) -> StageLayout:
    return StageLayout(config, plan, tuple(get_logical_axis_rules()), gather_once)


def _cast_dtype(path, x, dtype):
    """The dtype a gathered leaf travels in: kernels and embeddings in `dtype` (None: their own)."""
    if dtype is not None and getattr(path[-1], "key", None) in ("kernel", "embedding"):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.dtype(dtype)
    return x.dtype


def _whole(path, x, spec, dtype, gather):
    """gather(x in its travelling dtype) for a leaf the rules shard over `data`; x otherwise."""
    if "data" not in jax.tree_util.tree_leaves(tuple(spec)):
        return x
    return gather(x.astype(_cast_dtype(path, x, dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gather_leaf(axis: int, dtype, tensor: P, x):
    """x's shards over `data` all-gathered along `axis` in `dtype`, keeping its `tensor` sharding
    (`tensor`: its spec on that axis); the gradient is reduce-scattered back in x's own dtype."""
    return _on_tensor_shards(lambda y: jax.lax.all_gather(y.astype(dtype), "data", axis=axis, tiled=True), tensor, x)


def _gather_leaf_forward(axis, dtype, tensor, x):
    return _gather_leaf(axis, dtype, tensor, x), jnp.zeros((), x.dtype)


def _gather_leaf_backward(axis, dtype, tensor, like, g):
    scatter = lambda y: jax.lax.psum_scatter(y.astype(like.dtype), "data", scatter_dimension=axis, tiled=True)  # noqa: E731
    return (_on_tensor_shards(scatter, tensor, g),)


_gather_leaf.defvjp(_gather_leaf_forward, _gather_leaf_backward)


def _on_tensor_shards(fn, tensor: P, x):
    """fn(x) per `tensor` shard: a collective over the manual `data` axis inside the stage
    programs would otherwise make XLA's partitioner gather x whole over the automatic `tensor`
    axis first (it cannot split a manual collective over an automatic axis)."""
    if "tensor" not in jax.tree_util.tree_leaves(tuple(tensor)):
        return fn(x)
    return jax.shard_map(fn, in_specs=tensor, out_specs=tensor, axis_names={"tensor"}, check_vma=False)(x)


def _stage_index():
    return jax.lax.axis_index("stage")


def _send_forward(x, stages: int):
    """Stage s's activation to stage s + 1 (the first stage receives zeros)."""
    return jax.lax.ppermute(x, "stage", [(s, s + 1) for s in range(stages - 1)])


def _send_backward(x, stages: int):
    """Stage s's input cotangent to stage s - 1."""
    return jax.lax.ppermute(x, "stage", [(s + 1, s) for s in range(stages - 1)])


def _schedule_fields(batch, with_loss: bool, objective=TOKEN_LOSS) -> dict:
    """The batch's fields a schedule reads, [B, S] each (a missing field: zeros), with the
    objective's own; each stage's program splits its data shard's rows into microbatches
    (`split_microbatches`)."""
    names = BATCH_FIELDS + (LOSS_FIELDS + tuple(objective.extra_fields) if with_loss else ("tokens",))
    zeros = jnp.zeros_like(batch["position_ids"])
    return {name: batch.get(name, zeros) for name in names}


def _take_microbatch(fields, index) -> dict:
    """Microbatch `index` of fields split by `split_microbatches`."""
    return {name: values[index] for name, values in fields.items()}


def _dropout_keys(dropout_rng):
    """The step's dropout key -> (embedding key, layers key); (None, None) without dropout."""
    if dropout_rng is None:
        return None, None
    embed_key, layers_key = jax.random.split(dropout_rng)
    return embed_key, layers_key


class _StageWork:
    """What one stage does to one microbatch, inside the per-stage program: embed on the first
    stage, its slots, head and loss on the last; each part under `lax.cond`, so other stages skip it.
    Dropout keys fold in the microbatch, the stage and the data shard."""

    def __init__(self, layout: StageLayout, alpha, dropout_rng, objective=TOKEN_LOSS):
        self.layout, self.config, self.plan, self.alpha = layout, layout.config, layout.plan, alpha
        self.embed_key, self.layers_key = _dropout_keys(dropout_rng)
        self.stage_fn = stage_function(self.config, self.plan, None if layout.gather_once else layout.gather_layer)
        # under `jax.checkpoint`, so a scan keeps the hidden states, never a microbatch's logits
        self.head_loss = jax.checkpoint(
            lambda params, hidden, fields: objective.head_loss(self.config, params, hidden, fields), prevent_cse=False
        )

    def keys(self, micro):
        """(embedding key, layers key) of microbatch `micro` on this stage and data shard."""
        if self.layers_key is None:
            return None, None
        shard = jax.lax.axis_index("data")
        embed_key = jax.random.fold_in(jax.random.fold_in(self.embed_key, micro), shard)
        layer_key = jax.random.fold_in(jax.random.fold_in(self.layers_key, micro), _stage_index())
        return embed_key, jax.random.fold_in(layer_key, shard)

    def prefix(self, params):
        """This stage's P-tuning keys / values [K, P, 2, K, D], or None (virtual tokens: an error,
        `prompts.check_pipeline`)."""
        check_pipeline(self.config, self.plan.stages)
        if not self.config.pre_seq_len:
            return None
        rngs = {"dropout": self.embed_key} if self.embed_key is not None else None
        slots = to_slots(GLM(self.config).apply({"params": params}, method=GLM.prefix, rngs=rngs), self.plan)
        start = _stage_index() * self.plan.slots
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, self.plan.slots), slots)

    def blocks(self, params, active, x, microbatch, micro):
        """Embedding (first stage) and this stage's slots: x [mb, S, E] -> [mb, S, E]."""
        embed_key, layer_key = self.keys(micro)
        x = jax.lax.cond(
            _stage_index() == 0,
            lambda: self.layout.constrain(
                _embed(self.config, params, microbatch, self.alpha, embed_key).astype(x.dtype)
            ),
            lambda: self.layout.constrain(x),
        )
        return self.layout.constrain(
            self.stage_fn(params["layers"], active, x, microbatch, layer_key, self.prefix(params))
        )

    def loss(self, params, y, microbatch):
        """(loss sum, tokens) of y on the last stage, zeros elsewhere."""
        zero = (jnp.float32(0), jnp.float32(0))
        return jax.lax.cond(
            _stage_index() == self.plan.stages - 1, lambda: self.head_loss(params, y, microbatch), lambda: zero
        )


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
    gather_once: bool,
    objective=TOKEN_LOSS,
):
    """GPipe's M + S - 1 ticks in a scan, one program per stage (`StageLayout`): (loss sum, tokens)
    with `with_loss`, else the hidden states [B, S, E] leaving the last stage. Differentiated by
    autodiff: the gradient of a weight gathered once is reduced once, at the program's edge."""
    layout = _layout(config, plan, gather_once)
    fields = _schedule_fields(batch, with_loss, objective)
    stages, last = plan.stages, plan.stages - 1
    params = layout.gather(params, cast=False)  # a 16-bit cotangent would be summed in 16 bits

    def body(params, active, fields, alpha, dropout_rng):
        fields = {name: split_microbatches(values, microbatches) for name, values in fields.items()}
        work = _StageWork(layout, alpha, dropout_rng, objective)
        stage = _stage_index()

        def tick(carry, t):
            x, outputs, loss_sum, count = carry
            micro = t - stage  # the microbatch this stage works on
            valid = (micro >= 0) & (micro < microbatches)
            index = jnp.clip(micro, 0, microbatches - 1)
            microbatch = _take_microbatch(fields, index)
            whole = layout.gather_inside(params)
            y = jax.lax.cond(
                valid,
                lambda: work.blocks(whole, active, x, microbatch, index),
                lambda: layout.constrain(jnp.zeros_like(x)),
            )
            if with_loss:
                step_loss, tokens = jax.lax.cond(
                    valid, lambda: work.loss(whole, y, microbatch), lambda: (jnp.float32(0), jnp.float32(0))
                )
                loss_sum, count = loss_sum + step_loss, count + tokens
            else:
                keep = valid & (stage == last)
                outputs = jax.lax.cond(
                    keep, lambda: jax.lax.dynamic_update_index_in_dim(outputs, y, index, 0), lambda: outputs
                )
            return (_send_forward(y, stages), outputs, loss_sum, count), None

        rows = fields["tokens"].shape[1:]
        x = layout.constrain(jnp.full(rows + (config.hidden_size,), bubble_value, config.compute_dtype))
        outputs = jnp.zeros((microbatches,) + x.shape, x.dtype) if not with_loss else jnp.zeros(())
        zero = jnp.float32(0)
        ticks = jnp.arange(microbatches + stages - 1)
        (_, outputs, loss_sum, count), _ = jax.lax.scan(tick, (x, outputs, zero, zero), ticks)
        if with_loss:
            return jax.lax.psum(loss_sum, MANUAL_AXES), jax.lax.psum(count, MANUAL_AXES)
        return merge_microbatches(jax.lax.psum(outputs, "stage"))

    in_specs = (layout.param_specs(params), P("stage"), {name: P("data") for name in fields}, P(), P())
    out_specs = (P(), P()) if with_loss else P("data")
    return layout.run(body, in_specs, out_specs, params, jnp.asarray(plan.active), fields, alpha, dropout_rng)


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
    gather_once: bool = True,
):
    """Embedding and blocks as a GPipe schedule: the final hidden states [B, S, E] (before the
    final norm). Bubble ticks compute nothing (`bubble_value` fills the idle buffers, NaN in
    tests, and never reaches a result)."""
    return _gpipe(
        params, batch, config, plan, microbatches, embedding_alpha, dropout_rng, bubble_value, False, gather_once
    )


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
    gather_once: bool = True,
    objective=TOKEN_LOSS,
):
    """(summed loss, its units: loss tokens) of a batch through a GPipe schedule, the head and
    loss of each microbatch on the last stage as it leaves the pipeline (`objective`: `TokenLoss`'s
    interface)."""
    return _gpipe(
        params,
        batch,
        config,
        plan,
        microbatches,
        embedding_alpha,
        dropout_rng,
        bubble_value,
        True,
        gather_once,
        objective,
    )


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
    gather_once: bool = True,
    objective=TOKEN_LOSS,
):
    """(summed loss, its units: loss tokens for `TokenLoss`): the plain model on one stage, GPipe
    on several (FSDP weights gathered once a pass with `gather_once`, else on every tick)."""
    if plan.stages > 1:
        return gpipe_loss(
            params,
            batch,
            config,
            plan,
            microbatches,
            embedding_alpha=embedding_alpha,
            dropout_rng=dropout_rng,
            gather_once=gather_once,
            objective=objective,
        )
    if objective is TOKEN_LOSS:
        logits = forward(params, batch, config, plan, embedding_alpha=embedding_alpha, dropout_rng=dropout_rng)
        return token_loss_sum(logits, batch)
    h = hidden_states(params, batch, config, embedding_alpha, dropout_rng)
    return objective.head_loss(config, params, h, batch)


def hidden_states(params, batch, config: GLMConfig, embedding_alpha=None, dropout_rng=None):
    """The plain model's final hidden states [B, S, E] (before the final norm)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None

    def run(model, batch):
        return model.blocks(model.embed(batch, embedding_alpha=embedding_alpha), batch)

    return GLM(config).apply({"params": params}, batch, method=run, rngs=rngs)


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
    gather_once: bool = True,
    objective=TOKEN_LOSS,
):
    """Gradients of scale x mean loss w.r.t. `trainable` through a 1F1B schedule, with (summed
    loss, its units: loss tokens for `TokenLoss`); the same quantities as `jax.grad` of GPipe's
    mean loss.

    batch: [B, S] arrays, B = max_microbatches x microbatch size; only the first `microbatches`
    (a traced int32, at most max_microbatches) microbatches of `split_microbatches(x,
    max_microbatches)` are used. combine(trainable, frozen) -> the model's parameters (peft.combine).

    One program per stage and data shard (`StageLayout`). Stage s does the forward of microbatch
    t - s and the backward of microbatch t - 2(S-1) + s at tick t, each under `lax.cond` (a bubble
    half-tick computes nothing): the last stage runs no separate forward, its backward recomputes
    the forward, the head and the loss; a cotangent reaches stage s one tick after stage s + 1
    made it. Stage inputs wait in a ring of 2S - 1 slots per stage until their backward.
    Gradients accumulate per stage and data shard and are reduced once, after the tick loop; with
    `gather_once` FSDP weights are gathered once, before it.
    """
    layout = _layout(config, plan, gather_once)
    stages, last, ring = plan.stages, plan.stages - 1, 2 * plan.stages - 1
    fields = _schedule_fields(batch, True, objective)
    dtypes = jax.tree_util.tree_map(lambda x: x.dtype, trainable)  # gradients accumulate in these
    targets = _gradient_targets(trainable, layout)  # where the gradients end
    trainable, frozen = layout.gather(trainable), layout.gather(frozen)

    def body(trainable, frozen, active, fields, used, alpha, dropout_rng, scale):
        fields = {name: split_microbatches(values, max_microbatches) for name, values in fields.items()}
        is_used = jnp.arange(max_microbatches) < used
        total_tokens = jax.lax.psum(jnp.sum(jax.vmap(objective.units)(fields) * is_used), "data")
        cotangent = scale / jnp.maximum(total_tokens, 1.0)
        work = _StageWork(layout, alpha, dropout_rng, objective)
        stage = _stage_index()

        def run(view, x, microbatch, micro, with_head: bool):
            params = combine(layout.gather_inside(view), layout.gather_inside(frozen))
            y = work.blocks(params, active, x, microbatch, micro)
            return y, (work.loss(params, y, microbatch)[0] if with_head else jnp.float32(0))

        def tick(t, carry):
            forward_in, backward_in, buffer, grads, losses = carry
            forward, backward = t - stage, t - 2 * (stages - 1) + stage
            forward_ok = (forward >= 0) & (forward < used)
            backward_ok = (backward >= 0) & (backward < used)
            forward_index = jnp.clip(forward, 0, max_microbatches - 1)
            backward_index = jnp.clip(backward, 0, max_microbatches - 1)
            forward_microbatch = _take_microbatch(fields, forward_index)
            backward_microbatch = _take_microbatch(fields, backward_index)
            # the last stage's forward is its backward's recomputation
            y = jax.lax.cond(
                forward_ok & (stage != last),
                lambda: run(trainable, forward_in, forward_microbatch, forward_index, False)[0],
                lambda: layout.constrain(jnp.zeros_like(forward_in)),
            )
            buffer = _ring_store(buffer, forward_in, forward % ring, forward_ok)

            def backward_pass(grads):
                x = jax.lax.dynamic_index_in_dim(buffer, backward % ring, 0, keepdims=False)

                def recompute(view, x):
                    return run(view, x, backward_microbatch, backward_index, True)

                (_, loss), pullback = jax.vjp(recompute, trainable, x)
                d_y = jnp.where(stage == last, jnp.zeros_like(backward_in), backward_in)
                d_view, d_x = pullback((d_y, jnp.where(stage == last, cotangent, 0.0)))
                grads = jax.tree_util.tree_map(lambda g, d: g + d.astype(g.dtype), grads, d_view)
                return grads, layout.constrain(d_x), jnp.where(stage == last, loss, 0.0)

            def idle(grads):
                return grads, layout.constrain(jnp.zeros_like(backward_in)), jnp.float32(0)

            # the accumulator goes through the conditional: XLA then holds no separate cotangent tree
            grads, d_x, loss = jax.lax.cond(backward_ok, backward_pass, idle, grads)
            return (
                layout.constrain(_send_forward(y, stages)),
                layout.constrain(_send_backward(d_x, stages)),
                buffer,
                grads,
                losses + loss,
            )

        rows = fields["tokens"].shape[1:]
        activations = layout.constrain(jnp.full(rows + (config.hidden_size,), bubble_value, config.compute_dtype))
        buffer = jnp.full((ring,) + activations.shape, bubble_value, config.compute_dtype)
        grads = jax.tree_util.tree_map(
            lambda x, dtype, placed: jax.lax.with_sharding_constraint(jnp.zeros(x.shape, dtype), placed),
            trainable,
            dtypes,
            layout.specs(trainable, ("tensor",)),
        )
        carry = (activations, activations, buffer, grads, jnp.float32(0))
        _, _, _, grads, losses = jax.lax.fori_loop(0, used + 2 * (stages - 1), tick, carry)
        return _stage_gradients(grads, targets, layout), jax.lax.psum(losses, MANUAL_AXES), total_tokens

    grad_specs = jax.tree_util.tree_map(lambda spec: P(*(a if a in MANUAL_AXES else None for a in spec)), targets)
    frozen_specs = layout.param_specs(frozen)
    in_specs = (
        layout.param_specs(trainable),
        frozen_specs,
        P("stage"),
        {k: P("data") for k in fields},
        P(),
        P(),
        P(),
        P(),
    )
    used, scale = jnp.asarray(microbatches, jnp.int32), jnp.asarray(scale, jnp.float32)
    args = (trainable, frozen, jnp.asarray(plan.active), fields, used, embedding_alpha, dropout_rng, scale)
    return layout.run(body, in_specs, (grad_specs, P(), P()), *args)


def _gradient_targets(trainable, layout: StageLayout) -> dict:
    """Where each gradient leaves the stage programs: FSDP leaves as their parameters, the others
    ZeRO-style over `data` on their largest free dimension (as the optimizer moments), each
    data shard holding its part of the sum; full mesh specs."""
    data = jax.sharding.get_abstract_mesh().shape["data"]
    specs = layout.specs(trainable, AXES)
    return jax.tree_util.tree_map(lambda spec, x: zero1_spec(spec, x.shape, data) or spec, specs, trainable)


def _stage_gradients(grads, targets, layout: StageLayout):
    """A program's accumulated gradients as it hands them out (`_gradient_targets`): the
    embedding's and the head's (used on the first and last stage) summed over stages, then
    reduce-scattered over data shards (FSDP leaves gathered per tick were, by their gather's
    transpose)."""
    grads = {
        k: v if k == "layers" else jax.tree_util.tree_map(lambda g: jax.lax.psum(g, "stage"), v)
        for k, v in grads.items()
    }
    fsdp = layout.specs(grads)

    def one(g, target, own):
        if "data" in tuple(own) and not layout.gather_once:
            return g
        if "data" not in tuple(target):
            return jax.lax.psum(g, "data")
        axis = tuple(target).index("data")
        scatter = lambda y: jax.lax.psum_scatter(y, "data", scatter_dimension=axis, tiled=True)  # noqa: E731
        return _on_tensor_shards(scatter, P(*(a if a == "tensor" else None for a in target)), g)

    return jax.tree_util.tree_map(one, grads, targets, fsdp)


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
