"""Token losses: cross-entropy over a batch's loss tokens, in fp32.

Every path that trains or scores (the plain model, both pipeline schedules, evaluation) divides
the summed loss by the global count of loss tokens, never a mean of per-row means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm_jax.layers import context_shards


def token_loss(logits, batch):
    """Cross-entropy summed over loss tokens / their global count (not a mean of means).

    Returns (loss, number of loss tokens)."""
    loss_sum, n = token_loss_sum(logits, batch)
    return loss_sum / jnp.maximum(n, 1.0), n


def token_loss_sum(logits, batch):
    """(summed cross-entropy over loss tokens, their count) of logits [..., V] in fp32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = target_logits(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((logz - gold) * mask), mask.sum()


def target_logits(logits, targets):
    """The logit of each target: logits [..., V], targets [...] int -> [...] (logits' dtype)."""
    if context_shards() > 1:
        # the target's logit as a masked sum over the vocabulary (exact: one nonzero term), not a
        # gather: XLA's partitioner fails on a gather over a vocabulary split over `tensor` inside
        # the pipeline's per-stage programs when a `context` axis is automatic beside it
        hit = jnp.arange(logits.shape[-1]) == targets[..., None]
        return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
