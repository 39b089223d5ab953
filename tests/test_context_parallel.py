"""Context parallelism: a `context` mesh axis (--mesh DxPxTxC) splits every sequence; loss,
gradients and logits equal one device for [gMASK], [MASK] (1D and 2D) and causal samples."""

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_case as case
from jax.sharding import PartitionSpec as P

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.collectives import collective_ops
from glm_jax.config import get_config
from glm_jax.data import DataIterator
from glm_jax.layers import recording_attention
from glm_jax.losses import token_loss
from glm_jax.model import GLM, abstract_params, init_params
from glm_jax.objectives import CONTRACT_KEYS, ObjectiveConfig, SequenceBuilder
from glm_jax.peft import PeftConfig, combine
from glm_jax.train import Trainer

SEQ = 64  # 8 chunks of 8 positions on a context axis of 4


def tiny(**kw):
    """2 layers, 4 query heads on 2 KV groups (replicated over a tensor axis of 4), float32."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, vocab_size=512)
    return get_config("glm-tiny", **{"dtype": "float32", "vocab_pad_multiple": 64, **base, **kw})


def rows(two_d: bool) -> dict:
    """[4, SEQ] rows of each kind: [gMASK], packed [MASK] samples (with padding), and the same two
    built as a causal family builds them (no part A)."""
    corpus = np.random.default_rng(3).integers(10, 500, 20_000).astype(np.int32)

    def window(rng, n):
        start = int(rng.integers(0, len(corpus) - n + 1))
        return corpus[start : start + n]

    built = []
    for causal in (False, True):
        for mask_prob in (0.0, 1.0):  # [gMASK], then [MASK]
            # [MASK]: 3 samples of 21 tokens packed in 64 positions, one left as padding (segment 0)
            objective = ObjectiveConfig(
                mask_sequence_prob=mask_prob, samples_per_sequence=3, position_encoding_2d=two_d
            )
            built.append(SequenceBuilder(window, SEQ, 7, objective, causal=causal).build(int(mask_prob) + 2 * causal))
    batch = {k: np.stack([b[k] for b in built]) for k in CONTRACT_KEYS}
    assert (batch["prefix_mask"][:2].sum(1) > 0).all() and not batch["prefix_mask"][2:].any()
    assert batch["segment_ids"][1].max() > 1 and (batch["segment_ids"][1] == 0).any()  # packed, padded
    return batch


@functools.cache
def reference(two_d: bool, num_layers: int = 2):
    """(config, batch, one device's loss / gradients / logits) for 1D or 2D positions."""
    c = tiny(position_encoding_2d=two_d, num_layers=num_layers)
    batch = rows(two_d)

    def loss_fn(p):
        logits = GLM(c).apply({"params": p}, batch)
        return token_loss(logits, batch)[0], logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(init_params(c, jax.random.key(0)))
    return c, batch, (loss, grads, logits)


def on_mesh(c, spec: str, batch, fsdp=False, sequence_parallel=False):
    """Loss, gradients and logits of the plain model on `spec`, with the compiled step's HLO."""
    mesh = sh.make_mesh(spec, jax.devices()[: sh.devices_needed(spec)])
    rules = sh.rules_for(c, mesh, fsdp=fsdp, sequence_parallel=sequence_parallel)
    shardings = sh.named_shardings(abstract_params(c), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, P())

    def step(p, b):
        def loss_fn(p):
            logits = GLM(c).apply({"params": p}, b)
            return token_loss(logits, b)[0], logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        return loss, grads, logits

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        p = jax.device_put(init_params(c, jax.random.key(0)), shardings)
        placed = sh.global_batch(batch, mesh)
        compiled = jax.jit(step, out_shardings=replicated).lower(p, placed).compile()
        return compiled(p, placed), compiled.as_text(), mesh


def assert_same(result, reference, atol=2e-6):
    loss, grads, logits = result
    ref_loss, ref_grads, ref_logits = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    if logits is not None:
        np.testing.assert_allclose(logits, ref_logits, atol=atol, rtol=1e-5)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


# ---- the mesh, the rules, the batch's placement (no compile) ---------------------------------------------
def test_mesh_specs_rules_and_batch_placement():
    assert sh.parse_mesh("2x1x4x8") == sh.MeshShape(2, 1, 4, 8)
    assert sh.parse_mesh("2x8x4").context is None and sh.devices_needed("1x2x2x4") == 16
    mesh = sh.make_mesh("1x2x2x4", jax.devices()[:16])
    assert dict(mesh.shape) == {"data": 1, "stage": 2, "tensor": 2, "context": 4}
    assert "context" not in sh.make_mesh("2x2x2", jax.devices()[:8]).axis_names  # 3 parts: as before
    with pytest.raises(sh.MeshError, match="DxPxTxC"):
        sh.parse_mesh("1x1x1x1x2")
    with pytest.raises(sh.MeshError, match="context axis of 4 does not divide the sequence length 66"):
        sh.check_splittable(tiny(), mesh, seq_len=66)
    # the positions of activations over `context`; keys / values whole; sequence parallelism
    # splits each context chunk over `tensor`; no context axis: positions whole, as before
    rules = dict(sh.rules_for(tiny(), mesh))
    assert (rules["length"], rules["sequence"], rules["kv_length"]) == ("context", "context", None)
    assert dict(sh.rules_for(tiny(), mesh, sequence_parallel=True))["sequence"] == ("context", "tensor")
    plain = dict(sh.rules_for(tiny(), sh.make_mesh("2x2", jax.devices()[:8]), sequence_parallel=True))
    assert (plain["length"], plain["sequence"]) == (None, "tensor")
    # rows over `data`, columns over `context`; a process builds whole rows
    sharding = sh.batch_sharding(sh.make_mesh("2x1x1x2", jax.devices()[:4]))
    assert sharding.spec == P("data", "context")
    first_replica = [d for d, index in sharding.devices_indices_map((4, SEQ)).items() if index[0].start == 0]
    assert len(first_replica) == 2 and list(sh.rows_held(sharding, 4, first_replica)) == [0, 1]
    batch = rows(False)
    placed = sh.global_batch(batch, sharding.mesh)["tokens"]
    assert {s.data.shape for s in placed.addressable_shards} == {(2, SEQ // 2)}
    np.testing.assert_array_equal(np.asarray(placed), batch["tokens"])
    with pytest.raises(sh.MeshError, match="context axis of 2"):
        sh.global_batch({"tokens": batch["tokens"][:, :63]}, sharding.mesh)


def test_context_links_sit_between_stage_and_tensor():
    """GPU hosts: tensor inside a host, then context, then stage and data. A v5p-128 torus
    (4x4x4, libtpu's description, no TPU) under data 2 x tensor 4 x context 8: each tensor group
    is 4 chips of one physical ring."""
    assert sh.host_split((2, 1, 4, 4), 8) == ((1, 1, 4, 2), (2, 1, 1, 2))
    assert sh.host_split((1, 2, 2, 8), 8) == ((1, 1, 2, 4), (1, 2, 1, 2))
    assert sh.host_split((4, 8, 4), 8) == ((1, 2, 4), (4, 4, 1))  # 3 parts: as before
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu absent (pip install 'jax[tpu]', the test extra)")
    from glm_jax.topology import topology_devices

    devices = topology_devices("v5p-128")
    mesh = sh.make_mesh("2x1x4x8", devices)
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "tensor": 4, "context": 8}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
    for group in mesh.devices.reshape(-1, 4, 8).transpose(0, 2, 1).reshape(-1, 4):  # tensor groups
        coords = np.array([d.coords for d in group])
        assert (coords.max(0) != coords.min(0)).sum() == 1, coords


def test_the_flash_kernel_gives_way_under_context_parallelism():
    """attention_impl=pallas_tpu on a context axis: the XLA reference runs (the kernel takes
    whole sequences), with a warning; traced only."""
    c = tiny(attention_impl="pallas_tpu")
    mesh = sh.make_mesh("1x1x1x2", jax.devices()[:2])
    batch = {k: jnp.asarray(v) for k, v in rows(False).items()}
    params = nn.meta.unbox(abstract_params(c))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.rules_for(c, mesh)), recording_attention() as used:
        with pytest.warns(UserWarning, match="context parallelism"):
            jax.eval_shape(lambda p, b: GLM(c).apply({"params": p}, b), params, batch)
    assert used == {"self": "xla"}


# ---- equal to one device -------------------------------------------------------------------------------
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "two_d,spec",
    [
        (False, "2x1x1x2"),
        pytest.param(True, "1x1x2x4", marks=SLOW),  # C = 4 with the heads (and the 2 KV groups) over tensor 2
        pytest.param(True, "2x1x1x2", marks=SLOW),
        pytest.param(False, "2x1x1x4", marks=SLOW),
        pytest.param(False, "1x1x2x4", marks=SLOW),
    ],
)
def test_context_parallel_equals_one_device(two_d, spec):
    """Each sequence over C = 2 or 4 context shards: loss, gradients and logits as on one device,
    for [gMASK], [MASK] and causal rows in one batch, 1D and 2D positions. The compiled step
    really splits: keys / values are all-gathered over `context`."""
    c, batch, expected = reference(two_d)
    result, text, mesh = on_mesh(c, spec, batch)
    assert_same(result, expected)
    gathered = [op for op in collective_ops(text, mesh) if op.kind == "all-gather" and op.axis == "context"]
    assert gathered, "no all-gather over context"


@pytest.mark.slow
def test_dropout_under_context_parallelism_equals_one_device():
    """Hidden and attention dropout (0.1, one key) on data 2 x context 2: the masks come from
    global indices, so loss and gradients are one device's."""
    c, batch = tiny(hidden_dropout=0.1, attention_dropout=0.1), rows(False)
    key = jax.random.key(7)

    def loss(p, b):
        return token_loss(GLM(c).apply({"params": p}, b, rngs={"dropout": key}), b)[0]

    params = init_params(c, jax.random.key(0))
    expected = jax.jit(jax.value_and_grad(loss))(params, batch)
    mesh = sh.make_mesh("2x1x1x2", jax.devices()[:4])
    rules = sh.rules_for(c, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed = jax.device_put(params, sh.named_shardings(abstract_params(c), mesh, rules))
        result = jax.jit(jax.value_and_grad(loss))(placed, sh.global_batch(batch, mesh))
    assert_same((*result, None), (*expected, None))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,sequence_parallel", [(True, False), (False, True), (True, True)])
def test_context_with_fsdp_and_sequence_parallelism_equals_one_device(fsdp, sequence_parallel):
    """data 2 x tensor 2 x context 2: FSDP (parameters over `data`) and sequence parallelism (each
    context chunk over `tensor` between the sublayers), 2D positions."""
    c, batch, expected = reference(True)
    assert_same(on_mesh(c, "2x1x2x2", batch, fsdp=fsdp, sequence_parallel=sequence_parallel)[0], expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,schedule,fsdp,sequence_parallel",
    [("1x2x2x2", "1f1b", True, True), ("2x2x1x2", "gpipe", False, False), ("2x2x2x2", "1f1b", False, False)],
)
def test_context_in_the_pipeline_equals_one_device(spec, schedule, fsdp, sequence_parallel):
    """Pipeline stages (1F1B or GPipe, one program per stage and data shard) with the tensor and
    context axes left to the partitioner, with FSDP and sequence parallelism: loss and gradients
    as on one device (the schedules compute no logits)."""
    c, batch, expected = reference(False, num_layers=4)
    mesh = sh.make_mesh(spec, jax.devices()[: sh.devices_needed(spec)])
    rules = sh.rules_for(c, mesh, fsdp=fsdp, sequence_parallel=sequence_parallel)
    plan = pipeline.PipelinePlan(c.num_layers, sh.axis_size(mesh, "stage"))
    microbatches = batch["tokens"].shape[0] // sh.axis_size(mesh, "data")
    shardings = sh.named_shardings(abstract_params(c), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, P())

    def step(p, b):
        if schedule == "1f1b":
            full = lambda trainable, frozen: combine(trainable, frozen, PeftConfig("full"))  # noqa: E731
            grads, loss_sum, tokens = pipeline.one_f_one_b(p, {}, full, b, microbatches, c, plan, microbatches)
            return loss_sum / tokens, pipeline.params_from_slots(grads, plan)

        def loss_fn(p):
            loss_sum, tokens = pipeline.gpipe_loss(p, b, c, plan, microbatches)
            return loss_sum / tokens

        loss, grads = jax.value_and_grad(loss_fn)(p)
        return loss, pipeline.params_from_slots(grads, plan)

    raw = init_params(c, jax.random.key(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        p = jax.jit(lambda p: pipeline.params_to_slots(p, plan), out_shardings=shardings)(raw)
        loss, grads = jax.jit(step, out_shardings=replicated)(p, sh.global_batch(batch, mesh))
    assert_same((loss, grads, None), expected)


def train_losses(spec: str, steps: int = 2, **trainer_kw) -> list[float]:
    """Losses of `steps` Trainer steps (AdamW at a constant rate) on `spec`."""
    c = case.config(num_layers=4)
    mesh = sh.make_mesh(spec, jax.devices()[: sh.devices_needed(spec)])
    trainer = Trainer(c, case.optim(), mesh, case.BATCH, **trainer_kw)
    state = trainer.init_state(0)
    data = DataIterator(case.builder(), case.BATCH, prefetch=0, rows=sh.rows_held(trainer.batch_sharding, case.BATCH))
    losses = []
    with trainer.context():
        for _ in range(steps):
            lr, alpha = jnp.float32(case.LR), jnp.float32(c.embedding_shrink_alpha)
            state, metrics = trainer.fused_step(state, trainer.place_batch(next(data)), lr, alpha)
            losses.append(float(jax.device_get(metrics["loss"])))
    return losses


@pytest.mark.slow
def test_training_steps_on_a_combined_mesh_equal_one_device():
    """Trainer steps (AdamW, 1F1B) on data 2 x stage 2 x tensor 2 x context 2 with FSDP and
    sequence parallelism: one device's losses, step for step."""
    combined = train_losses("2x2x2x2", fsdp=True, sequence_parallel=True)
    np.testing.assert_allclose(combined, train_losses("1x1"), rtol=2e-6)
