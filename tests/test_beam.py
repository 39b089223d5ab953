"""GLM-130B's beam search on a hand-made next-token table: every beam, score and order below is
derived by hand from the rules of docs/reference.md#7-evaluation-protocols."""

import math

import numpy as np
import pytest

from glm_jax.beam import BeamSearch

V, STOP = 10, 9


def table_model(rows: dict[int, dict[int, float]]):
    """next_logits for a model whose next-token distribution depends on the last token only:
    rows[last] = {token: probability} (the rest share what is left)."""

    def logits_after(last):
        p = np.full(V, 1e-9)
        for t, q in rows.get(last, {}).items():
            p[t] = q
        return np.log(p / p.sum())

    state = {"beams": None}

    def next_logits(parents, tokens, step):
        prev = state["beams"] or [[]]
        state["beams"] = [prev[r] + [t] for r, t in zip(parents, tokens)]
        return np.stack([logits_after(seq[-1]) for seq in state["beams"]]).astype(np.float32)

    return next_logits


def test_beams_scores_order_and_early_stop_by_hand():
    model = table_model(
        {0: {1: 0.5, 2: 0.3, STOP: 0.2}, 1: {STOP: 0.6, 3: 0.4}, 2: {STOP: 0.9, 3: 0.1}, 3: {STOP: 0.99}}
    )
    search = BeamSearch(num_beams=2, stop_tokens=(STOP,), length_penalty=1.0)
    got = search.run([5, 6, 0], model, max_new_tokens=5)
    # step 0: 1 and 2 continue, [9] finishes at length 4: log .2 / 1.5 (then dropped: 2 better ones)
    # step 1: [1, 9] = (log .5 + log .6) / (10/6), [2, 9] = (log .3 + log .9) / (10/6) finish; the
    # worst finished, -0.785, beats the best open log .5 + log .4 = -1.609 / (11/6): stop
    assert [g for g, _ in got] == [[1, STOP], [2, STOP]]
    assert got[0][1] == pytest.approx((math.log(0.5) + math.log(0.6)) / (10 / 6), rel=1e-5)
    assert got[1][1] == pytest.approx((math.log(0.3) + math.log(0.9)) / (10 / 6), rel=1e-5)


def test_the_length_penalty_counts_the_context():
    """The issue's example: a 100-token context, -2 for (1 token + eop) against -3 for (3 + eop)."""
    opennmt, hf = BeamSearch(1, (STOP,)), BeamSearch(1, (STOP,), length_norm="generated")
    short, long_ = (-2.0, 102), (-3.0, 104)
    assert opennmt._penalized(*short, 100) > opennmt._penalized(*long_, 100)  # the reference: short wins
    assert hf._penalized(*short, 100) < hf._penalized(*long_, 100)  # per generated token: long wins


def test_invalid_ids_banned_prefixes_and_only_generated_ngrams_are_banned():
    # after 0 -> 4; 4 -> 5 (the context's bigram (4, 5): allowed, the beam never generated it);
    # 5 -> 4; then 4 -> 5 again would repeat the beam's own (4, 5): banned, 6 instead
    rows = {0: {4: 0.6, 1: 0.39}, 4: {5: 0.7, 6: 0.2}, 5: {4: 0.8, 2: 0.1}, 6: {7: 0.9}}
    search = BeamSearch(1, (STOP,), no_repeat_ngram=2, banned_ids=[1])
    ((gen, _),) = search.run([4, 5, 0], table_model(rows), max_new_tokens=4)
    assert gen == [4, 5, 4, 6]
    # a banned prefix [4, 5]: at step 1 a beam whose generated tokens are [4] may not take 5
    search = BeamSearch(1, (STOP,), banned_prefixes=[[4, 5]], banned_ids=[1])
    ((gen, _),) = search.run([4, 5, 0], table_model(rows), max_new_tokens=3)
    assert gen == [4, 6, 7]
    # a one-token prefix is banned at the first step only
    search = BeamSearch(1, (STOP,), banned_prefixes=[[4]])
    ((gen, _),) = search.run([4, 5, 0], table_model(rows), max_new_tokens=2)
    assert gen[0] == 1 and 1 not in BeamSearch(1, (STOP,), banned_ids=[1]).run([0], table_model(rows), 3)[0][0]


def test_consider_end_adds_the_best_open_beam_and_min_new_tokens():
    rows = {0: {1: 0.5, 2: 0.4, STOP: 0.1}, 1: {1: 0.9}, 2: {2: 0.9}}
    got = BeamSearch(2, (STOP,)).run([0], table_model(rows), max_new_tokens=2)
    # [9] finished at step 0; never stopped early, so the best open beam [1, 1] joins, scored
    # (log .5 + log .9) / ((5 + 3) / 6) against log .1 / ((5 + 2) / 6)
    assert [g for g, _ in got] == [[1, 1], [STOP]]
    assert BeamSearch(2, (STOP,), consider_end=False).run([0], table_model(rows), 2) == [([STOP], got[1][1])]
    none = BeamSearch(2, (STOP,), consider_end=False, min_new_tokens=1).run([0], table_model(rows), 2)
    assert none == []  # the stop id is banned at step 0, and nothing else ends
