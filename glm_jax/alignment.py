"""Preference-alignment losses in pure jax.numpy: answer log-probabilities of packed pairs, the
pairwise losses of DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), SimPO (Meng et al. 2024)
and ORPO (Hong et al. 2024) as trl computes them, the reward model's pairwise loss, and PPO's
pieces (GAE, the clipped policy and value losses of trl / ColossalChat).

A preference pair is two segments of one packed row: segment 2k-1 is the chosen answer (after its
prompt), segment 2k the rejected one; only answer tokens carry `loss_mask`. Pair losses take the
per-pair sums of answer log-probabilities ([P]) and, where the method length-normalises, the
answer lengths ([P]); each returns (loss per pair [P], metrics: dict of [P] arrays). Every
computation runs in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm_jax.losses import target_logits


def token_logprobs(logits, targets):
    """log p(target) at every position: logits [B, S, V], targets [B, S] int -> [B, S] fp32."""
    logits = logits.astype(jnp.float32)
    return target_logits(logits, targets) - jax.nn.logsumexp(logits, axis=-1)


def segment_logprobs(token_logprobs, loss_mask, segment_ids, num_segments: int):
    """Per packed segment, the summed log-probabilities of its loss tokens and their count.

    token_logprobs [B, S], loss_mask [B, S], segment_ids [B, S] (1..N; 0 = padding) ->
    (sum [B, N], count [B, N]) in fp32; column k-1 is segment k (empty segments give 0, 0)."""
    one_hot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)  # [B, S, N]
    weights = jnp.where(one_hot, loss_mask[..., None].astype(jnp.float32), 0.0)
    total = jnp.einsum("bs,bsn->bn", token_logprobs.astype(jnp.float32), weights)
    return total, weights.sum(axis=1)


def split_pairs(seg_sum, seg_count):
    """Packed segments -> pairs: segment 2k-1 chosen, 2k rejected.

    seg_sum, seg_count [B, N] (N even) -> (chosen_sum, rejected_sum, chosen_count,
    rejected_count, pair_mask), each [B * N / 2]; pair_mask is 1 where both answers have tokens."""
    if seg_sum.shape[-1] % 2:
        raise ValueError(f"pairs need an even number of segments per row, got {seg_sum.shape[-1]}")
    c_sum, r_sum = seg_sum[:, 0::2].reshape(-1), seg_sum[:, 1::2].reshape(-1)
    c_n, r_n = seg_count[:, 0::2].reshape(-1), seg_count[:, 1::2].reshape(-1)
    pair_mask = ((c_n > 0) & (r_n > 0)).astype(jnp.float32)
    return c_sum, r_sum, c_n, r_n, pair_mask


def _pair_metrics(chosen_rewards, rejected_rewards):
    """Reward metrics of pairs: chosen/rejected rewards [P], their margin [P], accuracy [P]."""
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_margin": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).astype(jnp.float32),
    }


def _mean_logp(logp_sum, count):
    """Length-normalised log-probability: sum [P] / count [P] (count clamped to >= 1)."""
    return logp_sum / jnp.maximum(count, 1.0)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. eq. 7), conservative with label smoothing eps (Mitchell's cDPO, trl's
    `sigmoid` loss): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
    h = (pi_c - ref_c) - (pi_r - ref_r).

    Summed answer log-probabilities of the policy and the reference, each [P] ->
    (loss [P], metrics); rewards are beta * (pi - ref)."""
    pi_c, pi_r, ref_c, ref_r = (jnp.asarray(x, jnp.float32) for x in (pi_c, pi_r, ref_c, ref_r))
    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    return loss, _pair_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r))


def ipo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float):
    """IPO (Azar et al. eq. 17): (h - 1/(2 beta))^2 with h as in DPO on length-normalised
    log-probabilities (trl divides every answer's summed log-probability by its length for IPO).

    Summed log-probabilities [P] and answer lengths n_c, n_r [P] -> (loss [P], metrics); rewards
    are beta * (mean pi - mean ref)."""
    pi_c, ref_c = _mean_logp(pi_c, n_c), _mean_logp(ref_c, n_c)
    pi_r, ref_r = _mean_logp(pi_r, n_r), _mean_logp(ref_r, n_r)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = (h - 1.0 / (2.0 * beta)) ** 2
    return loss, _pair_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r))


def simpo_loss(pi_c, pi_r, n_c, n_r, beta: float, gamma: float):
    """SimPO (Meng et al. eq. 6), reference-free: -log sigmoid(beta/|y_c| pi_c - beta/|y_r| pi_r
    - gamma), gamma the target reward margin (trl's CPO `simpo` loss with simpo_gamma = gamma and
    no NLL term).

    Summed policy log-probabilities [P], answer lengths [P] -> (loss [P], metrics); rewards are
    beta * mean log-probability."""
    chosen = beta * _mean_logp(jnp.asarray(pi_c, jnp.float32), n_c)
    rejected = beta * _mean_logp(jnp.asarray(pi_r, jnp.float32), n_r)
    loss = -jax.nn.log_sigmoid(chosen - rejected - gamma)
    return loss, _pair_metrics(chosen, rejected)


def _log_odds(mean_logp):
    """log(p / (1 - p)) from log p < 0, stably: log p - log1p(-exp(log p))."""
    return mean_logp - jnp.log1p(-jnp.exp(mean_logp))


def orpo_loss(pi_c, pi_r, n_c, n_r, lam: float):
    """ORPO (Hong et al. eq. 6-7), reference-free, as trl's ORPOTrainer: NLL of the chosen answer
    (mean per token) + lam * -log sigmoid(log odds_c - log odds_r), log odds of the mean
    log-probability. trl's NLL is a token mean over the whole batch; here it is per pair (the
    caller weights pairs by n_c for trl's).

    Summed policy log-probabilities [P], answer lengths [P] -> (loss [P], metrics, with `nll`
    and `log_odds_ratio` besides the rewards lam * mean log-probability)."""
    mean_c = _mean_logp(jnp.asarray(pi_c, jnp.float32), n_c)
    mean_r = _mean_logp(jnp.asarray(pi_r, jnp.float32), n_r)
    log_odds_ratio = _log_odds(mean_c) - _log_odds(mean_r)
    nll = -mean_c
    loss = nll - lam * jax.nn.log_sigmoid(log_odds_ratio)
    metrics = _pair_metrics(lam * mean_c, lam * mean_r)
    metrics.update(nll=nll, log_odds_ratio=log_odds_ratio)
    return loss, metrics


def reward_pair_loss(r_c, r_r):
    """The reward model's pairwise (Bradley-Terry) loss: -log sigmoid(r_c - r_r).

    Scalar rewards r_c, r_r [P] -> (loss [P], metrics)."""
    r_c, r_r = jnp.asarray(r_c, jnp.float32), jnp.asarray(r_r, jnp.float32)
    return -jax.nn.log_sigmoid(r_c - r_r), _pair_metrics(r_c, r_r)


def gae(rewards, values, gamma: float, lam: float, mask=None):
    """Generalised advantage estimation (Schulman et al. 2016), scanned backwards over time.

    rewards [..., T]; values [..., T+1] (the last is the bootstrap value after step T-1) or
    [..., T] (bootstrap 0); mask [..., T] (1 = a step of the response; a masked step gets
    advantage 0 and ends the episode for the step before it) -> (advantages [..., T],
    returns = advantages + values [..., T]), both 0 at masked steps."""
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    T = rewards.shape[-1]
    if values.shape[-1] == T:
        values = jnp.concatenate([values, jnp.zeros_like(values[..., :1])], axis=-1)
    mask = jnp.ones_like(rewards) if mask is None else jnp.asarray(mask, jnp.float32)
    next_mask = jnp.concatenate([mask[..., 1:], jnp.ones_like(mask[..., :1])], axis=-1)
    delta = rewards + gamma * values[..., 1:] * next_mask - values[..., :-1]

    def step(carry, x):
        delta_t, mask_t = x
        adv = mask_t * (delta_t + gamma * lam * carry)
        return adv, adv

    time_first = (jnp.moveaxis(delta, -1, 0), jnp.moveaxis(mask, -1, 0))
    _, adv = jax.lax.scan(step, jnp.zeros_like(delta[..., 0]), time_first, reverse=True)
    advantages = jnp.moveaxis(adv, 0, -1)
    return advantages, (advantages + values[..., :-1]) * mask


def masked_mean(x, mask):
    """Mean of x over mask's 1s (trl's masked_mean): x, mask [...] -> scalar."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ppo_policy_loss(logp_new, logp_old, advantages, clip: float, mask):
    """PPO's clipped surrogate (Schulman et al. 2017; trl, ColossalChat): the masked mean of
    max(-A r, -A clip(r, 1-clip, 1+clip)), r = exp(logp_new - logp_old).

    Per-token arrays [..., T] -> (loss scalar, metrics: clip_fraction, approx_kl = half the mean
    squared log-ratio as trl logs it)."""
    mask = jnp.asarray(mask, jnp.float32)
    log_ratio = jnp.asarray(logp_new, jnp.float32) - jnp.asarray(logp_old, jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
    }
    return loss, metrics


def ppo_value_loss(v_new, v_old, returns, clip: float, mask):
    """PPO's clipped value loss (trl, ColossalChat): 0.5 * masked mean of
    max((v_new - R)^2, (clip(v_new, v_old - clip, v_old + clip) - R)^2).

    Per-token arrays [..., T] -> (loss scalar, metrics: clip_fraction)."""
    mask = jnp.asarray(mask, jnp.float32)
    v_new = jnp.asarray(v_new, jnp.float32)
    v_clipped = jnp.clip(v_new, v_old - clip, v_old + clip)
    unclipped = (v_new - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask)}


def kl_shaped_rewards(score, logp, ref_logp, mask, kl_coef: float):
    """PPO's per-token reward (trl's compute_rewards): -kl_coef * (logp - ref_logp) at every
    response token, plus the reward model's score at the last one.

    score [B]; logp, ref_logp, mask [B, T] -> (rewards [B, T], kl [B, T]), 0 at masked steps."""
    mask = jnp.asarray(mask, jnp.float32)
    kl = (jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)) * mask
    last = mask.shape[-1] - 1 - jnp.argmax(mask[..., ::-1], axis=-1)  # [B]: last response step
    at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32) * mask
    return -kl_coef * kl + at_last * jnp.asarray(score, jnp.float32)[..., None], kl
