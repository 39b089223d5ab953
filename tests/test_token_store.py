"""The token store: corpus files (JSON lines, Parquet, `datasets` folders) tokenized into shards
token for token as data.tokenize_file reads them, bad rows counted, resumed after a kill to the
same bytes, split over hosts, read lazily from local folders and URLs."""

import gzip
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
from script_runs import ROOT, script_env

from glm_jax.corpus_files import expand_inputs
from glm_jax.data import ReadStats, tokenize_file
from glm_jax.store_builder import build_store
from glm_jax.token_store import STAT_FIELDS, ShardWriter, StoreError, TokenStore, is_store, write_index
from glm_jax.tokenizer import EOS, GLMTokenizer

WORDS = "the model reads 语言 模型 text while tokens flow, 数据 and windows of rows".split()


def texts(n, seed, most=40):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, most)))) for _ in range(n)]


def messy_lines(n, seed):
    """n good documents with bad rows among them (9 bad rows: 2 bad JSON, 1 non-UTF-8, 1 not an
    object, 3 empty or blank, 2 missing text)."""
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts(n, seed)]
    bad = [
        b'{"text": "broken',
        b"\xff\xfe not utf-8 \x81",
        b"[1, 2]",
        b"",
        json.dumps({"text": "  \n "}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 7}).encode(),
        b"not json at all",
    ]
    for i, row in enumerate(bad):
        lines.insert(3 + 5 * i, row)
    return lines


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of a plain JSON-lines file (its last line without a newline) and a gzip one."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.jsonl").write_bytes(b"\n".join(messy_lines(40, 0)))
    with gzip.open(root / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(messy_lines(25, 1)) + b"\n")
    (root / "notes.txt").write_text("not a corpus file: ignored in a folder")
    return root


def build(corpus, out, tok, **kw):
    kw.setdefault("shard_docs", 7)
    return build_store([str(corpus)], str(out), tok, **kw)


@pytest.fixture(scope="module")
def reference(corpus, tok, tmp_path_factory):
    """The corpus's store from one uninterrupted run on one host."""
    out = tmp_path_factory.mktemp("reference") / "store"
    summary = build(corpus, out, tok)
    assert summary["complete"] and summary["shards"] == summary["shards_in_store"] > 4
    return out


def store_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def expected_stream(paths, tok):
    parts, stats = [], ReadStats()
    for p in paths:
        tokens, s = tokenize_file(str(p), tok, cache_dir=None)
        parts.append(tokens)
        stats = stats.add(s)
    return np.concatenate(parts).astype(np.uint32), stats


def test_store_round_trips_the_corpus(corpus, reference, tok):
    store = TokenStore.open(str(reference))
    want, stats = expected_stream([corpus / "a.jsonl", corpus / "b.jsonl.gz"], tok)
    np.testing.assert_array_equal(np.asarray(store.tokens), want)
    counted = ReadStats(lines=83, documents=65, bad_json=6, bad_utf8=2, empty_text=6, missing_text=4)
    assert ReadStats(**store.stats) == stats == counted
    assert store.documents == 65 and store.eos == EOS and store.tokenizer["kind"] == "glm"
    assert is_store(str(reference)) and not is_store(str(corpus))
    for i, shard in enumerate(store.shards):  # every document ends in eos, at the offsets recorded
        starts = store.document_starts(i)
        assert len(starts) == shard["documents"] + 1
        tokens = np.asarray(store.tokens[starts[0] : starts[-1]])
        assert (tokens == EOS).sum() == shard["documents"]
        np.testing.assert_array_equal(tokens[starts[1:] - starts[0] - 1], EOS)


def test_shard_tokens_cuts_other_shards_of_the_same_stream(corpus, reference, tok, tmp_path):
    summary = build(corpus, tmp_path / "s", tok, shard_docs=None, shard_tokens=150)
    store = TokenStore.open(str(tmp_path / "s"))
    assert summary["shards_in_store"] != len(TokenStore.open(str(reference)).shards)
    np.testing.assert_array_equal(np.asarray(store.tokens), np.asarray(TokenStore.open(str(reference)).tokens))


def test_parquet_and_datasets_folders(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = texts(30, 2)
    rows[4], rows[9], rows[17] = None, "", "   "
    pq.write_table(pa.table({"id": list(range(30)), "text": rows}), tmp_path / "t.parquet", row_group_size=4)
    saved = texts(12, 3)
    datasets.Dataset.from_dict({"text": saved}).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    build_store([str(tmp_path / "t.parquet"), str(tmp_path / "hf")], str(tmp_path / "s"), tok, shard_docs=5)
    store = TokenStore.open(str(tmp_path / "s"))
    good = [t for t in rows + saved if t and t.strip()]
    want = np.concatenate([np.append(ids, EOS) for ids in tok.encode_batch(good)]).astype(np.uint32)
    np.testing.assert_array_equal(np.asarray(store.tokens), want)
    assert ReadStats(**store.stats) == ReadStats(lines=42, documents=39, empty_text=2, missing_text=1)
    with pytest.raises(StoreError, match="no column 'body'"):
        build_store([str(tmp_path / "t.parquet")], str(tmp_path / "s2"), tok, shard_docs=5, field="body")


def test_two_hosts_build_the_store_one_host_builds(corpus, reference, tok, tmp_path):
    out = tmp_path / "store"
    first = build(corpus, out, tok, num_hosts=2, host_index=1, workers=2)  # spawned workers
    assert not first["complete"] and not is_store(str(out))
    second = build(corpus, out, tok, num_hosts=2, host_index=0)
    assert second["complete"] and first["shards"] + second["shards"] == second["shards_in_store"]
    assert store_files(out) == store_files(reference)


def test_a_partial_run_with_broken_leftovers_resumes_to_the_same_store(corpus, reference, tok, tmp_path):
    out = tmp_path / "store"
    build(corpus, out, tok, num_hosts=3, host_index=2)  # a third of the shards done
    plan = json.loads((out / "plan.json").read_text())
    undone = [u["name"] for i, u in enumerate(plan["units"]) if i % 3 != 2]
    (out / f"{undone[0]}.bin.tmp").write_bytes(b"half a shard")  # killed while writing
    (out / f"{undone[1]}.bin").write_bytes(b"\x01" * 12)  # killed before its .json
    again = build(corpus, out, tok)
    assert again["shards_already_done"] == len(plan["units"]) - len(undone) and again["shards"] == len(undone)
    assert store_files(out) == store_files(reference)
    assert build(corpus, out, tok)["shards"] == 0  # a finished store: nothing to do, nothing changes
    assert store_files(out) == store_files(reference)


def test_a_killed_script_resumes_to_the_same_store(tmp_path, tok):
    corpus = tmp_path / "big.jsonl"
    corpus.write_bytes(b"\n".join(json.dumps({"text": t}).encode() for t in texts(2400, 4, 120)) + b"\n")
    out = tmp_path / "store"
    argv = [sys.executable, str(ROOT / "experiments" / "tokenize_corpus.py"), "--input", str(corpus)]
    argv += ["--out", str(out), "--workers", "1", "--shard-docs", "40"]
    run = subprocess.Popen(argv, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(out.glob("*.json"))[1:] and time.time() < deadline:  # plan.json and a shard
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "index.json").exists(), "the run ended before the kill: give it more work"
    done = len(list(out.glob("shard-*.json")))
    resumed = subprocess.run(argv, env=script_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["shards_already_done"] >= done >= 1
    assert summary["shards"] + summary["shards_already_done"] == 60
    ref = tmp_path / "ref"
    build_store([str(corpus)], str(ref), tok, shard_docs=40)
    assert store_files(out) == store_files(ref)


def test_url_stores_read_the_windows_of_local_ones(corpus, reference, tok, tmp_path):
    local = TokenStore.open(str(reference)).tokens
    build(corpus, f"file://{tmp_path}/s", tok)  # written through fsspec
    assert store_files(tmp_path / "s") == store_files(reference)
    memory = fsspec.filesystem("memory")
    for name in os.listdir(reference):
        memory.pipe(f"/stores/ref/{name}", (reference / name).read_bytes())
    rng = np.random.default_rng(0)
    for url in (f"file://{reference}", "memory://stores/ref"):
        assert is_store(url)
        remote = TokenStore.open(url).tokens
        assert len(remote) == len(local)
        for _ in range(20):
            a = int(rng.integers(0, len(local) - 300))
            n = int(rng.integers(0, 300))
            np.testing.assert_array_equal(np.asarray(remote[a : a + n]), np.asarray(local[a : a + n]))
        np.testing.assert_array_equal(np.asarray(remote), np.asarray(local))
    urls = [i.path for i in expand_inputs([f"file://{corpus}"])]
    assert urls == [f"file://{corpus}/a.jsonl", f"file://{corpus}/b.jsonl.gz"]
    build_store(urls, str(tmp_path / "from_urls"), tok, shard_docs=7)  # inputs read through fsspec
    np.testing.assert_array_equal(np.asarray(TokenStore.open(str(tmp_path / "from_urls")).tokens), np.asarray(local))


def test_sharded_tokens_slice_across_shards(tmp_path):
    root = str(tmp_path / "s")
    lengths = [[3, 5], [], [1], [6, 2, 2], [4]]  # documents per shard; one shard empty
    rng = np.random.default_rng(0)
    docs = [[rng.integers(10, 100, n).tolist() for n in shard] for shard in lengths]
    for k, shard in enumerate(docs):
        writer = ShardWriter(root, f"s{k}", eos=EOS)
        writer.add(shard)
        writer.finish([], dict.fromkeys(STAT_FIELDS, 0) | {"documents": len(shard)})
    write_index(root, [f"s{k}" for k in range(len(docs))], {"kind": "glm", "file_sha256": ""}, EOS)
    t = TokenStore.open(root).tokens
    ref = np.array([x for shard in docs for d in shard for x in d + [EOS]], np.uint32)
    assert len(t) == len(ref) == 30 and t.shape == (30,)
    for a in range(-3, 31, 2):
        for b in range(a, 33, 3):
            np.testing.assert_array_equal(np.asarray(t[a:b]), ref[a:b])
    view = t[2:27][3:20][1:]  # slices of slices
    np.testing.assert_array_equal(np.asarray(view, np.int32), ref[2:27][3:20][1:].astype(np.int32))
    assert np.asarray(view, np.int32).dtype == np.int32 and len(view) == 16
    assert [t[i] for i in (0, 9, -1)] == [ref[0], ref[9], ref[-1]] and view[-1] == ref[2:27][3:20][-1]
    np.testing.assert_array_equal(np.resize(np.asarray(t[5:9]), 10), np.resize(ref[5:9], 10))
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(view))), np.asarray(view))  # to a process
    with pytest.raises(StoreError, match="contiguous"):
        t[::2]
    with pytest.raises(IndexError):
        t[30]


def load_script():
    spec = importlib.util.spec_from_file_location("tokenize_corpus", ROOT / "experiments" / "tokenize_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_exits_2_and_says_why(corpus, reference, tmp_path, capsys):
    script = load_script()
    cases = [
        (["--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")], "not found"),
        (["--input", str(tmp_path), "--out", str(tmp_path / "x")], "holds no"),
        (["--input", str(corpus), "--out", str(reference), "--shard-docs", "9"], "planned with other shard_docs"),
        (["--input", str(corpus), "--out", str(tmp_path / "x"), "--num-hosts", "2", "--host-index", "2"], "host index"),
        (["--input", str(corpus), "--out", str(tmp_path / "x"), "--tokenizer-kind", "nope"], "unknown tokenizer"),
    ]
    for argv, message in cases:
        assert script.main([*argv, "--workers", "1"]) == 2
        assert message in capsys.readouterr().err
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    assert script.main(["--input", str(tmp_path / "broken.jsonl.gz"), "--out", str(tmp_path / "y")]) == 2
    assert "cannot read" in capsys.readouterr().err
