"""GLM's autoregressive blank infilling: [MASK], [gMASK] and MIP samples, packed into sequences.

A sample turns a window of text into part A (the window with each masked span replaced by one
mask token; bidirectional) and part B (each span as `sop + span` inputs with `span + eop`
targets, spans in shuffled order; causal). Samples are packed into sequences of the batch
contract (docs/design.md#the-batch-contract), all int32 [L]:

    tokens, targets, loss_mask, position_ids, block_position_ids, segment_ids, prefix_mask

Positions (docs/reference.md sections 3-4). 1D (GLM-130B): part A counts 0, 1, ...; part B of a [MASK]
span sits at its mask token's position; part B of [gMASK] (and MIP) continues the count
(sop at gMASK + 1). 2D (GLM, ChatGLM-6B): part B sits at its mask token's position with block
positions 1, 2, ... from sop on; part A block positions are 0.

Every sequence is a pure function of (seed, index): `SequenceBuilder.build(index)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from glm_jax.tokenizer import GLM_IDS, SpecialIds

CONTRACT_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")
KIND_MASK, KIND_GMASK, KIND_MIP = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The GLM-130B objective knobs (docs/reference.md#4-pre-training-objective; reference names in comments)."""

    mask_ratio: float = 0.15  # mask_prob: share of each [MASK] window masked
    span_lambda: float = 3.0  # average_block_length: Poisson lambda of span lengths
    max_span: int = 39  # spans drawn from the Poisson pmf restricted to 1..max_span
    mask_sequence_prob: float = 0.3  # 1 - gpt_prob: share of self-supervised sequences with [MASK]
    samples_per_sequence: int = 4  # aggregated_samples_per_sequence for [MASK]
    gmask_min_ratio: float = 0.2  # masked share of a [gMASK] window ~ U(min, max)
    gmask_max_ratio: float = 1.0
    multitask_ratio: float = 0.05  # share of sequences (~tokens) that are MIP
    position_encoding_2d: bool = False

    def __post_init__(self):
        checks = [
            (0 < self.mask_ratio < 0.5, f"mask_ratio={self.mask_ratio} must be in (0, 0.5)"),
            (self.span_lambda > 0 and self.max_span >= 1, "span_lambda must be > 0 and max_span >= 1"),
            (0 <= self.mask_sequence_prob <= 1, f"mask_sequence_prob={self.mask_sequence_prob} not in [0, 1]"),
            (self.samples_per_sequence >= 1, "samples_per_sequence must be >= 1"),
            (
                0 < self.gmask_min_ratio <= self.gmask_max_ratio <= 1,
                f"need 0 < gmask_min_ratio <= gmask_max_ratio <= 1, got {self.gmask_min_ratio}, {self.gmask_max_ratio}",
            ),
            (0 <= self.multitask_ratio <= 1, f"multitask_ratio={self.multitask_ratio} not in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @functools.cached_property
    def span_cdf(self) -> np.ndarray:
        k = np.arange(1, self.max_span + 1)
        log_pmf = k * math.log(self.span_lambda) - self.span_lambda - np.array([math.lgamma(i + 1) for i in k])
        pmf = np.exp(log_pmf)
        return np.cumsum(pmf / pmf.sum())

    @functools.cached_property
    def mean_span(self) -> float:
        cdf = self.span_cdf
        return float(np.sum(np.arange(1, self.max_span + 1) * np.diff(cdf, prepend=0.0)))


# ---- one sample ---------------------------------------------------------------------------------
def _assemble(
    part_a: np.ndarray,
    spans: Sequence[np.ndarray],
    mask_pos: Sequence[int],
    two_d: bool,
    continue_positions: bool,
    ids: SpecialIds,
) -> dict[str, np.ndarray]:
    """Part A + part B (spans in the given order) -> per-token arrays (no segment ids yet)."""
    a = len(part_a)
    toks, tgts, pos, blk = [part_a], [np.zeros(a, np.int32)], [np.arange(a, dtype=np.int32)], [np.zeros(a, np.int32)]
    next_pos = a
    for span, mp in zip(spans, mask_pos):
        k = len(span) + 1
        toks.append(np.concatenate([[ids.sop], span]).astype(np.int32))
        tgts.append(np.concatenate([span, [ids.eop]]).astype(np.int32))
        if continue_positions and not two_d:
            pos.append(np.arange(next_pos, next_pos + k, dtype=np.int32))
            next_pos += k
        else:
            pos.append(np.full(k, mp, np.int32))
        blk.append(np.arange(1, k + 1, dtype=np.int32) if two_d else np.zeros(k, np.int32))
    n = sum(len(t) for t in toks)
    prefix = np.zeros(n, np.int32)
    prefix[:a] = 1
    loss = 1 - prefix
    return dict(
        tokens=np.concatenate(toks),
        targets=np.concatenate(tgts),
        loss_mask=loss,
        position_ids=np.concatenate(pos),
        block_position_ids=np.concatenate(blk),
        prefix_mask=prefix,
    )


def draw_span_lengths(rng: np.random.Generator, cfg: ObjectiveConfig, sample_len: int) -> np.ndarray:
    """Span lengths for a [MASK] sample of `sample_len` tokens after corruption.

    With m spans the window holds n = sample_len - 2m tokens (each span adds one mask token to
    part A and one sop to part B); spans are drawn until they cover mask_ratio of that window.
    """
    cdf = cfg.span_cdf
    budget = int(cfg.mask_ratio * sample_len / cfg.mean_span * 2) + 8
    lengths = np.searchsorted(cdf, rng.random(budget), side="right") + 1
    lengths = np.minimum(lengths, cfg.max_span)
    m = np.arange(1, budget + 1)
    done = np.cumsum(lengths) >= cfg.mask_ratio * (sample_len - 2 * m)
    return lengths[: int(np.argmax(done)) + 1] if done.any() else lengths


def mask_sample(
    window: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, two_d: bool, ids: SpecialIds = GLM_IDS
):
    """[MASK]: spans of `lengths` placed at random (one unmasked token at least between two).

    window: [n] int -> (arrays of length n + 2m, the window).
    """
    n, m, covered = len(window), len(lengths), int(lengths.sum())
    free = n - covered - (m - 1)
    if free < 0:
        raise ValueError(f"window of {n} tokens cannot hold {m} spans of {covered} tokens")
    places = np.sort(rng.integers(0, free + 1, size=m))
    starts = places + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
    mask_token = np.array([ids.mask], np.int32)
    pieces, spans, mask_pos = [], [], []
    prev = a_len = 0
    for s, ln in zip(starts, lengths):
        pieces += [window[prev:s], mask_token]
        a_len += s - prev
        mask_pos.append(a_len)
        a_len += 1
        spans.append(window[s : s + ln])
        prev = s + ln
    pieces.append(window[prev:])
    part_a = np.concatenate(pieces).astype(np.int32)
    order = rng.permutation(m)
    return _assemble(part_a, [spans[j] for j in order], [mask_pos[j] for j in order], two_d, False, ids)


def gmask_sample(window: np.ndarray, masked: int, two_d: bool, ids: SpecialIds = GLM_IDS):
    """[gMASK]: keep the first n - masked tokens, then [gMASK]; part B generates the rest."""
    keep = len(window) - masked
    part_a = np.concatenate([window[:keep], [ids.gmask]]).astype(np.int32)
    return _assemble(part_a, [window[keep:]], [keep], two_d, True, ids)


def mip_sample(prompt: np.ndarray, target: np.ndarray, two_d: bool, ids: SpecialIds = GLM_IDS):
    """MIP: an instruction pair built like [gMASK]: prompt + [gMASK] | sop + target -> target + eop."""
    part_a = np.concatenate([prompt, [ids.gmask]]).astype(np.int32)
    return _assemble(part_a, [np.asarray(target, np.int32)], [len(prompt)], two_d, True, ids)


def pack(samples: Sequence[dict], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate samples with segment ids 1, 2, ... and pad to seq_len (padding: all zeros)."""
    out = {k: np.zeros(seq_len, np.int32) for k in CONTRACT_KEYS}
    at = 0
    for i, s in enumerate(samples, start=1):
        n = len(s["tokens"])
        if at + n > seq_len:
            raise ValueError(f"samples of {at + n} tokens do not fit a sequence of {seq_len}")
        for k in CONTRACT_KEYS:
            out[k][at : at + n] = i if k == "segment_ids" else s[k]
        at += n
    return out


# ---- a sequence from (seed, index) --------------------------------------------------------------
WindowFn = Callable[[np.random.Generator, int], np.ndarray]  # (rng, n) -> n tokens of text


@dataclasses.dataclass
class SequenceBuilder:
    """Builds sequence `index` of the mixture as a pure function of (seed, index).

    window: draws n consecutive tokens of the corpus; instructions: (prompt, target) id pairs
    for MIP (None or empty: no MIP).
    """

    window: WindowFn
    seq_len: int
    seed: int
    cfg: ObjectiveConfig = ObjectiveConfig()
    instructions: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
    ids: SpecialIds = GLM_IDS  # the special ids of the tokenizer the corpus was encoded with
    causal: bool = False  # a causal family: no bidirectional part A (prefix_mask all zero)

    def __post_init__(self):
        sample_len = self.seq_len // self.cfg.samples_per_sequence
        if sample_len < 16 or self.seq_len < 16:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for {self.cfg.samples_per_sequence} "
                "[MASK] samples of at least 16 tokens"
            )

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def build(self, index: int, with_original: bool = False) -> dict[str, np.ndarray]:
        """The contract arrays of sequence `index` ([seq_len] each) plus `kind`; with_original adds
        `original` / `original_segment_ids` (each segment's uncorrupted window, in order)."""
        rng = self.rng(index)
        two_d = self.cfg.position_encoding_2d
        if self.instructions and rng.random() < self.cfg.multitask_ratio:
            kind, samples, originals = KIND_MIP, *self._mip(rng, two_d)
        elif rng.random() < self.cfg.mask_sequence_prob:
            kind, samples, originals = KIND_MASK, *self._mask(rng, two_d)
        else:
            n = self.seq_len - 2
            lo = max(1, math.ceil(self.cfg.gmask_min_ratio * n))
            masked = int(rng.integers(lo, max(lo, int(self.cfg.gmask_max_ratio * n)) + 1))
            window = self.window(rng, n)
            kind, samples, originals = KIND_GMASK, [gmask_sample(window, masked, two_d, self.ids)], [window]
        out = pack(samples, self.seq_len)
        if self.causal:
            out["prefix_mask"][:] = 0
        out["kind"] = np.int32(kind)
        if with_original:
            orig, orig_seg = np.zeros(self.seq_len, np.int32), np.zeros(self.seq_len, np.int32)
            at = 0
            for i, w in enumerate(originals, start=1):
                orig[at : at + len(w)], orig_seg[at : at + len(w)] = w, i
                at += len(w)
            out["original"], out["original_segment_ids"] = orig, orig_seg
        return out

    def _mask(self, rng, two_d):
        sample_len = self.seq_len // self.cfg.samples_per_sequence
        samples, originals = [], []
        for _ in range(self.cfg.samples_per_sequence):
            lengths = draw_span_lengths(rng, self.cfg, sample_len)
            window = self.window(rng, sample_len - 2 * len(lengths))
            samples.append(mask_sample(window, lengths, rng, two_d, self.ids))
            originals.append(window)
        return samples, originals

    def _mip(self, rng, two_d):
        samples, originals, used = [], [], 0
        while True:
            prompt, target = self.instructions[int(rng.integers(len(self.instructions)))]
            prompt, target = _fit_pair(prompt, target, self.seq_len)
            n = len(prompt) + len(target) + 2
            if used + n > self.seq_len:
                break
            samples.append(mip_sample(prompt, target, two_d, self.ids))
            originals.append(np.concatenate([prompt, target]).astype(np.int32))
            used += n
        return samples, originals


def _fit_pair(prompt: np.ndarray, target: np.ndarray, budget: int):
    """Trim a pair to fit `budget` tokens with its [gMASK] and sop: the target keeps up to
    half the budget, the prompt keeps its end (the part next to the answer)."""
    room = budget - 2
    if len(prompt) + len(target) <= room:
        return prompt, target
    target = target[: max(room // 2, room - len(prompt))]
    prompt = prompt[len(prompt) - (room - len(target)) :] if room > len(target) else prompt[:0]
    return prompt, target


def mixture_statistics(seqs: dict[str, np.ndarray], ids: SpecialIds = GLM_IDS) -> dict[str, float]:
    """Measured statistics of built sequences (stacked [N, L] arrays with `kind` [N]).

    masked_fraction: span tokens / window tokens over [MASK] samples; mean_span_length;
    gmask_share: [gMASK] share of self-supervised sequences; mip_token_share: MIP share of
    non-padding tokens; padding_fraction: padding share of all positions.
    """
    kind, seg, prefix = seqs["kind"], seqs["segment_ids"], seqs["prefix_mask"]
    real = seg > 0
    part_b = real & (prefix == 0)
    spans = (seqs["tokens"] == ids.sop) & part_b
    is_mask = kind == KIND_MASK
    n_spans = spans[is_mask].sum()
    masked = part_b[is_mask].sum() - n_spans
    window = (real & (prefix == 1))[is_mask].sum() - n_spans + masked
    self_sup = (kind == KIND_MASK) | (kind == KIND_GMASK)
    return {
        "sequences": int(len(kind)),
        "masked_fraction": float(masked / max(window, 1)),
        "mean_span_length": float(masked / max(n_spans, 1)),
        "gmask_share": float((kind == KIND_GMASK).sum() / max(self_sup.sum(), 1)),
        "mip_token_share": float(real[kind == KIND_MIP].sum() / max(real.sum(), 1)),
        "padding_fraction": float(1.0 - real.mean()),
    }
