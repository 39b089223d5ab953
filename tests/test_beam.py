"""GLM-130B's beam search on a hand-made next-token table: every beam, score and order below is
derived by hand from the rules of docs/reference.md#7-evaluation-protocols."""

import math

import numpy as np
import pytest

from glm_jax.beam import BeamSearch

V, STOP = 10, 9


def table_model(rows: dict[int, dict[int, float]]):
    """next_logits for a model whose next-token distribution depends on the last token only:
    rows[last] = {token: probability}; every other token gets 1e-9 and the row is normalised, so
    rows that sum to 1 keep their probabilities (to ~1e-8)."""

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


def test_consider_end_adds_every_open_beam_and_min_new_tokens():
    rows = {0: {1: 0.5, 2: 0.4, STOP: 0.1}, 1: {1: 1.0}, 2: {2: 1.0}}
    got = BeamSearch(2, (STOP,)).run([0], table_model(rows), max_new_tokens=2)
    # step 0: 1 and 2 continue, [9] finishes: log .1 / ((5 + 2) / 6); step 1: [1, 1] and [2, 2]
    # continue; never stopped early, so both open beams join, each (log p) / ((5 + 3) / 6), and
    # the list is cut back to 2 beams: [9] drops (the old finalize kept it, adding [1, 1] only)
    assert [g for g, _ in got] == [[1, 1], [2, 2]]
    assert got[0][1] == pytest.approx(math.log(0.5) / (8 / 6), rel=1e-5)
    assert got[1][1] == pytest.approx(math.log(0.4) / (8 / 6), rel=1e-5)
    ((gen, score),) = BeamSearch(2, (STOP,), consider_end=False).run([0], table_model(rows), 2)
    assert gen == [STOP] and score == pytest.approx(math.log(0.1) / (7 / 6), rel=1e-5)
    none = BeamSearch(2, (STOP,), consider_end=False, min_new_tokens=1).run([0], table_model(rows), 2)
    assert none == []  # the stop id is banned at step 0, and nothing else ends


def test_consider_end_interleaves_the_open_beams_with_the_finished_ones():
    """THUDM/GLM-130B 7be5ba1: finalize adds all num_beams open beams, not only the first."""
    rows = {0: {1: 0.4, 2: 0.3, 3: 0.2, STOP: 0.1}, 1: {4: 0.9, STOP: 0.1}, 2: {STOP: 0.8, 5: 0.2}, 3: {6: 1.0}}
    search = BeamSearch(num_beams=3, stop_tokens=(STOP,), length_penalty=1.0)
    got = search.run([0], table_model(rows), max_new_tokens=2)
    # step 0 (6 candidates): 1, 2, 3 continue; [9] finishes at length 2: log .1 / (7/6) = -1.974
    # step 1, in score order: [1, 4] log .4 + log .9 = -1.022 continues; [2, 9] log .3 + log .8 =
    # -1.427 finishes at length 3: x 6/8 = -1.070; [3, 6] log .2 = -1.609 and [2, 5] log .3 +
    # log .2 = -2.813 continue; [1, 9] log .4 + log .1 = -3.219 finishes: -2.414. Three finished,
    # but the worst, -2.414, is below the best open -1.022 / (9/6): no early stop. At the end the
    # open beams join x 6/8: [1, 4] -0.766, [3, 6] -1.207, [2, 5] -2.110; the best 3 of the six
    want = [
        ([1, 4], (math.log(0.4) + math.log(0.9)) * 6 / 8),
        ([2, STOP], (math.log(0.3) + math.log(0.8)) * 6 / 8),
        ([3, 6], math.log(0.2) * 6 / 8),
    ]
    assert [g for g, _ in got] == [g for g, _ in want]  # the old finalize: [1, 4], [2, 9], [9]
    for (_, score), (_, expected) in zip(got, want):
        assert score == pytest.approx(expected, rel=1e-5)
    # without consider_end only the finished beams, best first
    plain = BeamSearch(3, (STOP,), consider_end=False).run([0], table_model(rows), 2)
    assert [g for g, _ in plain] == [[2, STOP], [STOP], [1, STOP]]
    assert plain[1][1] == pytest.approx(math.log(0.1) / (7 / 6), rel=1e-5)
    assert plain[2][1] == pytest.approx((math.log(0.4) + math.log(0.1)) * 6 / 8, rel=1e-5)
