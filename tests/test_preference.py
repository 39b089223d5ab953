"""Preference data (preference.py): formats, bad rows, packed pairs; make_preference_set.py."""

import importlib.util
import json

import numpy as np
import pytest
from script_runs import ROOT

from glm_jax.alignment import segment_logprobs, split_pairs
from glm_jax.families import get_family
from glm_jax.preference import BadRow, build_pairs, pack_pairs, preference, preference_builder

SYSTEM, HISTORY, QUERY = "Be brief.", [("q1", "a1")], "q2\nmore"
CHOSEN, REJECTED = "the good answer", "bad"
ROWS = [
    {  # trl, message lists
        "prompt": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": QUERY},
        ],
        "chosen": [{"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "assistant", "content": REJECTED}],
    },
    {  # ColossalChat: a list of one assistant message, and one message alone
        "context": [
            {"from": "system", "content": SYSTEM},
            {"from": "human", "content": "q1"},
            {"from": "assistant", "content": "a1"},
            {"from": "human", "content": QUERY},
        ],
        "chosen": [{"from": "assistant", "content": CHOSEN}],
        "rejected": {"from": "assistant", "content": REJECTED},
    },
    {  # LLaMA-Factory
        "instruction": "q2",
        "input": "more",
        "system": SYSTEM,
        "history": [["q1", "a1"]],
        "chosen": CHOSEN,
        "rejected": REJECTED,
    },
]
BAD = [
    ('{"prompt": "x", "chosen": ', "bad_json"),
    ('{"prompt": "x", "chosen": "y"}', "missing_fields"),
    ('{"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}', "missing_fields"),
    ('{"prompt": [{"role": "assistant", "content": "y"}], "chosen": "y", "rejected": "z"}', "missing_fields"),
    ('{"prompt": "x", "chosen": "y", "rejected": "  "}', "empty_answer"),
    ('{"instruction": "x", "chosen": "same", "rejected": "same"}', "same_answer"),
]


def write(path, rows, bad=()):
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(bad)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = ROWS + [{"prompt": "hi", "chosen": "yes", "rejected": "no"}]
    return write(tmp_path_factory.mktemp("pref") / "p.jsonl", rows, [b for b, _ in BAD])


def test_every_format_reads_the_same_pair():
    want = (SYSTEM, HISTORY, QUERY, CHOSEN, REJECTED)
    assert [preference(r) for r in ROWS] == [(want, "trl"), (want, "colossalchat"), (want, "llamafactory")]
    assert preference({"prompt": "x", "chosen": "y", "rejected": "z"}) == ((None, [], "x", "y", "z"), "trl")
    for raw, counter in BAD[1:]:
        with pytest.raises(BadRow, match=counter):
            preference(json.loads(raw))


@pytest.mark.parametrize("family,two_d", [("glm", False), ("glm", True), ("chatglm2-6b", False)])
def test_packed_pair_holds_both_training_examples(data_file, family, two_d):
    fam = get_family(family)
    tok = fam.load_tokenizer()
    pairs, stats = build_pairs([data_file], fam, tok, two_d, 64, 32, 512)
    assert (stats.bad_json, stats.missing_fields, stats.empty_answer, stats.same_answer) == (1, 3, 1, 1)
    assert stats.skipped == 6 and stats.pairs == 4 and stats.formats == {"trl": 2, "colossalchat": 1, "llamafactory": 1}
    rows = pack_pairs(pairs, 512, seed=0)
    assert len(rows) == 1  # four short pairs fit one row, first fit
    row = rows[0]
    seg = row["segment_ids"]
    assert seg.max() == 8
    # find the pair of ROWS[0] among the packed ones: its chosen segment's learned text
    learned = {s: tok.decode(row["targets"][(seg == s) & (row["loss_mask"] == 1)].tolist()) for s in range(1, 9)}
    k = next(s for s in range(1, 9, 2) if CHOSEN in learned[s])
    assert REJECTED in learned[k + 1]
    for s, answer in ((k, CHOSEN), (k + 1, REJECTED)):
        ids, mask = fam.training_example(tok, HISTORY, QUERY, answer, SYSTEM)
        assert row["tokens"][seg == s].tolist() == ids[:-1]
        assert row["targets"][seg == s].tolist() == ids[1:]
        assert row["loss_mask"][seg == s].tolist() == mask[1:]
        prefix = row["prefix_mask"][seg == s]
        if fam.causal:
            assert not prefix.any() and row["position_ids"][seg == s].tolist() == list(range(len(ids) - 1))
        else:  # part A is the prompt up to sop, as SFT builds it
            assert prefix.tolist() == [1] * ids.index(tok.sop_id) + [0] * (len(ids) - 1 - ids.index(tok.sop_id))
            assert row["block_position_ids"][seg == s].any() == two_d
    assert k % 2 == 1  # the chosen answer is an odd segment, its rejected one the next


def test_pairs_are_odd_and_next_even_segments_on_the_loss_side():
    """alignment.segment_logprobs + split_pairs read the packing: segment 2k-1 chosen, 2k rejected."""
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 0, 0]])
    mask = np.array([[0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0]])
    values = np.arange(1.0, 13.0, dtype=np.float32)[None]
    pairs = split_pairs(*segment_logprobs(values, mask, seg, 6))
    chosen, rejected, c_len, r_len, valid = (np.asarray(x) for x in pairs)
    np.testing.assert_allclose(chosen, [2 + 3, 7, 0])
    np.testing.assert_allclose(rejected, [5, 8 + 9 + 10, 0])
    np.testing.assert_array_equal(c_len, [2, 1, 0])
    np.testing.assert_array_equal(r_len, [1, 3, 0])
    np.testing.assert_array_equal(valid, [1, 1, 0])


def test_too_long_pairs_are_skipped_and_builder_keeps_pairs_in_rows(data_file):
    fam = get_family("glm")
    tok = fam.load_tokenizer()
    builder = preference_builder([data_file], fam, tok, False, 40, 64, 32, seed=1)
    assert builder.stats.too_long >= 1 and builder.stats.pairs + builder.stats.too_long == 4
    for i in range(len(builder)):
        seg = builder.build(i)["segment_ids"]
        assert seg.max() % 2 == 0 and seg.max() > 0  # whole pairs only


def load_script():
    path = ROOT / "experiments" / "make_preference_set.py"
    spec = importlib.util.spec_from_file_location("make_preference_set", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "instructions").is_dir(), reason="no ../shared data")
@pytest.mark.parametrize("rejected", ["other-language", "truncated"])
def test_make_preference_set_is_deterministic(tmp_path, rejected, capsys):
    script = load_script()
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = str(tmp_path / f"{name}.jsonl")
        script.main(["--out", out, "--seed", str(seed), "--rejected", rejected, "--limit", "50"])
        outs.append((tmp_path / f"{name}.jsonl").read_text(encoding="utf-8"))
    assert outs[0] == outs[1] and outs[0] != outs[2]
    rows = [json.loads(line) for line in outs[0].splitlines()]
    assert len(rows) == 50 and json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == 50
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
        assert preference(r)[1] == "trl"
        if rejected == "truncated":
            assert r["chosen"].startswith(r["rejected"])
        else:  # the other language: a Chinese prompt gets an answer without CJK characters, and back
            zh = any("\u4e00" <= ch <= "\u9fff" for ch in r["prompt"])
            assert any("\u4e00" <= ch <= "\u9fff" for ch in r["chosen"]) == zh
