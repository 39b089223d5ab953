"""glm_jax.alignment: every loss against a float64 numpy transcription of its paper's formula,
GAE against a plain loop, PPO's clipping at its boundaries, and a packed pair's answer
log-probabilities against each answer scored alone by a tiny GLM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward

from glm_jax import alignment as al
from glm_jax.config import get_config
from glm_jax.model import init_params

P = 16
TOL = dict(rtol=1e-6, atol=1e-6)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture(scope="module")
def pairs():
    """Random summed answer log-probabilities (policy, reference) and lengths of P pairs."""
    rng = np.random.default_rng(0)
    n_c, n_r = rng.integers(1, 20, P).astype(np.float64), rng.integers(1, 20, P).astype(np.float64)
    pi_c, pi_r = -n_c * rng.uniform(0.2, 3.0, P), -n_r * rng.uniform(0.2, 3.0, P)
    ref_c, ref_r = pi_c + rng.normal(0, 1, P), pi_r + rng.normal(0, 1, P)
    return dict(pi_c=pi_c, pi_r=pi_r, ref_c=ref_c, ref_r=ref_r, n_c=n_c, n_r=n_r)


def check(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL)


def test_dpo_matches_formula(pairs):
    beta, eps = 0.3, 0.1
    d = pairs
    h = (d["pi_c"] - d["ref_c"]) - (d["pi_r"] - d["ref_r"])
    want = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    loss, m = al.dpo_loss(d["pi_c"], d["pi_r"], d["ref_c"], d["ref_r"], beta, eps)
    check(loss, want)
    check(m["reward_margin"], beta * h)
    check(m["accuracy"], (h > 0).astype(np.float64))


def test_dpo_policy_equal_reference_is_log2(pairs):
    d = pairs
    loss, m = al.dpo_loss(d["pi_c"], d["pi_r"], d["pi_c"], d["pi_r"], 0.1)
    np.testing.assert_array_equal(np.asarray(loss), np.float32(np.log(2.0)))
    np.testing.assert_array_equal(np.asarray(m["accuracy"]), 0.0)


def test_dpo_label_smoothing_symmetric(pairs):
    d = pairs
    args = (d["pi_c"], d["pi_r"], d["ref_c"], d["ref_r"])
    swapped = (d["pi_r"], d["pi_c"], d["ref_r"], d["ref_c"])
    # eps and 1 - eps with chosen and rejected swapped are the same loss; at 0.5 it is even in h
    check(al.dpo_loss(*args, 0.5, 0.2)[0], np.asarray(al.dpo_loss(*swapped, 0.5, 0.8)[0], np.float64))
    check(al.dpo_loss(*args, 0.5, 0.5)[0], np.asarray(al.dpo_loss(*swapped, 0.5, 0.5)[0], np.float64))


def test_ipo_matches_formula(pairs):
    beta, d = 0.5, pairs
    h = (d["pi_c"] - d["ref_c"]) / d["n_c"] - (d["pi_r"] - d["ref_r"]) / d["n_r"]
    loss, m = al.ipo_loss(d["pi_c"], d["pi_r"], d["ref_c"], d["ref_r"], d["n_c"], d["n_r"], beta)
    check(loss, (h - 1 / (2 * beta)) ** 2)
    check(m["reward_margin"], beta * h)


def test_simpo_matches_formula(pairs):
    beta, gamma, d = 2.0, 0.5, pairs
    margin = beta * d["pi_c"] / d["n_c"] - beta * d["pi_r"] / d["n_r"]
    loss, m = al.simpo_loss(d["pi_c"], d["pi_r"], d["n_c"], d["n_r"], beta, gamma)
    check(loss, -log_sigmoid(margin - gamma))
    check(m["reward_margin"], margin)


def test_orpo_matches_formula(pairs):
    lam, d = 0.1, pairs
    mean_c, mean_r = d["pi_c"] / d["n_c"], d["pi_r"] / d["n_r"]
    odds_c, odds_r = np.exp(mean_c) / (1 - np.exp(mean_c)), np.exp(mean_r) / (1 - np.exp(mean_r))
    want = -mean_c - lam * log_sigmoid(np.log(odds_c / odds_r))
    loss, m = al.orpo_loss(d["pi_c"], d["pi_r"], d["n_c"], d["n_r"], lam)
    check(loss, want)
    check(m["log_odds_ratio"], np.log(odds_c / odds_r))


def test_orpo_stable_near_certainty():
    """A mean log-probability of -1e-6 (p ~ 1) keeps finite log odds (log1p(-exp(x)))."""
    loss, m = al.orpo_loss(np.array([-1e-6]), np.array([-2.0]), np.array([1.0]), np.array([1.0]), 0.1)
    assert np.isfinite(np.asarray(loss)).all() and np.asarray(m["log_odds_ratio"])[0] > 10


def test_reward_pair_loss(pairs):
    r_c, r_r = pairs["pi_c"] / 10, pairs["pi_r"] / 10
    loss, m = al.reward_pair_loss(r_c, r_r)
    check(loss, -log_sigmoid(r_c - r_r))
    check(m["accuracy"], (r_c > r_r).astype(np.float64))


def gae_loop(rewards, values, gamma, lam, mask):
    """trl's backward loop (rewards and values masked, bootstrap values[T] after the last step)."""
    T = len(rewards)
    values = np.append(values, 0.0) if len(values) == T else np.asarray(values)
    adv, last = np.zeros(T), 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] * (mask[t + 1] if t + 1 < T else 1.0)
        delta = rewards[t] + gamma * next_value - values[t]
        last = mask[t] * (delta + gamma * lam * last)
        adv[t] = last
    return adv, (adv + values[:T]) * mask


@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_loop(bootstrap):
    rng = np.random.default_rng(1)
    T = 9
    rewards, values = rng.normal(size=(3, T)), rng.normal(size=(3, T + bootstrap))
    mask = np.ones((3, T))
    mask[1, 6:] = 0  # an answer that ended early (right padding)
    mask[2, :2] = 0  # steps before the answer
    adv, ret = al.gae(rewards, values, 0.95, 0.9, mask)
    for b in range(3):
        want_adv, want_ret = gae_loop(rewards[b], values[b], 0.95, 0.9, mask[b])
        check(adv[b], want_adv)
        check(ret[b], want_ret)


def test_ppo_policy_clipping():
    clip = 0.2
    logp_old = np.zeros(6)
    ratio = np.array([1.5, 1.5, 0.5, 0.5, 1.19, 1.21])
    adv = np.array([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    loss_per = np.array([-1.2, 1.5, -0.5, 0.8, -1.19, -1.2])  # clipped only where it lowers the gain
    loss, m = al.ppo_policy_loss(np.log(ratio), logp_old, adv, clip, np.ones(6))
    np.testing.assert_allclose(float(loss), loss_per.mean(), rtol=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(3 / 6)
    # the gradient vanishes exactly where the clipped branch wins
    grad = jax.grad(lambda lp: al.ppo_policy_loss(lp, logp_old, adv, clip, np.ones(6))[0])(jnp.log(ratio))
    np.testing.assert_array_equal(np.asarray(grad) == 0, [True, False, False, True, False, True])


def test_ppo_value_clipping():
    clip = 0.5
    v_old, returns = np.zeros(4), np.array([2.0, 2.0, -1.0, 0.2])
    v_new = np.array([1.0, 3.0, 0.4, 0.5])
    clipped = np.clip(v_new, v_old - clip, v_old + clip)
    want = 0.5 * np.maximum((v_new - returns) ** 2, (clipped - returns) ** 2)
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    loss, m = al.ppo_value_loss(v_new, v_old, returns, clip, mask)
    np.testing.assert_allclose(float(loss), want[:3].mean(), rtol=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 3)


def test_kl_shaped_rewards():
    logp, ref = np.array([[-1.0, -2.0, -0.5, 0.0]]), np.array([[-1.5, -1.0, -0.5, 0.0]])
    mask = np.array([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = al.kl_shaped_rewards(np.array([3.0]), logp, ref, mask, 0.1)
    check(kl, [[0.5, -1.0, 0.0, 0.0]])
    check(rewards, [[-0.05, 0.1, 3.0, 0.0]])


@pytest.fixture(scope="module")
def tiny():
    config = get_config("glm-tiny", dtype="float32", num_layers=2, vocab_size=256)
    return config, init_params(config, jax.random.key(0))


def row(segments, length):
    """[(prompt ids, answer ids), ...] packed into one row of `length`: batch arrays [1, length],
    segment k = the k-th (prompt part A, answer causal), positions restarting at 0."""
    cols = {k: np.zeros(length, np.int32) for k in ("tokens", "targets", "loss_mask", "position_ids")}
    cols.update(segment_ids=np.zeros(length, np.int32), prefix_mask=np.zeros(length, np.int32))
    at = 0
    for k, (prompt, answer) in enumerate(segments, start=1):
        ids = np.concatenate([prompt, answer])
        n = len(ids)
        cols["tokens"][at : at + n] = ids
        cols["targets"][at : at + n - 1] = ids[1:]
        cols["loss_mask"][at + len(prompt) - 1 : at + n - 1] = 1  # positions predicting the answer
        cols["position_ids"][at : at + n] = np.arange(n)
        cols["segment_ids"][at : at + n] = k
        cols["prefix_mask"][at : at + len(prompt)] = 1
        at += n
    batch = {k: jnp.asarray(v[None]) for k, v in cols.items()}
    batch["block_position_ids"] = jnp.zeros_like(batch["tokens"])
    return batch


def answer_logprobs(config, params, batch, num_segments):
    logits = forward(config, params, {k: v for k, v in batch.items() if k not in ("targets", "loss_mask")})
    lp = al.token_logprobs(logits, batch["targets"])
    return al.segment_logprobs(lp, batch["loss_mask"], batch["segment_ids"], num_segments)


def test_packed_pair_equals_each_alone(tiny):
    config, params = tiny
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 256, 5)
    chosen, rejected = rng.integers(3, 256, 4), rng.integers(3, 256, 7)
    length = 24
    packed_sum, packed_n = answer_logprobs(config, params, row([(prompt, chosen), (prompt, rejected)], length), 2)
    for k, answer in enumerate((chosen, rejected)):
        alone_sum, alone_n = answer_logprobs(config, params, row([(prompt, answer)], length), 2)
        np.testing.assert_allclose(float(packed_sum[0, k]), float(alone_sum[0, 0]), rtol=1e-5, atol=1e-5)
        assert float(packed_n[0, k]) == float(alone_n[0, 0]) == len(answer)
    c_sum, r_sum, c_n, r_n, pair_mask = al.split_pairs(packed_sum, packed_n)
    assert c_sum.shape == (1,) and float(c_n[0]) == 4 and float(r_n[0]) == 7 and float(pair_mask[0]) == 1
