"""Corpus reading (bad rows skipped and counted), weighted sources, the resumable sharded iterator."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from glm_jax.data import (
    Corpus,
    DataError,
    DataIterator,
    ReadStats,
    load_instructions,
    parse_sources,
    read_texts,
    source_files,
)
from glm_jax.objectives import SequenceBuilder
from glm_jax.tokenizer import EOS, GLMTokenizer


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


def write_messy_corpus(path, gz=False):
    big = "word " * (2 * 1024 * 1024)  # a 10 MB single document
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken json',  # bad json
        b"\xff\xfe\x00\x81garbage\x9c",  # not UTF-8
        b"\x00\x01\x02 binary junk that is utf-8 but not json",  # bad json
        json.dumps({"text": ""}).encode(),  # empty text
        json.dumps({"text": "   \n "}).encode(),  # blank text
        json.dumps({"title": "no text field"}).encode(),  # missing
        json.dumps({"text": 42}).encode(),  # missing (not a string)
        json.dumps([1, 2]).encode(),  # not an object
        b"",  # empty line
        json.dumps({"text": big}).encode(),
        json.dumps({"text": "中文也好 😀"}, ensure_ascii=False).encode(),
    ]
    data = b"\n".join(lines) + b"\n"
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_bad_rows_are_skipped_and_counted(tmp_path, gz):
    path = tmp_path / ("messy.jsonl.gz" if gz else "messy.jsonl")
    write_messy_corpus(path, gz)
    stats = ReadStats()
    texts = list(read_texts(str(path), stats))
    assert [len(t) for t in texts] == [8, 10 * 1024 * 1024, 6]
    assert stats == ReadStats(lines=12, documents=3, bad_json=3, bad_utf8=1, empty_text=3, missing_text=2)
    assert stats.skipped == 9


def test_corpus_tokenizes_and_caches(tmp_path, tok):
    path = tmp_path / "messy.jsonl"
    write_messy_corpus(path)
    corpus = Corpus.load(str(path), tok, cache_dir=str(tmp_path / "cache"))
    (src,) = corpus.sources
    assert src.stats.documents == 3 and (np.asarray(src.tokens) == EOS).sum() == 3
    again = Corpus.load(str(path), tok, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.sources[0].tokens, src.tokens)
    assert again.sources[0].stats == src.stats


def test_missing_and_empty_corpora_are_clear_errors(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        Corpus.load(str(tmp_path / "nope.jsonl"), tok, cache_dir=None)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\nnot json\n')
    with pytest.raises(DataError, match="no source holds any readable text"):
        Corpus.load(str(tmp_path / "empty.jsonl"), tok, cache_dir=None)


def test_parse_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl.gz").write_bytes(b"")
    assert parse_sources(f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.jsonl.gz:0.3") == [
        (f"{tmp_path}/a.jsonl", 0.7),
        (f"{tmp_path}/b.jsonl.gz", 0.3),
    ]
    assert parse_sources([str(tmp_path)]) == [(str(tmp_path), None)]  # a folder is one source
    assert source_files(str(tmp_path)) == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl.gz"]
    with pytest.raises(DataError, match="must be positive"):
        parse_sources("x.jsonl:0")


def test_source_weights(tmp_path, tok):
    for name, word in (("en", "alpha "), ("zh", "北京 ")):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(50):
                f.write(json.dumps({"text": word * 200}, ensure_ascii=False) + "\n")
    corpus = Corpus.load(f"{tmp_path}/en.jsonl:3,{tmp_path}/zh.jsonl:1", tok, cache_dir=None)
    assert [s.path.rsplit("/", 1)[1] for s in corpus.sources] == ["en.jsonl", "zh.jsonl"]
    rng = np.random.default_rng(0)
    share = np.mean([corpus.pick(rng) == 0 for _ in range(4000)])
    assert share == pytest.approx(0.75, abs=0.03)


def test_instructions_reader(tok):
    path = pathlib.Path(__file__).parents[2] / "shared" / "data" / "advertisegen" / "train.json"
    pairs = load_instructions(str(path), tok)
    assert len(pairs) == 200 and all(len(p) and len(t) for p, t in pairs)


# ---- the iterator --------------------------------------------------------------------------------
def _builder(seed=0):
    corpus = np.random.default_rng(5).integers(100, 30000, 50_000).astype(np.int32)

    def window(rng, n):
        s = int(rng.integers(0, len(corpus) - n + 1))
        return corpus[s : s + n]

    return SequenceBuilder(window, 128, seed)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_the_uninterrupted_batches(prefetch):
    full = _take(DataIterator(_builder(), 4, prefetch=prefetch), 7)
    first = DataIterator(_builder(), 4, prefetch=prefetch)
    _take(first, 3)
    state = json.loads(json.dumps(first.state()))  # as stored in a checkpoint
    first.close()
    resumed = DataIterator(_builder(), 4, prefetch=prefetch)
    resumed.restore(state)
    _same(_take(resumed, 4), full[3:])
    resumed.close()


def test_processes_load_only_their_rows():
    whole = _take(DataIterator(_builder(), 4, prefetch=0), 2)
    parts = [_take(DataIterator(_builder(), 4, prefetch=0, rows=rows), 2) for rows in ([0, 1], [2, 3])]
    for step in range(2):
        assert parts[0][step]["tokens"].shape == (2, 128)
        for k in whole[step]:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k])


def test_position_is_in_sequences_whatever_the_unit():
    """Units of 4 then, restored, units of 2 of which this process builds row 1: the sequences
    follow on; an older checkpoint's {"step", "global_batch"} reads as step x batch."""
    first = DataIterator(_builder(), 4, prefetch=0)
    _take(first, 3)
    state = json.loads(json.dumps(first.state()))
    assert state["next"] == 12
    for saved in (state, {"step": 3, "global_batch": 4, "seed": 0, "seq_len": 128}):
        resumed = DataIterator(_builder(), 2, prefetch=2, rows=[1])
        resumed.restore(saved)
        got = _take(resumed, 2)
        resumed.close()
        want = [{k: v[None] for k, v in _builder().build(i).items()} for i in (13, 15)]
        _same(got, want)


def test_restore_refuses_another_runs_state():
    it = DataIterator(_builder(seed=1), 4, prefetch=0)
    with pytest.raises(DataError, match="seed=0"):
        it.restore(DataIterator(_builder(seed=0), 4, prefetch=0).state())
    with pytest.raises(DataError, match="not rows of a unit"):
        DataIterator(_builder(), 4, rows=[3, 4])


def test_prefetch_errors_reach_the_consumer():
    def broken(rng, n):
        raise RuntimeError("disk gone")

    it = DataIterator(SequenceBuilder(broken, 128, 0), 2, prefetch=2)
    with pytest.raises(RuntimeError, match="disk gone"):
        next(it)


def test_heldout_split_is_disjoint(tmp_path, tok):
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(str(1000 + i) for _ in range(20))}) + "\n")
    corpus = Corpus.load(str(tmp_path / "c.jsonl"), tok, cache_dir=None)
    stream = np.asarray(corpus.sources[0].tokens)
    cut = int(len(stream) * 0.9)
    train, held = corpus.with_split("train", 0.1), corpus.with_split("heldout", 0.1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = train.window(rng, 5)
        assert any(np.array_equal(w, stream[i : i + 5]) for i in range(cut - 4))
        h = held.window(rng, 5)
        assert any(np.array_equal(h, stream[i : i + 5]) for i in range(cut, len(stream) - 4))
