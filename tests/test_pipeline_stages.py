"""The pipeline's per-stage programs: FSDP weights gathered once or per tick, sequence parallelism,
both schedules equal to the plain model; the head and the embedding under a stage's `lax.cond`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_case as case
from jax.extend.core import jaxprs_in_params

from glm_jax import sharding as sh
from glm_jax.collectives import collective_ops
from glm_jax.dry_run import dry_run, tick_count
from glm_jax.optim import OptimConfig
from glm_jax.train import Trainer

LAYERS = 4
ALPHA = jnp.float32(case.config().embedding_shrink_alpha)  # what the plain model applies


@pytest.fixture(scope="module")
def reference():
    """The plain model on one device: (loss sum, gradients of the summed loss)."""
    loss, grads, _ = case.single_device(case.config(num_layers=LAYERS))
    tokens = float(np.sum(case.local_rows()["loss_mask"]))
    return float(loss) * tokens, jax.tree_util.tree_map(lambda g: np.asarray(g) * tokens, grads)


def _trainer(**kw) -> Trainer:
    mesh = sh.make_mesh("2x2x2", jax.devices()[:8])
    return Trainer(case.config(num_layers=LAYERS), OptimConfig(peak_lr=1e-3), mesh, case.BATCH, **kw)


@pytest.mark.parametrize(
    "schedule,gather,sequence_parallel",
    [
        ("1f1b", "once", True),
        pytest.param("1f1b", "tick", False, marks=pytest.mark.slow),
        pytest.param("gpipe", "once", False, marks=pytest.mark.slow),
        pytest.param("gpipe", "tick", True, marks=pytest.mark.slow),
    ],
)
def test_fsdp_gathers_and_sequence_parallelism_equal_the_plain_model(reference, schedule, gather, sequence_parallel):
    trainer = _trainer(fsdp=True, schedule=schedule, fsdp_gather=gather, sequence_parallel=sequence_parallel)
    with trainer.context():
        state = trainer.init_state(0, case.params(case.config(num_layers=LAYERS)))
        batch = trainer.place_batch(case.local_rows())
        grads, loss_sum, _ = trainer.grad_pass(state.params, batch, trainer.step_rng(state), ALPHA, 1.0)
        grads = jax.device_get(trainer.plain_params(grads))
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(float(loss_sum), ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=2e-6 * 500, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


VOCAB_OPS = ("dot_general", "gather", "scatter-add", "scatter_add")  # the head, the lookup, its gradient


def _vocab_ops(jaxpr, vocab: int, inside: bool = False, found=None):
    """[(primitive, inside a cond?)] for each matmul / lookup touching a vocab-wide axis in a jaxpr."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
        if eqn.primitive.name in VOCAB_OPS and any(vocab in shape for shape in shapes):
            found.append((eqn.primitive.name, inside))
        for sub in jaxprs_in_params(eqn.params):
            _vocab_ops(sub, vocab, inside or eqn.primitive.name == "cond", found)
    return found


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_the_head_and_embedding_run_under_a_stage_condition(schedule):
    trainer = _trainer(schedule=schedule)
    vocab = trainer.config.padded_vocab_size
    batch = {k: jnp.asarray(v) for k, v in case.local_rows().items()}
    with trainer.context():
        state = trainer.init_state(0)
        step = jax.make_jaxpr(trainer._pass_gradients)(
            state.params, trainer.frozen, batch, jnp.int32(trainer.microbatches), None, ALPHA, 1.0
        )
    placed = _vocab_ops(step.jaxpr, vocab)
    assert {name for name, _ in placed} >= {"dot_general", "gather"}, placed
    assert all(inside for _, inside in placed), placed  # head and lookup, forward and backward, in a cond


def _weight_gathers_in_loops(gather: str, tmp_path) -> list:
    """The all-gathers over `data` inside a loop of the compiled 1F1B step of a tiny FSDP plan."""
    trainer = _trainer(fsdp=True, fsdp_gather=gather)
    hlo = tmp_path / f"{gather}.hlo"
    report = dry_run(trainer, 64, hlo_file=str(hlo))
    ops = collective_ops(hlo.read_text(), trainer.mesh, tick_count(trainer))
    assert report["collectives"]["total_bytes"] > 0
    return [op for op in ops if op.kind == "all-gather" and "data" in op.axis and op.loops]


@pytest.mark.slow  # two compiles of the whole step
def test_fsdp_weights_are_gathered_once_outside_the_tick_loop(tmp_path):
    assert _weight_gathers_in_loops("once", tmp_path) == []
    assert _weight_gathers_in_loops("tick", tmp_path)  # the alternative gathers inside it
