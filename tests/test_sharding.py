"""Sharding: meshes, rules, the pipeline (uneven stages, NaN bubbles), placement, two processes."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import processes
import pytest
import sharding_case as case
from jax.sharding import PartitionSpec as P

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints
from glm_jax.model import abstract_params

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def reference():
    return case.single_device()


def assert_same(result, reference, atol=2e-6):
    loss, grads, logits = result
    ref_loss, ref_grads, ref_logits = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=atol, rtol=1e-5)
    paths = jax.tree_util.tree_structure(grads)
    assert paths == jax.tree_util.tree_structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "spec,n_devices", [("1x1", 1), ("2x2", 4), pytest.param("8x4", 32, marks=pytest.mark.slow), ("2x2x2", 8)]
)
def test_sharded_equals_single_device(spec, n_devices, reference):
    mesh = sh.make_mesh(spec, jax.devices()[:n_devices])
    batch = sh.global_batch(case.local_rows(), mesh)
    assert_same(case.sharded_loss_and_grads(mesh, batch, with_logits=True), reference)


# the other families' blocks (config switches): BLOOM's (ALiBi, embedding LayerNorm), OPT's
# (learned positions from row 2, ReLU) with the original GLM's block-position table, LLaMA-3's
# (RMSNorm, SwiGLU, grouped KV heads, no biases, llama3 rotary scaling)
OTHER_BLOCKS = {
    "bloom": dict(position_encoding="alibi", embedding_norm=True, norm_placement="pre", ffn_kind="gelu_tanh"),
    "opt+glm": dict(
        position_encoding="learned",
        position_encoding_2d=True,
        position_offset=2,
        norm_placement="pre",
        ffn_kind="relu",
    ),
    "llama-3": dict(
        norm_kind="rmsnorm",
        norm_placement="pre",
        ffn_kind="swiglu",
        num_kv_heads=2,
        qkv_bias=False,
        attention_dense_bias=False,
        ffn_bias=False,
        tie_word_embeddings=False,
        rotary_scaling="llama3",
        rotary_scaling_factor=8.0,
        rotary_original_length=32,
    ),
}


@pytest.mark.slow  # three pipelined compiles, ~12 s each
@pytest.mark.parametrize("block", list(OTHER_BLOCKS))
def test_other_families_blocks_train_on_a_mesh_as_on_one_device(block):
    """Loss, gradients and logits on data 2 x stage 2 x tensor 2 (the pipeline's GPipe forward,
    heads and FFN split) equal the plain model's on one device."""
    c = case.config(num_layers=4, **OTHER_BLOCKS[block])
    mesh = sh.make_mesh("2x2x2", jax.devices()[:8])
    batch = sh.global_batch(case.local_rows(), mesh)
    assert_same(case.sharded_loss_and_grads(mesh, batch, c=c, with_logits=True), case.single_device(c))


@pytest.mark.slow
# 10 on 4: the 9x8-2 layout scaled down (3x4-2). The training schedules: the head and loss of each
# microbatch on the last stage (GPipe by autodiff, 1F1B by a backward per tick). The evaluation
# forward (logits, the same GPipe ticks) is test_sharded_equals_single_device's.
@pytest.mark.parametrize("layers,stages,schedule", [(7, 4, "gpipe"), (10, 4, "1f1b")])
def test_uneven_pipeline_with_nan_bubbles_equals_plain_scan(layers, stages, schedule):
    c = case.config(num_layers=layers)
    mesh = sh.make_mesh(f"{stages}x2", jax.devices()[: 2 * stages])
    batch = sh.global_batch(case.local_rows(), mesh)
    loss, grads, logits = case.sharded_loss_and_grads(
        mesh, batch, c=c, bubble_value=float("nan"), with_logits=True, schedule=schedule
    )
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    ref = case.single_device(c)
    assert_same((loss, grads, ref[2] if logits is None else logits), ref)


def test_microbatch_count_does_not_change_the_loss(reference):
    mesh = sh.make_mesh("2x2", jax.devices()[:4])
    batch = sh.global_batch(case.local_rows(), mesh)
    loss, _ = case.sharded_loss_and_grads(mesh, batch, microbatches=2)  # the default here is 8
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)


def test_pipeline_plan():
    assert pipeline.PipelinePlan(70, 8).layers_per_stage == [8, 9, 9, 9, 9, 9, 9, 8]
    assert pipeline.PipelinePlan(7, 4).layers_per_stage == [1, 2, 2, 2]
    assert pipeline.PipelinePlan(10, 4).layers_per_stage == [2, 3, 3, 2]
    plan = pipeline.PipelinePlan(10, 4)
    assert list(plan.layer_of_slot) == [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9, -1]
    assert pipeline.bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction("1f1b", 8, 176) == pytest.approx(14 / 190)
    layers = {"w": jnp.arange(10.0)[:, None] * jnp.ones((10, 3))}
    slots = pipeline.to_slots(layers, plan)
    assert slots["w"].shape == (12, 3) and not slots["w"][2].any()
    np.testing.assert_array_equal(pipeline.from_slots(slots, plan)["w"], layers["w"])


def test_mesh_specs_and_errors():
    assert sh.parse_mesh("8x4") == sh.MeshShape(None, 8, 4)
    assert sh.parse_mesh("2x8x4") == sh.MeshShape(2, 8, 4)
    mesh = sh.make_mesh("2x4", jax.devices()[:32])
    assert dict(mesh.shape) == {"data": 4, "stage": 2, "tensor": 4}
    with pytest.raises(sh.MeshError, match="expected PxT"):
        sh.parse_mesh("8by4")
    with pytest.raises(sh.MeshError, match=r"32 devices cannot hold stage=3 x tensor=4 = 12"):
        sh.make_mesh("3x4", jax.devices()[:32])
    with pytest.raises(sh.MeshError, match="needs 64 devices, 32 given"):
        sh.make_mesh("2x8x4", jax.devices()[:32])


@pytest.mark.parametrize(
    "overrides,spec,message",
    [
        (dict(num_attention_heads=2, hidden_size=128), "1x4", "tensor axis of 4 does not divide num_attention_heads=2"),
        (dict(inner_hidden_size=390), "1x4", "inner_hidden_size (FFN width)=390"),
        (dict(vocab_size=502, vocab_pad_multiple=2), "1x4", "padded vocab=502"),
        (dict(num_layers=4), "8x1", "stage axis of 8 is more than num_layers=4"),
    ],
)
def test_unsplittable_configs_fail_fast(overrides, spec, message):
    c = case.config(**overrides)
    mesh = sh.make_mesh(spec, jax.devices()[: sh.devices_needed(spec)])
    with pytest.raises(sh.MeshError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sh.check_splittable(c, mesh)


def test_batch_that_does_not_divide_fails_fast():
    mesh = sh.make_mesh("1x1", jax.devices()[:4])
    with pytest.raises(sh.MeshError, match="data axis of 4 does not divide the global batch 6"):
        sh.check_splittable(case.config(), mesh, global_batch=6)
    with pytest.raises(sh.MeshError, match="3 microbatches x data axis of 4"):
        sh.check_splittable(case.config(), mesh, global_batch=8, microbatches=3)


def _specs(shardings, arrays):
    """{path: spec padded with None to the array's rank}."""
    arrays = _flat(arrays)
    return {k: P(*(tuple(s.spec) + (None,) * (arrays[k].ndim - len(s.spec)))) for k, s in _flat(shardings).items()}


def test_parameters_and_optimizer_state_land_where_the_rules_say():
    c = case.config(num_kv_heads=2)  # 2 KV heads on 4 tensor shards: replicated
    mesh = sh.make_mesh("2x2x4", jax.devices()[:16])
    rules = sh.rules_for(c, mesh)
    shardings = sh.named_shardings(abstract_params(c), mesh, rules)
    plan = pipeline.PipelinePlan(c.num_layers, 2)
    raw = case.params(c)
    with jax.set_mesh(mesh):
        placed = jax.jit(lambda p: pipeline.params_to_slots(p, plan), out_shardings=shardings)(raw)
    specs = _specs(jax.tree_util.tree_map(lambda a: a.sharding, placed), placed)
    assert specs["['layers']['attention']['query']['kernel']"] == P("stage", None, "tensor", None)
    assert specs["['layers']['attention']['key']['kernel']"] == P("stage", None, None, None)
    assert specs["['layers']['attention']['dense']['kernel']"] == P("stage", "tensor", None, None)
    assert specs["['layers']['mlp']['dense_h_to_4h']['kernel']"] == P("stage", None, None, "tensor")
    assert specs["['layers']['mlp']['dense_4h_to_h']['kernel']"] == P("stage", "tensor", None)
    assert specs["['word_embeddings']['embedding']"] == P("tensor", None)
    assert specs["['layers']['input_layernorm']['scale']"] == P("stage", None)
    # ZeRO-1: Adam moments further split over `data` on their largest free dimension
    opt = jax.eval_shape(optax.adamw(1e-3).init, placed)
    mu = opt[0].mu
    moment = jax.tree_util.tree_map(lambda s, a: sh.zero1_sharding(s, a.shape), shardings, mu)
    mspecs = _specs(moment, mu)
    assert mspecs["['layers']['attention']['query']['kernel']"] == P("stage", "data", "tensor", None)
    assert mspecs["['word_embeddings']['embedding']"] == P("tensor", "data")
    assert mspecs["['layers']['input_layernorm']['scale']"] == P("stage", "data")


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "grads.npz"
    run_dir = tmp_path / "run"
    processes.wait(processes.start(2, 4, [str(HERE / "multihost_worker.py"), str(out), str(run_dir)]), 240)
    got = np.load(out)
    c = case.config(num_layers=case.MULTIHOST_LAYERS)
    reference = case.single_device(c)
    np.testing.assert_allclose(got["loss"], reference[0], rtol=1e-6)
    for key, ref in _flat(reference[1]).items():
        np.testing.assert_allclose(got[key], ref, atol=2e-6, rtol=1e-5, err_msg=key)
    # the run's first steps (dropout on) as on one process
    with open(run_dir / "log" / "metrics.jsonl") as f:
        logged = [r["loss"] for r in map(json.loads, f) if "loss" in r][:2]
    one_process = case.train_losses(sh.make_mesh("2x2x2", jax.devices()[:8]), steps=2, c=c)
    np.testing.assert_allclose(logged, one_process, rtol=1e-6)
    # SIGTERM on process 1 only: both processes agreed on one step, saved it and stopped
    summaries = [json.loads((run_dir / f"summary-{i}.json").read_text()) for i in range(2)]
    assert all(s["interrupted"] for s in summaries)
    assert 2 <= summaries[0]["steps"] == summaries[1]["steps"] < 40
    assert Checkpoints(str(run_dir / "ck")).latest_step() == summaries[0]["steps"]
