"""Training at scale: checkpoints in the training layout (per-device bytes, no compile per save,
exact restore onto other meshes, serving loads without the optimizer state), a ramped step in one
1F1B schedule equal to accumulated GPipe passes, with the stop vote."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_case as case

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints
from glm_jax.loading import load_checkpoint
from glm_jax.optim import OptimConfig
from glm_jax.train import Trainer
from glm_jax.train_state import restore_state, save_state, state_bytes_per_device

pytestmark = pytest.mark.slow  # training state at scale: several meshes, restores, ramps

LR, ALPHA = jnp.float32(1e-3), jnp.float32(1.0)
OPTIM = OptimConfig(peak_lr=1e-3)


def _device_bytes(tree, device) -> int:
    return sum(
        s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree) for s in leaf.addressable_shards if s.device == device
    )


class _Compiles:
    """Counts backend compiles while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        self.n = 0
        self._listener = lambda event, *_a, **_k: setattr(self, "n", self.n + (event == self.EVENT))
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


@pytest.mark.parametrize("spec,n", [("4x2", 8), ("8x4", 32)])
def test_checkpoints_are_written_and_read_in_the_training_layout(tmp_path, spec, n):
    t = Trainer(case.config(), OPTIM, sh.make_mesh(spec, jax.devices()[:n]), 8)
    state = t.init_state(0)
    ckpt = Checkpoints(str(tmp_path), keep=3, async_save=True)
    save_state(ckpt, t, 1, state, {"config": t.config.to_dict()})  # orbax compiles its copies once
    ckpt.wait()
    with _Compiles() as compiles:
        for step in (2, 3):
            save_state(ckpt, t, step, state, {"config": t.config.to_dict()})
        ckpt.wait()
    assert compiles.n == 0, "a save after the first compiled"
    restored = restore_state(ckpt, t, 3, ckpt.restore_meta(3))
    ckpt.close()
    d0 = t.mesh.devices.flat[0]
    assert _device_bytes(restored, d0) <= _device_bytes(state, d0)
    assert _device_bytes(restored.params, d0) < 0.5 * sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
    assert state_bytes_per_device(t) == pytest.approx(_device_bytes(state, d0), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_other_meshes_is_exact_and_serving_reads_parameters_only(tmp_path):
    c = case.config(num_layers=4)
    big = Trainer(c, OPTIM, sh.make_mesh("4x2", jax.devices()[:8]), 8)
    with big.context():
        state, _ = big.fused_step(big.init_state(0), big.place_batch(case.local_rows()), LR, ALPHA)
    ckpt = Checkpoints(str(tmp_path), async_save=False)
    save_state(ckpt, big, 1, state, {"config": c.to_dict()})
    ckpt.close()

    def plain(t, s):  # parameters and moments in the plain stacked layout, on the host
        unslot = lambda p: pipeline.params_from_slots(p, t.plan)
        with jax.set_mesh(t.mesh):
            return jax.device_get(
                jax.jit(lambda s: (unslot(s.params), t.param_like(s.opt_state, unslot, lambda x: x), s.step, s.rng))(s)
            )

    saved = plain(big, state)
    # one device; 2 stages (the saved 4 slots split over them); 3 stages (they do not divide 4)
    for spec, n in (("1x1", 1), ("2x2x2", 8), ("3x1", 3)):
        t = Trainer(c, OPTIM, sh.make_mesh(spec, jax.devices()[:n]), 8)
        ck = Checkpoints(str(tmp_path), async_save=False)
        restored = restore_state(ck, t, 1, ck.restore_meta(1))
        ck.close()
        assert all(
            a.sharding == s
            for a, s in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(t.state_shardings))
        ), spec
        for a, b in zip(jax.tree_util.tree_leaves(plain(t, restored)), jax.tree_util.tree_leaves(saved)):
            np.testing.assert_array_equal(a, b, err_msg=spec)
    shutil.rmtree(tmp_path / "1" / "opt_state")  # a serving load never reads it
    config, params, step = load_checkpoint(str(tmp_path))
    assert step == 1
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(saved[0])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_ramped_step_in_one_schedule_equals_accumulated_passes():
    c = case.config(num_layers=4)
    mesh = sh.make_mesh("4x2", jax.devices()[:8])
    rows = case.local_rows()
    one = Trainer(c, OPTIM, mesh, 8)  # 1F1B: up to 8 microbatches of one sequence a step
    passes = Trainer(c, OPTIM, mesh, 4, schedule="gpipe")  # GPipe passes of 4 sequences
    assert (one.schedule, one.microbatches, passes.microbatches) == ("1f1b", 8, 4)
    halves = [{k: v[i : i + 4] for k, v in rows.items()} for i in (0, 4)]
    for used, parts in ((4, halves[:1]), (8, halves)):  # a ramp step of half the batch, then the full one
        with one.context():
            state = one.init_state(0)
            batch = one.place_batch({k: v[: 4 * len(parts)] for k, v in rows.items()}, used)
            got = one.grad_pass(state.params, batch, one.step_rng(state), ALPHA, state.loss_scale.scale, used)
            _, m = one.fused_step(state, batch, LR, ALPHA, used, stop=used == 8)
        assert bool(m["stop"]) == (used == 8)  # this process's stop vote comes back reduced, with the metrics
        with passes.context():
            state = passes.init_state(0)
            grads = loss_sum = n = None
            for part in parts:
                g, ls, k = passes.grad_pass(
                    state.params, passes.place_batch(part), passes.step_rng(state), ALPHA, state.loss_scale.scale
                )
                grads = g if grads is None else passes.accumulate(grads, g)
                loss_sum, n = (ls, k) if loss_sum is None else (loss_sum + ls, n + k)
            _, m_ref = passes.update(state, jax.tree_util.tree_map(jnp.copy, grads), loss_sum, n, LR)
        assert float(got[2]) == float(n) == float(m["tokens"]) == float(m_ref["tokens"])
        np.testing.assert_allclose(float(got[1]), float(loss_sum), rtol=1e-6)
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m["grad_norm"]), float(m_ref["grad_norm"]), rtol=1e-5)
        for a, b in zip(
            jax.tree_util.tree_leaves(jax.device_get(got[0])), jax.tree_util.tree_leaves(jax.device_get(grads))
        ):
            np.testing.assert_allclose(a, b, atol=2e-6 * float(n), rtol=1e-5)
