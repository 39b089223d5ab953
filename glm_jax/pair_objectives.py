"""The trainer's objectives on preference pairs: DPO and its variants (IPO, SimPO, ORPO) on the
language model's answer log-probabilities, and the reward model's pairwise loss on a value head.

    objective = PairObjective("dpo", beta=0.1, num_segments=8)
    Trainer(config, optim, mesh, batch, objective=objective)   # every schedule runs it (pipeline.TokenLoss)

A row holds pairs as `preference.py` packs them: segment 2k-1 the prompt and the chosen answer,
segment 2k the same prompt and the rejected one, only answer tokens in `loss_mask`. The loss of a
batch is summed over its pairs and divided by their number (the `units`), so a step's loss is the
mean pair loss whatever the packing, as trl's mean over a batch of pairs. DPO and IPO also read
`ref_logps` [B, S]: the reference model's log-probability of each target (0 off the answers), put
beside the batch by the trainer (the frozen base, or a cache for freeze / full: `reference.py`).

The reward model's score of an answer is its value head at the answer's last position, the one
whose target is the end id: the hidden state after the whole answer (the end id itself is never
an input in our rows; ColossalChat and trl read the last input token, which there is the end id).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glm_jax import alignment
from glm_jax.config import ConfigError, GLMConfig
from glm_jax.model import GLM
from glm_jax.pipeline import hidden_states

LOSSES = ("dpo", "ipo", "simpo", "orpo")  # finetune.py --objective dpo --loss ...
REWARD = "reward"  # finetune.py --objective reward
REFERENCE_FIELD = "ref_logps"


@dataclasses.dataclass(frozen=True)
class PairObjective:
    """One pairwise objective and its knobs (the defaults are trl's and LLaMA-Factory's).

    kind: dpo | ipo | simpo | orpo | reward. beta: DPO's and IPO's beta (IPO's tau), SimPO's beta,
    ORPO's lambda (trl's ORPOConfig.beta). label_smoothing: cDPO's eps (dpo only). simpo_gamma:
    SimPO's target margin. num_segments: the most segments in a row (twice its pairs), a static
    shape; `preference.segments_needed` reads it from the data."""

    kind: str
    num_segments: int
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self):
        if self.kind not in LOSSES + (REWARD,):
            raise ConfigError(f"pairwise objective {self.kind!r}; choose one of {LOSSES + (REWARD,)}")
        if self.num_segments < 2 or self.num_segments % 2:
            raise ConfigError(f"num_segments={self.num_segments}: a row of pairs has an even number >= 2")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.kind != "dpo":
            raise ConfigError(f"label smoothing is DPO's (cDPO), not {self.kind}'s")

    @property
    def needs_reference(self) -> bool:
        """DPO and IPO compare with a reference model; SimPO, ORPO and the reward model do not."""
        return self.kind in ("dpo", "ipo")

    @property
    def extra_fields(self) -> tuple[str, ...]:
        return (REFERENCE_FIELD,) if self.needs_reference else ()

    # ---- the per-pair terms ---------------------------------------------------------------------
    def pair_losses(self, config: GLMConfig, params, h, fields):
        """h [B, S, E] (before the final norm) -> (loss [P], metrics {name: [P]}, pair_mask [P]),
        P = B x num_segments / 2."""
        n = self.num_segments
        mask, segments = fields["loss_mask"], fields["segment_ids"]
        if self.kind == REWARD:
            values = GLM(config).apply({"params": params}, h, method=GLM.values)
            scores = last_answer_values(values, mask, segments, n)
            counts = alignment.segment_logprobs(jnp.zeros_like(values), mask, segments, n)[1]
            chosen, rejected, *_, pairs = alignment.split_pairs(scores, counts)
            loss, metrics = alignment.reward_pair_loss(chosen, rejected)
            return loss, metrics, pairs
        logits = GLM(config).apply({"params": params}, h, method=GLM.head)
        policy = alignment.token_logprobs(logits, fields["targets"])
        pi_c, pi_r, n_c, n_r, pairs = alignment.split_pairs(*alignment.segment_logprobs(policy, mask, segments, n))
        # an absent pair (padding segments) gets harmless stand-ins: its loss is masked out, but a
        # log-odds of log p = 0 would be inf, and inf x 0 a NaN in the loss and its gradient
        pi_c, pi_r = (jnp.where(pairs > 0, x, -1.0) for x in (pi_c, pi_r))
        if self.kind == "simpo":
            loss, metrics = alignment.simpo_loss(pi_c, pi_r, n_c, n_r, self.beta, self.simpo_gamma)
        elif self.kind == "orpo":
            loss, metrics = alignment.orpo_loss(pi_c, pi_r, n_c, n_r, self.beta)
        else:
            reference = alignment.segment_logprobs(fields[REFERENCE_FIELD], mask, segments, n)
            ref_c, ref_r, *_ = alignment.split_pairs(*reference)
            if self.kind == "dpo":
                loss, metrics = alignment.dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta, self.label_smoothing)
            else:
                loss, metrics = alignment.ipo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, self.beta)
        return loss, metrics, pairs

    # ---- the trainer's interface (pipeline.TokenLoss) --------------------------------------------
    def head_loss(self, config: GLMConfig, params, h, fields):
        """(summed pair loss, pairs) of one microbatch."""
        loss, _, pairs = self.pair_losses(config, params, h, fields)
        return jnp.sum(loss * pairs), jnp.sum(pairs)

    def units(self, fields):
        """The pairs of fields [mb, S]: both answers hold loss tokens."""
        mask = fields["loss_mask"]
        counts = alignment.segment_logprobs(jnp.zeros(mask.shape), mask, fields["segment_ids"], self.num_segments)[1]
        return jnp.sum(alignment.split_pairs(counts, counts)[-1])

    def stats(self, config: GLMConfig, params, h, fields) -> dict:
        """Held-out sums of a batch: loss_sum, pairs, correct (chosen scored above rejected),
        margin_sum (chosen reward - rejected reward)."""
        loss, metrics, pairs = self.pair_losses(config, params, h, fields)
        return {
            "loss_sum": jnp.sum(loss * pairs),
            "pairs": jnp.sum(pairs),
            "correct": jnp.sum(metrics["accuracy"] * pairs),
            "margin_sum": jnp.sum(metrics["reward_margin"] * pairs),
        }


def held_out_metrics(sums: dict) -> dict:
    """Summed `stats` of the held-out batches -> eval_loss, eval_pair_accuracy, eval_reward_margin."""
    pairs = max(float(sums["pairs"]), 1.0)
    return {
        "eval_loss": float(sums["loss_sum"]) / pairs,
        "eval_pair_accuracy": float(sums["correct"]) / pairs,
        "eval_reward_margin": float(sums["margin_sum"]) / pairs,
        "eval_pairs": int(sums["pairs"]),
    }


def last_answer_values(values, loss_mask, segment_ids, num_segments: int):
    """Each segment's value at its last loss position: values, loss_mask, segment_ids [B, S] ->
    [B, N] fp32 (0 for a segment without loss tokens)."""
    positions = jnp.arange(values.shape[-1])
    own = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)) & (loss_mask[..., None] > 0)  # [B, S, N]
    last = jnp.max(jnp.where(own, positions[:, None], -1), axis=1)  # [B, N]
    at_last = own & (positions[:, None] == last[:, None, :])
    return jnp.einsum("bs,bsn->bn", values.astype(jnp.float32), at_last.astype(jnp.float32))


def sequence_rewards(config: GLMConfig, params, batch, num_segments: int = 1) -> jax.Array:
    """A reward model's score of each answer in a batch of SFT-laid-out rows (a prompt + answer
    per segment; params in the plain stacked layout): [B, num_segments] (`last_answer_values`)."""
    values = GLM(config).apply({"params": params}, hidden_states(params, batch, config), method=GLM.values)
    return last_answer_values(values, batch["loss_mask"], batch["segment_ids"], num_segments)
