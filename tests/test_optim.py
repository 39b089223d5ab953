"""Optimizer: the schedule, decay and clipping masks, batch ramp-up, fp16 loss scaling and skips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_case as case

from glm_jax import sharding as sh
from glm_jax.config import get_config
from glm_jax.model import init_params
from glm_jax.optim import (
    FINETUNE_LOSS_SCALE,
    BatchSchedule,
    LossScale,
    OptimConfig,
    decay_mask,
    embedding_alpha,
    learning_rate,
    optim_for,
)
from glm_jax.peft import PeftConfig, split
from glm_jax.train import RunConfig, Trainer, make_trainer


def test_schedule_matches_the_spec():
    cfg = OptimConfig()  # GLM-130B: 1e-7 -> 8e-5 over 0.5% of samples, cosine to 8e-6
    total = 1_000_000
    lr = lambda s: float(learning_rate(cfg, s, total))
    assert lr(0) == pytest.approx(1e-7)
    assert lr(2500) == pytest.approx((1e-7 + 8e-5) / 2, rel=1e-5)
    assert lr(5000) == pytest.approx(8e-5, rel=1e-5)
    assert lr(5000 + (total - 5000) / 2) == pytest.approx((8e-5 + 8e-6) / 2, rel=1e-4)
    assert lr(total) == pytest.approx(8e-6, rel=1e-5)
    assert lr(2 * total) == pytest.approx(8e-6, rel=1e-5)


def test_batch_ramp_up():
    s = BatchSchedule(4224, 24, 10_000, ramp_start=192, ramp_fraction=0.025, ramp_increment=24)
    assert s.batch(0) == 192 and s.passes(0) == 8
    ramp = 0.025 * 10_000 * 4224
    per_increment = ramp / ((4224 - 192) / 24)
    for step in (10, 100, 400):
        seen = s.samples_before(step)
        want = min(4224, 192 + 24 * int(seen // per_increment)) if seen < ramp else 4224
        assert s.batch(step) == want
    assert s.batch(5000) == 4224 and s.samples_before(1) == 192
    assert [BatchSchedule(8, 2, 10).passes(i) for i in (0, 9)] == [4, 4]
    with pytest.raises(ValueError, match="whole number of passes"):
        BatchSchedule(10, 4, 5)
    assert s.ramp_note is None and BatchSchedule(8, 2, 10).ramp_note is None  # a ramp, or none asked
    # a ramp the flags cannot give is said, not silent (and not an error)
    assert "not larger" in BatchSchedule(192, 24, 100, ramp_start=192).ramp_note
    assert "one pass" in BatchSchedule(4224, 4224, 100, ramp_start=192).ramp_note


def test_a_pipelined_mesh_ramps_in_microbatches_without_flags():
    # glm-130b's optimizer (ramp over 2.5% of the samples, increments of 24) on a small model and
    # 8 stages: 1F1B steps of 8 -> 176 one-sequence microbatches, no --pass-batch needed
    c = get_config("glm-tiny", num_layers=8)
    run = RunConfig(steps=1000, global_batch=4224 // 24, seq_len=64)
    _, batches = make_trainer(c, optim_for("glm-130b", ramp_start=8), run, sh.make_mesh("8x1", jax.devices()[:8]))
    assert batches.passes(0) == 8 and batches.passes(999) == 176 and batches.ramp_note is None


def test_embedding_alpha_schedule():
    cfg = OptimConfig(embedding_alpha_schedule=((0, 0.1), (100, 0.5)))
    assert [float(embedding_alpha(cfg, s, 1.0)) for s in (0, 99, 100)] == [pytest.approx(0.1), pytest.approx(0.1), 0.5]
    assert float(embedding_alpha(OptimConfig(), 7, 0.1)) == pytest.approx(0.1)


def test_decay_mask_spares_biases_and_norms():
    params = case.params(case.config(num_layers=2))
    mask = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert mask["['word_embeddings']['embedding']"]
    assert mask["['layers']['attention']['query']['kernel']"]
    assert not mask["['layers']['attention']['query']['bias']"]
    assert not mask["['layers']['input_layernorm']['scale']"]
    assert not mask["['final_layernorm']['bias']"]


@pytest.fixture(scope="module")
def trainer():
    c = case.config(num_layers=2)
    return Trainer(c, OptimConfig(peak_lr=1e-3, weight_decay=0.1), sh.make_mesh("1x1", jax.devices()[:1]), 8)


def _zeros_like(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def test_weight_decay_and_clipping_reach_the_right_leaves(trainer):
    state = trainer.init_state(0)
    lr = jnp.float32(1e-2)
    before = jax.device_get(state.params)  # update donates the state
    new, m = trainer.update(state, _zeros_like(state.params), jnp.float32(0), jnp.float32(1), lr)
    after = new.params
    # zero gradients: only decoupled weight decay moves parameters, p <- p - lr * wd * p, on decayed leaves
    np.testing.assert_allclose(
        after["layers"]["attention"]["query"]["kernel"],
        before["layers"]["attention"]["query"]["kernel"] * (1 - 1e-2 * 0.1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        after["word_embeddings"]["embedding"], before["word_embeddings"]["embedding"] * (1 - 1e-2 * 0.1), rtol=1e-6
    )
    ln = before["layers"]["input_layernorm"]["scale"]
    np.testing.assert_array_equal(after["layers"]["input_layernorm"]["scale"], ln)
    # global-norm clipping: gradients of norm 100 enter Adam's first moment at norm 1.0
    state = trainer.init_state(0)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), state.params)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
    grads = jax.tree_util.tree_map(lambda g: g * 100.0 / norm, grads)
    new, m = trainer.update(state, grads, jnp.float32(0), jnp.float32(1), lr)
    assert float(m["grad_norm"]) == pytest.approx(100.0, rel=1e-4)
    mu = new.opt_state.inner_state[1].mu
    mu_norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(mu))))
    assert mu_norm == pytest.approx((1 - 0.9) * 1.0, rel=1e-4)


def test_accumulated_passes_equal_one_big_batch():
    c = case.config(num_layers=2)
    mesh = sh.make_mesh("1x1", jax.devices()[:1])
    batch = case.local_rows()  # 8 sequences
    big = Trainer(c, OptimConfig(peak_lr=1e-3), mesh, 8)
    small = Trainer(c, OptimConfig(peak_lr=1e-3), mesh, 4)
    lr, alpha = jnp.float32(1e-3), jnp.float32(1.0)
    state = small.init_state(0)
    rng, scale = small.step_rng(state), state.loss_scale.scale
    g_big, loss_big, n_big = big.grad_pass(state.params, big.place_batch(batch), rng, alpha, scale)
    grads = loss = n = None
    for half in (slice(0, 4), slice(4, 8)):
        g, ls, k = small.grad_pass(
            state.params, small.place_batch({k: v[half] for k, v in batch.items()}), rng, alpha, scale
        )
        grads = g if grads is None else small.accumulate(grads, g)
        loss, n = (ls, k) if loss is None else (loss + ls, n + k)
    assert float(n) == float(n_big) and float(loss) == pytest.approx(float(loss_big), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_big)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    # and the update: the normalised loss and gradient norm match the big batch's
    s_small, m_small = small.update(state, grads, loss, n, lr)
    assert float(m_small["loss"]) == pytest.approx(float(loss_big / n_big), rel=1e-6)
    g_norm = float(jnp.sqrt(sum(jnp.sum((g / n_big) ** 2) for g in jax.tree_util.tree_leaves(g_big))))
    assert float(m_small["grad_norm"]) == pytest.approx(g_norm, rel=1e-5)


def test_loss_scale_hysteresis():
    cfg = OptimConfig(loss_scale_init=2.0**16, loss_scale_window=3, loss_scale_hysteresis=2)
    s = LossScale.create(cfg, dynamic=True)
    trace = []
    for finite in (False, False, False, True, True, True, False):
        s = s.update(jnp.bool_(finite), cfg, True)
        trace.append(float(s.scale))
    # 1st overflow: hysteresis absorbs it; 2nd and 3rd: halve; 3 finite steps: double, hysteresis restored
    assert trace == [2.0**16, 2.0**15, 2.0**14, 2.0**14, 2.0**14, 2.0**15, 2.0**15]
    assert float(LossScale.create(cfg, dynamic=False).update(jnp.bool_(False), cfg, False).scale) == 1.0


def _skips_at_the_start(cfg: OptimConfig, ceiling: float, steps: int = 40) -> tuple[int, float]:
    """(skipped steps, final scale) of `steps` steps whose gradients overflow above `ceiling`."""
    s, skipped, consecutive = LossScale.create(cfg, dynamic=True), 0, 0
    for _ in range(steps):
        finite = float(s.scale) <= ceiling
        s = s.update(jnp.bool_(finite), cfg, True, skipped, consecutive)
        skipped, consecutive = skipped + (not finite), 0 if finite else consecutive + 1
    return skipped, float(s.scale)


@pytest.mark.parametrize("ceiling", [2.0**k for k in (3, 7, 10, 15, 16, 20)])
def test_the_fine_tuning_start_skips_one_step_where_megatron_skips_one_a_halving_and_one_more(ceiling):
    """From 2^7 the scale doubles every finite step up to 2^16; the first overflow halves it at
    once. Megatron's start (2^16, hysteresis 2) skips a step for every halving down to the
    ceiling and one more, the overflow its hysteresis absorbs (ChatGLM2-6B's 2^15: two steps,
    the fine-tuning start one)."""
    megatron, start = OptimConfig(), OptimConfig(**FINETUNE_LOSS_SCALE)
    halvings = max(0, int(np.log2(2.0**16 / ceiling)))
    assert _skips_at_the_start(megatron, ceiling) == (halvings + (halvings > 0), min(ceiling, 2.0**16))
    below_start = max(0, int(np.log2(2.0**7 / ceiling)))
    want = 0 if ceiling >= 2.0**16 else (1 if ceiling >= 2.0**7 else below_start)
    assert _skips_at_the_start(start, ceiling) == (want, min(ceiling, 2.0**16))


def test_after_the_fine_tuning_start_megatrons_rule_holds():
    cfg = OptimConfig(loss_scale_window=3, **FINETUNE_LOSS_SCALE)
    s = LossScale.create(cfg, dynamic=True)
    trace = []
    skips = ((0, 0), (0, 0), (1, 1), (2, 2), (2, 0), (2, 0), (2, 0), (3, 1), (4, 2))  # before each step
    for finite, (skipped, consecutive) in zip((True, False, False, True, True, True, False, False, True), skips):
        s = s.update(jnp.bool_(finite), cfg, True, skipped, consecutive)
        trace.append(float(s.scale))
    # 2^7 -> 2^8; two overflows halve at once; three finite steps double; then Megatron's
    # hysteresis absorbs an overflow and halves at the second
    assert trace == [2.0**8, 2.0**7, 2.0**6, 2.0**6, 2.0**6, 2.0**7, 2.0**7, 2.0**6, 2.0**6]


@pytest.fixture(scope="module")
def fp16_lora():
    """A tiny fp16 base (weights and compute) with LoRA, and its batch."""
    c = get_config("glm-tiny", dtype="float16", param_dtype="float16", num_layers=2, vocab_size=256)
    peft = PeftConfig("lora")
    config = peft.model_config(c)
    frozen = split(init_params(c, jax.random.key(0)), peft, config)[1]
    rng = np.random.default_rng(0)
    prefix = (np.arange(12)[None] < 5).repeat(2, 0)
    batch = dict(
        tokens=rng.integers(5, 200, (2, 12)),
        targets=rng.integers(5, 200, (2, 12)),
        loss_mask=1 - prefix,
        position_ids=np.broadcast_to(np.arange(12), (2, 12)),
        block_position_ids=np.zeros((2, 12)),
        segment_ids=np.ones((2, 12)),
        prefix_mask=prefix,
    )
    return config, peft, frozen, {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _fp16_skips(fp16_lora, steps: int, **optim) -> tuple[int, list]:
    config, peft, frozen, batch = fp16_lora
    lr = 5e-3
    cfg = OptimConfig(peak_lr=lr, init_lr=lr, min_lr_ratio=1.0, **optim)
    trainer = Trainer(config, cfg, sh.make_mesh("1x1", jax.devices()[:1]), 2, peft=peft)
    trainer.set_frozen(frozen)
    scales = []
    with trainer.context():
        state = trainer.init_state(0)
        for _ in range(steps):
            state, metrics = trainer.fused_step(state, batch, jnp.float32(lr), jnp.float32(1.0))
            scales.append(float(metrics["loss_scale"]))
    return int(state.skipped), scales


@pytest.mark.slow
def test_fp16_lora_on_a_tiny_base_skips_one_step_at_the_start_where_megatrons_skips_four(fp16_lora):
    """The tiny fp16 base's ceiling is about 2^19, above 2^16: there neither start skips a step
    (test_peft's fp16 test). With the target scale 2^22, above the ceiling as a base with larger
    gradients has it, Megatron's start skips four steps, the fine-tuning start one, on its way up."""
    above = dict(loss_scale_init=2.0**22)
    skipped, scales = _fp16_skips(fp16_lora, 16, **above)
    assert skipped == 4 and scales[4:] == [2.0**19] * 12, scales
    skipped, scales = _fp16_skips(fp16_lora, 16, loss_scale_start=2.0**7, **above)
    assert skipped == 1 and scales == [2.0**k for k in range(7, 21)] + [2.0**19] * 2, scales


@pytest.mark.slow
def test_fp16_non_finite_steps_are_skipped():
    c = case.config(num_layers=2, dtype="float16")
    t = Trainer(c, OptimConfig(loss_scale_hysteresis=2), sh.make_mesh("1x1", jax.devices()[:1]), 8)
    state = t.init_state(0)
    assert float(state.loss_scale.scale) == 2.0**16
    before_params = jax.device_get(state.params)
    before_opt = jax.device_get(state.opt_state.inner_state)  # (the lr hyperparameter is an input, not state)
    bad = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.inf), state.params)
    scales = []
    for _ in range(3):
        state, m = t.update(
            state, jax.tree_util.tree_map(jnp.copy, bad), jnp.float32(1), jnp.float32(1), jnp.float32(1e-3)
        )
        assert not bool(m["finite"])
        scales.append(float(state.loss_scale.scale))
    assert scales == [2.0**16, 2.0**15, 2.0**14]
    assert int(state.skipped) == 3 and int(state.consecutive_skips) == 3 and int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(before_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state.inner_state), jax.tree_util.tree_leaves(before_opt)):
        np.testing.assert_array_equal(a, b)
    # a real fp16 step with the scale applied is finite and resets the run of skips
    state, m = t.fused_step(state, t.place_batch(case.local_rows()), jnp.float32(1e-3), jnp.float32(1.0))
    assert bool(m["finite"]) and int(state.consecutive_skips) == 0
