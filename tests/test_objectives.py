"""GLM blank-infilling samples: reconstruction, statistics, positions, the attention rule, determinism."""

import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.layers import glm_attention_mask
from glm_jax.objectives import (
    KIND_GMASK,
    KIND_MASK,
    KIND_MIP,
    ObjectiveConfig,
    SequenceBuilder,
    draw_span_lengths,
    gmask_sample,
    mask_sample,
    mip_sample,
    mixture_statistics,
    pack,
)
from glm_jax.tokenizer import EOP, GMASK, MASK, SOP

CORPUS = np.random.default_rng(123).integers(100, 30000, 200_000).astype(np.int32)
PAIRS = [(np.arange(100, 100 + n), np.arange(500, 500 + 2 * n)) for n in (5, 17, 40, 90)]


def window(rng, n):
    start = int(rng.integers(0, len(CORPUS) - n + 1))
    return CORPUS[start : start + n]


def builder(seq=256, seed=0, two_d=False, **cfg):
    return SequenceBuilder(window, seq, seed, ObjectiveConfig(position_encoding_2d=two_d, **cfg), PAIRS)


def first_of_kind(b, kind, limit=500):
    for i in range(limit):
        s = b.build(i, with_original=True)
        if s["kind"] == kind:
            return s
    raise AssertionError(f"no sequence of kind {kind}")


def segments(seq):
    for sid in range(1, seq["segment_ids"].max() + 1):
        idx = np.flatnonzero(seq["segment_ids"] == sid)
        yield sid, {k: v[idx] for k, v in seq.items() if k not in ("kind", "original", "original_segment_ids")}


def reconstruct(seg):
    """Place part-B spans back at their mask tokens; also checks targets/loss mask of part B."""
    a = seg["prefix_mask"] == 1
    part_a, tokens_b, targets_b = seg["tokens"][a], seg["tokens"][~a], seg["targets"][~a]
    starts = np.flatnonzero(tokens_b == SOP)
    assert len(starts) and starts[0] == 0
    spans, positions = [], []
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(tokens_b)
        span = tokens_b[s + 1 : e]
        np.testing.assert_array_equal(targets_b[s:e], np.concatenate([span, [EOP]]))  # shifted by one
        spans.append(span)
        positions.append(seg["position_ids"][~a][s])
    np.testing.assert_array_equal(seg["loss_mask"], (~a).astype(np.int32))  # part-B targets incl. eop, only
    masks = np.flatnonzero((part_a == MASK) | (part_a == GMASK))
    by_mask = dict(zip(masks, spans)) if len(masks) == 1 else dict(zip(positions, spans))
    assert sorted(by_mask) == list(masks)
    out = []
    for i, t in enumerate(part_a):
        out.extend(by_mask[i] if i in by_mask else [t])
    return np.array(out)


@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("kind", [KIND_MASK, KIND_GMASK, KIND_MIP])
def test_reconstruction(kind, two_d):
    seq = first_of_kind(builder(two_d=two_d), kind)
    n_seg = 0
    for sid, seg in segments(seq):
        original = seq["original"][seq["original_segment_ids"] == sid]
        np.testing.assert_array_equal(reconstruct(seg), original)
        n_seg += 1
    if kind == KIND_MASK:
        assert n_seg == 4 and seq["segment_ids"].min() == 1  # 4 samples fill the sequence exactly
    pad = seq["segment_ids"] == 0
    assert not seq["tokens"][pad].any() and not seq["loss_mask"][pad].any()


def test_statistics_match_the_configuration():
    b = builder(seq=1024, seed=7)
    seqs = [b.build(i) for i in range(2500)]
    st = mixture_statistics({k: np.stack([s[k] for s in seqs]) for k in seqs[0]})
    assert st["masked_fraction"] == pytest.approx(0.15, abs=0.01)
    assert st["mean_span_length"] == pytest.approx(ObjectiveConfig().mean_span, abs=0.12)
    assert ObjectiveConfig().mean_span == pytest.approx(3.16, abs=0.01)
    assert st["gmask_share"] == pytest.approx(0.7, abs=0.03)
    assert st["mip_token_share"] == pytest.approx(0.05, abs=0.015)


def test_span_lengths_are_poisson_restricted_to_1_39():
    cfg = ObjectiveConfig()
    rng = np.random.default_rng(0)
    lengths = np.concatenate([draw_span_lengths(rng, cfg, 512) for _ in range(3000)])
    assert lengths.min() >= 1 and lengths.max() <= 39
    pmf = np.diff(cfg.span_cdf, prepend=0.0)
    freq = np.bincount(lengths, minlength=40)[1:] / len(lengths)
    np.testing.assert_allclose(freq[:8], pmf[:8], atol=0.01)


def test_mask_positions_1d_and_2d():
    w = np.arange(1000, 1020, dtype=np.int32)
    lengths = np.array([2, 3])
    for two_d in (False, True):
        s = mask_sample(w, lengths, np.random.default_rng(0), two_d)
        a = s["prefix_mask"] == 1
        np.testing.assert_array_equal(s["position_ids"][a], np.arange(a.sum()))
        assert not s["block_position_ids"][a].any()
        mask_at = np.flatnonzero(s["tokens"][a] == MASK)
        b_pos, b_blk, b_tok = s["position_ids"][~a], s["block_position_ids"][~a], s["tokens"][~a]
        starts = np.flatnonzero(b_tok == SOP)
        for j, st in enumerate(starts):
            e = starts[j + 1] if j + 1 < len(starts) else len(b_tok)
            assert set(b_pos[st:e]) <= set(mask_at) and len(set(b_pos[st:e])) == 1  # at its mask token
            want_blk = np.arange(1, e - st + 1) if two_d else np.zeros(e - st)
            np.testing.assert_array_equal(b_blk[st:e], want_blk)


def test_gmask_and_mip_positions():
    w = np.arange(1000, 1010, dtype=np.int32)
    s1 = gmask_sample(w, 4, two_d=False)  # context 6 tokens + [gMASK] at 6; sop at 7, ...
    np.testing.assert_array_equal(s1["position_ids"], np.arange(12))
    assert s1["tokens"][6] == GMASK and s1["tokens"][7] == SOP and not s1["block_position_ids"].any()
    s2 = gmask_sample(w, 4, two_d=True)  # part B at the gMASK position, block ids 1..
    np.testing.assert_array_equal(s2["position_ids"], list(range(7)) + [6] * 5)
    np.testing.assert_array_equal(s2["block_position_ids"], [0] * 7 + [1, 2, 3, 4, 5])
    m = mip_sample(np.arange(10, 13), np.arange(20, 22), two_d=False)
    np.testing.assert_array_equal(m["tokens"], [10, 11, 12, GMASK, SOP, 20, 21])
    np.testing.assert_array_equal(m["targets"][4:], [20, 21, EOP])
    np.testing.assert_array_equal(m["position_ids"], np.arange(7))
    np.testing.assert_array_equal(
        mip_sample(np.arange(10, 13), np.arange(20, 22), True)["block_position_ids"], [0, 0, 0, 0, 1, 2, 3]
    )


def brute_force_mask(seq):
    """GLM's rule from the samples' structure: within a segment, every token sees part A; part B
    tokens also see earlier part-B tokens of their own segment; nothing crosses segments."""
    n = len(seq["tokens"])
    m = np.zeros((n, n), bool)
    for sid in range(1, seq["segment_ids"].max() + 1):
        idx = np.flatnonzero(seq["segment_ids"] == sid)
        part_a = idx[seq["prefix_mask"][idx] == 1]
        part_b = idx[seq["prefix_mask"][idx] == 0]
        for q in idx:
            m[q, part_a] = True
        for i, q in enumerate(part_b):
            m[q, part_b[: i + 1]] = True
    return m


@pytest.mark.parametrize("kind", [KIND_MASK, KIND_GMASK, KIND_MIP])
def test_attention_rule_equals_glm_mask(kind):
    seq = first_of_kind(builder(seq=128), kind)
    got = np.asarray(glm_attention_mask(jnp.asarray(seq["segment_ids"])[None], jnp.asarray(seq["prefix_mask"])[None]))
    np.testing.assert_array_equal(got[0, 0], brute_force_mask(seq))


def test_same_seed_same_sequences():
    a, b, c = builder(seed=3), builder(seed=3), builder(seed=4)
    for i in (0, 5, 99):
        for k, v in a.build(i).items():
            np.testing.assert_array_equal(v, b.build(i)[k])
    assert any(not np.array_equal(a.build(i)["tokens"], c.build(i)["tokens"]) for i in range(5))


def test_pack_rejects_overflow_and_seq_too_short():
    s = mip_sample(np.arange(10), np.arange(10), False)
    with pytest.raises(ValueError, match="do not fit"):
        pack([s, s], 30)
    with pytest.raises(ValueError, match="too short"):
        builder(seq=32)


def test_causal_families_train_without_a_bidirectional_part_and_with_their_ids():
    from glm_jax.tokenizer import SpecialIds

    ids = SpecialIds(mask=64789, gmask=64790, smask=64791, sop=64792, eop=64793, eos=2, pad=0)
    b = SequenceBuilder(window, 256, 0, ObjectiveConfig(), PAIRS, ids, causal=True)
    for i in range(20):
        s = b.build(i)
        assert not s["prefix_mask"].any()
        assert not set(np.unique(s["tokens"]).tolist()) & {MASK, GMASK, SOP, EOP}  # our ids never appear
        assert (s["tokens"] == 64792).any() and ((s["tokens"] == 64790) | (s["tokens"] == 64789)).any()
