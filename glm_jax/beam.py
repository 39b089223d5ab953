"""Beam search as GLM-130B runs it (`generation/strategies.py` `BeamSearchStrategy`, with the
`deterministic` top-k, and `tasks/lambada/strategy.py`'s banned prefixes), model-agnostic.

Per step, on every open beam's next-token logits (fp32):

1. banned ids (`invalid_slices`), stop ids before `min_new_tokens`, a banned prefix's last token
   where the beam's generated tokens equal the rest of the prefix at the step the prefix would
   end, and the beam's own cached n-gram continuations get -65504, BEFORE `log_softmax` (the
   rest renormalise);
2. scores accumulate; on the first step only the first beam counts; the best
   `(max(1, len(stop)) + 1) x num_beams` (beam, token) candidates are taken in score order;
3. a candidate ending in a stop id becomes a finished beam with score / ((5 + len) / 6) ** lp,
   `len` counting the whole sequence (context, sop and the stop id); finished beams stay sorted,
   at most num_beams; the first num_beams other candidates continue, and each caches the n-gram it
   completed (key: the n-1 tokens before its new token, which may reach into the context; n-grams
   of the context alone are never banned);
4. done when num_beams beams have finished and the worst of them scores at least the best open
   score / ((5 + length + 1) / 6) ** lp.

At the end, if the search did not stop early, `consider_end` adds every open beam to the finished
ones, best first, each penalised like a finished beam (its `len` the whole sequence, no stop id),
with the same sorted insertion (a score equal to one already there goes before it) and the cut
back to num_beams, as THUDM/GLM-130B's head (212215c) does since commit 7be5ba1 ("Fix finalize in
BeamSearchStrategy"; before it, the loop ran over the batch and added one open beam for a batch of
one). Its commit 1f32e7f ("Fix first beam") applies the first-step rule to sampling as well as to
top-k; we only do top-k (`deterministic`), and our first step has a single beam anyway.
`length_norm="generated"` divides by (generated tokens) ** lp instead (HF-style), as an option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

BANNED = -65504.0  # the reference's fp16 minimum, set on logits before log_softmax

# next_logits(parents, tokens, step) -> fp32 logits [len(parents), V]: advance each new open beam
# (the continuation of open beam `parents[i]` of the previous step by `tokens[i]`) and give its
# next-token logits
NextLogits = Callable[[Sequence[int], Sequence[int], int], np.ndarray]


@dataclasses.dataclass
class BeamSearch:
    num_beams: int
    stop_tokens: tuple[int, ...]
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0
    banned_ids: Sequence[int] = ()
    banned_prefixes: Sequence[Sequence[int]] = ()
    min_new_tokens: int = 0
    consider_end: bool = True
    length_norm: str = "opennmt"  # "opennmt": ((5 + whole length) / 6) ** lp; "generated": new tokens ** lp

    def __post_init__(self):
        if self.length_norm not in ("opennmt", "generated"):
            raise ValueError(f"length_norm={self.length_norm!r}; choose opennmt or generated")

    def _penalized(self, score: float, length: int, context: int) -> float:
        if self.length_norm == "generated":
            return score / max(length - context, 1) ** self.length_penalty
        return score / ((5.0 + length) / 6) ** self.length_penalty

    def _ban(self, logits: np.ndarray, beams: list[list[int]], step: int, context: int) -> None:
        if self.banned_ids:
            logits[:, list(self.banned_ids)] = BANNED
        if step < self.min_new_tokens:
            logits[:, list(self.stop_tokens)] = BANNED
        for prefix in self.banned_prefixes:
            if step != len(prefix) - 1:
                continue
            for r, seq in enumerate(beams):
                if len(prefix) == 1 or seq[len(seq) - len(prefix) + 1 :] == list(prefix[:-1]):
                    logits[r, prefix[-1]] = BANNED
        n = self.no_repeat_ngram
        if n and len(beams[0]) > n:
            for r, seq in enumerate(beams):
                for t in self._bans[r].get(_key(seq, n), ()):
                    logits[r, t] = BANNED

    def run(
        self, context: Sequence[int], next_logits: NextLogits, max_new_tokens: int
    ) -> list[tuple[list[int], float]]:
        """context: the model-ready prompt up to and including its start id (sop). -> finished
        beams best first as (generated ids, ending with the stop id when the beam ended; score)."""
        context = [int(t) for t in context]
        n_ctx = len(context)
        beams, scores = [context], np.zeros(1, np.float32)
        self._bans: list[dict] = [{}]
        finished: list[tuple[float, list[int]]] = []
        k = (max(1, len(self.stop_tokens)) + 1) * self.num_beams
        stops = set(self.stop_tokens)
        parents, tokens, done = [0], [context[-1]], False
        for step in range(max_new_tokens):
            logits = np.array(next_logits(parents, tokens, step), np.float32)
            self._ban(logits, beams, step, n_ctx)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            total = (scores[:, None] + logp).reshape(-1)
            vocab = logits.shape[-1]
            order = np.argsort(-total, kind="stable")[:k]
            new_beams, new_scores, new_bans, parents, tokens = [], [], [], [], []
            for idx in order:
                r, t = divmod(int(idx), vocab)
                seq = beams[r] + [t]
                if t in stops:
                    self._finish(finished, float(total[idx]), seq, n_ctx)
                elif len(new_beams) < self.num_beams:
                    new_beams.append(seq)
                    new_scores.append(total[idx])
                    parents.append(r)
                    tokens.append(t)
                    if self.no_repeat_ngram:
                        bans = dict(self._bans[r])
                        key = _key(beams[r], self.no_repeat_ngram)
                        bans[key] = bans.get(key, ()) + (t,)
                        new_bans.append(bans)
                    else:
                        new_bans.append({})
                else:
                    break
            length = len(beams[0])
            if not new_beams:
                done = True
                break
            beams, scores, self._bans = new_beams, np.array(new_scores, np.float32), new_bans
            if len(finished) == self.num_beams and finished[-1][0] >= self._penalized(
                float(scores.max()), length + 1, n_ctx
            ):
                done = True
                break
        if self.consider_end and not done:  # every open beam, best first (the reference's finalize)
            for score, seq in zip(scores, beams):
                self._finish(finished, float(score), seq, n_ctx)
        return [(seq[n_ctx:], score) for score, seq in finished]

    def _finish(self, finished, score, seq, n_ctx):
        score = self._penalized(score, len(seq), n_ctx)
        at = len(finished)
        while at > 0 and score >= finished[at - 1][0]:  # before equal scores, as the reference inserts
            at -= 1
        finished.insert(at, (score, seq))
        del finished[self.num_beams :]


def _key(seq: Sequence[int], n: int) -> tuple[int, ...]:
    """The n-1 tokens before a new token (the reference's ngram_prefix)."""
    return tuple(seq[len(seq) - n + 1 :]) if n > 1 else tuple(seq)
