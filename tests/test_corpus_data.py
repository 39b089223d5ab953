"""Corpus-scale data: token-weighted mixtures of token stores and JSON-lines sources, folders as one
source, fsspec paths for data and checkpoints, per-source held-out loss and --profile in a tiny
pretrain.py run, and two processes reading a store (also resumed onto another process count).

Run as a script, this file is one process of the two-process store read (`_worker`)."""

import contextlib
import glob
import gzip
import io
import json
import os
import struct
import sys

import numpy as np
import pytest

from glm_jax import paths
from glm_jax.data import Corpus, DataError, DataIterator, _cache_key, source_names, tokenize_file, tokenizer_sha256
from glm_jax.objectives import ObjectiveConfig, SequenceBuilder
from glm_jax.token_store import STAT_FIELDS, ShardWriter, write_index
from glm_jax.tokenizer import GLMTokenizer

STORE_IDS = (31000, 32000)  # the store's documents hold ids from this range (the JSON lines never do)
SEQ, UNIT = 32, 4  # the multi-process read: sequences of 32 tokens, units of 4
RESUMED = {"next": 2 * UNIT, "seed": 0, "seq_len": SEQ}  # a one-process run's state after a unit of 8


def write_store(root: str, tok, shards: int = 3, docs: int = 20, seed: int = 0) -> np.ndarray:
    """A token store of `shards` shards of `docs` random documents (ids in STORE_IDS, 50-150 long)
    -> the whole token stream it holds (documents followed by eos)."""
    rng = np.random.default_rng(seed)
    info = {"kind": tok.kind, "file_sha256": tokenizer_sha256(tok)}
    names, stream = [], []
    for s in range(shards):
        writer = ShardWriter(root, f"shard-{s:03d}", tok.eos_id)
        batch = [rng.integers(*STORE_IDS, int(rng.integers(50, 150))).tolist() for _ in range(docs)]
        writer.add(batch)
        writer.finish([f"part-{s}"], {**dict.fromkeys(STAT_FIELDS, 0), "lines": docs, "documents": docs})
        names.append(f"shard-{s:03d}")
        stream += [t for d in batch for t in (*d, tok.eos_id)]
    write_index(root, names, info, tok.eos_id)
    return np.asarray(stream, np.uint32)


def write_jsonl(path, texts, gz=False):
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    with paths.open_raw(str(path), "wb") as f:
        f.write(gzip.compress(data) if gz else data)


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok):
    """A store, an English JSON-lines file and a folder of two uneven files (English, Chinese)."""
    root = tmp_path_factory.mktemp("corpus")
    stream = write_store(str(root / "store"), tok)
    write_jsonl(root / "en.jsonl", [f"alpha beta gamma {i} delta" * 3 for i in range(40)])
    (root / "uneven").mkdir()
    write_jsonl(root / "uneven" / "big.jsonl.gz", ["the quick brown fox " * 30] * 30, gz=True)
    write_jsonl(root / "uneven" / "small.jsonl", ["北京 上海 广州 " * 10] * 3)
    return root, stream


def _source_of(window: np.ndarray, ids: set) -> bool:
    """Whether a window came from the source whose token ids are `ids` (eos is everyone's)."""
    return all(int(t) in ids for t in window)


def _token_share(corpus: Corpus, ids: set, draws: int = 3000, seed: int = 0) -> float:
    """The share of drawn tokens from the source of `ids`, over windows of 8-64 tokens."""
    rng = np.random.default_rng(seed)
    mine = total = 0
    for _ in range(draws):
        n = int(rng.integers(8, 65))
        w = corpus.window(rng, n)
        assert w.shape == (n,) and w.dtype == np.int32
        mine, total = mine + n * _source_of(w, ids), total + n
    return mine / total


def test_token_shares_hit_their_ratios(sources, tok):
    root, stream = sources
    en = set(np.asarray(tokenize_file(str(root / "en.jsonl"), tok, None)[0]).tolist())
    assert not en & set(range(*STORE_IDS))
    mixed = Corpus.load(f"{root}/store:0.7,{root}/en.jsonl:0.3", tok, cache_dir=None, split="train")
    assert [s.name for s in mixed.sources] == ["store", "en"]
    assert type(mixed.sources[0].tokens).__name__ == "ShardedTokens"  # read lazily, never loaded
    assert len(mixed.sources[0].tokens) == len(stream) and mixed.sources[0].stats.documents == 60
    assert _token_share(mixed, en) == pytest.approx(0.3, abs=0.03)
    # without shares, every token is equally likely: shares are the sources' sizes
    natural = Corpus.load(f"{root}/store,{root}/en.jsonl", tok, cache_dir=None)
    want = len(mixed.sources[1].tokens) / (len(stream) + len(mixed.sources[1].tokens))
    assert natural.shares[1] == pytest.approx(want)
    assert _token_share(natural, en) == pytest.approx(want, abs=0.03)
    with pytest.raises(DataError, match="every source or to none"):
        Corpus.load(f"{root}/store:0.5,{root}/en.jsonl", tok, cache_dir=None)


def test_a_folder_of_uneven_files_is_one_source_sampled_by_tokens(sources, tok):
    root, _ = sources
    corpus = Corpus.load(str(root / "uneven"), tok, cache_dir=None)
    (source,) = corpus.sources
    assert source.name == "uneven" and source.stats.documents == 33
    big = np.asarray(tokenize_file(str(root / "uneven" / "big.jsonl.gz"), tok, None)[0])
    np.testing.assert_array_equal(np.asarray(source.tokens)[: len(big)], big)  # files in name order
    share = len(big) / len(source.tokens)
    assert share > 0.8  # by file it would be a half
    assert _token_share(corpus, set(big.tolist())) == pytest.approx(share, abs=0.03)


def test_a_store_of_another_tokenizer_is_refused(tmp_path, tok):
    info = {"kind": "chatglm2-6b", "file_sha256": "0" * 64}
    ShardWriter(str(tmp_path / "other"), "s", tok.eos_id).finish([], dict.fromkeys(STAT_FIELDS, 0))
    write_index(str(tmp_path / "other"), ["s"], info, tok.eos_id)
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        Corpus.load(str(tmp_path / "other"), tok, cache_dir=None)


def test_source_names_are_base_names_made_unique():
    names = source_names(["a/wiki.jsonl", "gs://b/wiki.jsonl.gz", "/data/store/", "s3://x/code"])
    assert names == ["wiki", "wiki-2", "store", "code"]


def test_data_through_fsspec_urls(sources, tok, tmp_path):
    """memory:// and file:// sources read as the local ones; a URL's cache key is its URL."""
    root, stream = sources
    url = "memory://corpus-test"
    write_store(f"{url}/store", tok)
    with open(root / "en.jsonl", "rb") as f:
        write_jsonl_bytes = f.read()
    with paths.open_raw(f"{url}/en.jsonl.gz", "wb") as f:
        f.write(gzip.compress(write_jsonl_bytes))
    spec = f"{url}/store:0.5,{url}/en.jsonl.gz:0.5"
    remote = Corpus.load(spec, tok, cache_dir=str(tmp_path / "cache"))
    local = Corpus.load(f"{root}/store:0.5,{root}/en.jsonl:0.5", tok, cache_dir=None)
    as_file = Corpus.load(f"file://{root}/store:0.5,file://{root}/en.jsonl:0.5", tok, cache_dir=None)
    for other in (remote, as_file):
        r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
        for _ in range(50):
            np.testing.assert_array_equal(other.window(r1, 40), local.window(r2, 40))
    assert remote.names == ["store", "en"] and not os.path.exists("memory:")
    key = _cache_key(f"{url}/en.jsonl.gz", tok)
    assert os.path.exists(tmp_path / "cache" / f"{key}.npy")  # cached under the URL's key
    write_jsonl(f"{url}/en.jsonl.gz", ["changed"], gz=True)
    assert _cache_key(f"{url}/en.jsonl.gz", tok) != key  # another size and version: tokenized again


def test_checkpoints_take_local_paths_and_file_urls_and_keep_urls_untouched(tmp_path):
    import jax.numpy as jnp

    from glm_jax.checkpoints import CheckpointError, Checkpoints, checkpoint_path

    assert checkpoint_path("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
    assert checkpoint_path("s3://bucket/ck") == "s3://bucket/ck"
    assert checkpoint_path(f"file://{tmp_path}/ck") == f"{tmp_path}/ck"
    with pytest.raises(CheckpointError, match="does not serve memory://"):
        Checkpoints("memory://ck")
    for where in (str(tmp_path / "local"), f"file://{tmp_path}/as-url"):
        ckpt = Checkpoints(where, async_save=False)
        ckpt.save(2, {"train": {"x": jnp.arange(3.0)}}, {"data": {"next": 8}})
        ckpt.close()
        again = Checkpoints(where, async_save=False)
        assert again.latest_step() == 2 and again.restore_meta(2) == {"data": {"next": 8}}
        again.close()
    assert os.path.isdir(tmp_path / "as-url" / "2")


# ---- a tiny pretrain.py run: per-source held-out loss, --profile ---------------------------------------
def _tensorboard_tags(log_dir) -> set:
    """The scalar tags of the TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(log_dir, "tensorboard", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + length + 4
    return tags


@pytest.fixture(scope="module")
def tiny_run(sources, tmp_path_factory):
    """pretrain.py (in this process, on one device) for 3 steps of 2 sequences from the store (60%)
    and the uneven folder (40%), step 2 profiled -> (log dir, summary.json, printed summary, stderr)."""
    from script_runs import ROOT

    sys.path.insert(0, str(ROOT / "experiments"))
    import pretrain

    root, _ = sources
    run = tmp_path_factory.mktemp("tiny-run")
    args = ["--data", f"{root}/store:0.6,{root}/uneven:0.4", "--instructions", "", "--mesh", "1x1x1"]
    args += ["--set", "num_layers=2", "--set", "dtype=float32", "--seq", "64", "--batch", "2", "--steps", "3"]
    args += ["--no-progress", "--sync-checkpoints", "--profile", "2:3"]
    args += ["--ckpt-dir", str(run / "ck"), "--log-dir", str(run / "log")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        pretrain.main(args)
    with open(run / "log" / "summary.json") as f:
        return run / "log", json.load(f), json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.mark.slow  # a tiny pretrain run (shared by the two)
def test_each_source_has_its_own_held_out_loss(tiny_run):
    log, summary, printed, err = tiny_run
    keys = ("eval_loss", "eval_loss/store", "eval_loss/uneven")
    assert all(np.isfinite(summary[k]) for k in keys)
    assert summary["eval_loss/store"] != summary["eval_loss/uneven"]
    assert all(printed[k] == summary[k] for k in keys)
    with open(log / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 1 and all(evals[0][k] == summary[k] for k in keys) and evals[0]["step"] == 3
    assert set(keys) <= _tensorboard_tags(log)
    assert "store: 6,035 tokens, 60.0% of the training tokens" in err


@pytest.mark.slow  # a tiny pretrain run (shared by the two)
def test_profile_writes_a_trace_and_the_summary_splits_step_time(tiny_run):
    log, summary, _, err = tiny_run
    assert summary["profile_dir"] == str(log / "profile")
    assert glob.glob(str(log / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert "profile of steps 2..2 written" in err
    split = summary["step_time_split"]
    assert split["host_s"] > 0 and split["device_s"] >= 0
    assert split["collectives_s"] is None and "cpu backend" in split["collectives_note"]


@pytest.mark.parametrize("spec", ["3:2", "0:2", "2:9", "two:three", "4"])
def test_bad_profile_specs_exit_2(spec, capsys):
    from script_runs import ROOT

    sys.path.insert(0, str(ROOT / "experiments"))
    import pretrain

    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(["--steps", "5", "--profile", spec])
    assert e.value.code == 2 and "--profile" in capsys.readouterr().err


# ---- two processes reading a store --------------------------------------------------------------------
def _store_builder(store: str, tok) -> SequenceBuilder:
    corpus = Corpus.load(store, tok, cache_dir=None, split="train")
    return SequenceBuilder(corpus.window, SEQ, 0, ObjectiveConfig(samples_per_sequence=1))


def _units(it: DataIterator, n: int) -> np.ndarray:
    return np.stack([next(it)["tokens"] for _ in range(n)])


def _worker(store: str, out: str) -> None:
    """One of two processes (one device each, mesh 2x1x1: a data shard each): units 0 and 1 of the
    store's sequences, its rows only; then, as a run resumed onto two processes from a one-process
    run that read one unit of 8 (`RESUMED`), the next two units of 4."""
    from glm_jax import sharding as sh

    sh.initialize_distributed()
    import jax

    mesh = sh.make_mesh("2x1x1")
    rows = sh.rows_held(sh.batch_sharding(mesh), UNIT)
    builder = _store_builder(store, GLMTokenizer())
    first = DataIterator(builder, UNIT, prefetch=0, rows=rows)
    read = _units(first, 2)
    resumed = DataIterator(builder, UNIT, prefetch=2, rows=rows)
    resumed.restore(RESUMED)
    np.savez(f"{out}/process-{jax.process_index()}.npz", rows=rows, read=read, resumed=_units(resumed, 2))
    resumed.close()
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_read_the_batches_one_process_builds(sources, tok, tmp_path):
    """Two processes build their rows of the units one process builds whole, also resumed onto
    them from a one-process position (another process count, another unit)."""
    import processes

    root, _ = sources
    store = str(root / "store")
    started = processes.start(2, 1, [__file__, store, str(tmp_path)])
    one = DataIterator(_store_builder(store, tok), UNIT, prefetch=0)
    whole = _units(one, 4)  # [units, rows, SEQ]
    eights = DataIterator(_store_builder(store, tok), 2 * UNIT, prefetch=0)
    np.testing.assert_array_equal(_units(eights, 1).reshape(2, UNIT, SEQ), whole[:2])
    assert eights.state() == RESUMED  # what the two processes resume from
    processes.wait(started, timeout=300)
    parts = [np.load(tmp_path / f"process-{i}.npz") for i in range(2)]
    assert [p["rows"].tolist() for p in parts] == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(np.concatenate([p["read"] for p in parts], axis=1), whole[:2])
    np.testing.assert_array_equal(np.concatenate([p["resumed"] for p in parts], axis=1), whole[2:])


if __name__ == "__main__":
    _worker(*sys.argv[1:3])


def test_a_tokenizer_on_a_url_is_read_from_a_local_copy_with_its_sidecars(tmp_path):
    """What a checkpoint on a bucket needs to be loaded: its tokenizer file (and a tokenizer.json's
    sidecars beside it) copied once into a local cache, the same path on every later call."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpt-test/tokenizer/tokenizer.json", b'{"model": 1}')
    fs.pipe("/ckpt-test/tokenizer/generation_config.json", b'{"eos_token_id": 2}')
    local = paths.local_file("memory:///ckpt-test/tokenizer/tokenizer.json", str(tmp_path))
    assert sorted(os.listdir(os.path.dirname(local))) == ["generation_config.json", "tokenizer.json"]
    assert open(local, "rb").read() == b'{"model": 1}'
    assert paths.local_file("memory:///ckpt-test/tokenizer/tokenizer.json", str(tmp_path)) == local
    assert paths.local_file(str(tmp_path / "x.model")) == str(tmp_path / "x.model")  # local: itself
