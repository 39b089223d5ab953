"""Corpus readers and the deterministic, resumable input pipeline.

Reading: JSON lines `{"text": ...}`, plain or gzip (detected from the bytes), one file or many,
each source with a weight. Malformed JSON, non-UTF-8 bytes, empty or missing text are skipped
and counted in `ReadStats`, never raised. Each source is tokenized once into one int32 stream
(documents separated by eos) and cached as .npy under `cache_dir`, keyed by the file's size,
mtime and the tokenizer model's hash.

The pipeline is random access: global sequence i is `SequenceBuilder.build(i)`, a pure function
of (seed, i). A run reads the sequences in order, a step's batch after the one before; each
process builds only the rows its devices hold (`sharding.rows_held`; processes holding parts of
one data replica build the same rows). The iterator's whole state is the next global sequence,
whatever the mesh, so a resumed run, on this mesh or another, reads on exactly where the
uninterrupted one would. (We chose this over
grain: with samples as pure functions of their index, grain's checkpointable iterators add a
dependency, which the GPU image lacks, without adding determinism; a prefetch thread gives the
overlap.)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from glm_jax.objectives import SequenceBuilder
from glm_jax.tokenizer import Tokenizer

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "tokens")


class DataError(ValueError):
    """A corpus that cannot be used at all (missing file, nothing readable); says which."""


@dataclasses.dataclass
class ReadStats:
    """Counts of what reading a corpus kept and skipped."""

    lines: int = 0
    documents: int = 0
    bad_json: int = 0
    bad_utf8: int = 0
    empty_text: int = 0
    missing_text: int = 0

    @property
    def skipped(self) -> int:
        return self.bad_json + self.bad_utf8 + self.empty_text + self.missing_text

    def add(self, other: ReadStats) -> ReadStats:
        return ReadStats(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def _open_bytes(path: str):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_records(path: str, stats: ReadStats) -> Iterator[dict]:
    """JSON objects of a JSON-lines file (plain or gzip); bad lines are counted in `stats`."""
    if not os.path.exists(path):
        raise DataError(f"corpus file {path} not found")
    with _open_bytes(path) as f:
        for raw in f:
            stats.lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.bad_utf8 += 1
                continue
            if not line.strip():
                stats.empty_text += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                stats.bad_json += 1
                continue
            if not isinstance(record, dict):
                stats.bad_json += 1
                continue
            yield record


def read_texts(path: str, stats: ReadStats, field: str = "text") -> Iterator[str]:
    """The `text` of every usable line of a JSON-lines corpus."""
    for record in read_records(path, stats):
        text = record.get(field)
        if not isinstance(text, str):
            stats.missing_text += 1
        elif not text.strip():
            stats.empty_text += 1
        else:
            stats.documents += 1
            yield text


# ---- tokenized sources ----------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """One corpus source: its token stream (documents separated by eos), weight and read counts."""

    path: str
    weight: float
    tokens: np.ndarray
    stats: ReadStats


def _cache_key(path: str, tokenizer: Tokenizer) -> str:
    st = os.stat(path)
    with open(tokenizer.model_file, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.kind}|{tok_hash}|v1"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def tokenize_file(
    path: str, tokenizer: Tokenizer, cache_dir: str | None = DEFAULT_CACHE, batch_docs: int = 256
) -> tuple[np.ndarray, ReadStats]:
    """A corpus file as one int32 token stream, each document followed by eos (cached)."""
    if not os.path.exists(path):
        raise DataError(f"corpus file {path} not found")
    if cache_dir:
        key = _cache_key(path, tokenizer)
        npy, meta = os.path.join(cache_dir, key + ".npy"), os.path.join(cache_dir, key + ".json")
        if os.path.exists(npy) and os.path.exists(meta):
            with open(meta) as f:
                return np.load(npy, mmap_mode="r"), ReadStats(**json.load(f))
    stats = ReadStats()
    chunks, batch = [], []
    eos = np.array([tokenizer.eos_id], np.int32)

    def flush():
        for ids in tokenizer.encode_batch(batch, num_threads=os.cpu_count() or 1):
            chunks.extend([np.asarray(ids, np.int32), eos])
        batch.clear()

    for text in read_texts(path, stats):
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
    flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{npy}.{os.getpid()}.tmp.npy"
        np.save(tmp, tokens)
        os.replace(tmp, npy)  # atomic: a crash never leaves a half-written cache entry
        with open(meta + ".tmp", "w") as f:
            json.dump(dataclasses.asdict(stats), f)
        os.replace(meta + ".tmp", meta)
    return tokens, stats


def parse_sources(spec: str | Sequence[str]) -> list[tuple[str, float]]:
    """'a.jsonl.gz:0.7,b.jsonl:0.3' (weights optional, default 1) or a list of such -> [(path, w)].
    A folder stands for every *.jsonl / *.jsonl.gz file in it."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if weight <= 0:
            raise DataError(f"source {path}: weight {weight} must be positive")
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith((".jsonl", ".jsonl.gz")))
            if not files:
                raise DataError(f"folder {path} holds no .jsonl or .jsonl.gz files")
            out += [(os.path.join(path, f), weight) for f in files]
        else:
            out.append((path, weight))
    if not out:
        raise DataError("no corpus sources given")
    return out


class Corpus:
    """Weighted token streams; `window(rng, n)` draws n consecutive tokens from one source.

    split: "train" draws from the first (1 - heldout_fraction) of every source's stream,
    "heldout" from the rest (evaluation text the training never sees), "all" from everything.
    """

    def __init__(self, sources: list[Source], split: str = "all", heldout_fraction: float = 0.01):
        usable = [s for s in sources if len(s.tokens) > 0]
        if not usable:
            raise DataError("no source holds any readable text: " + "; ".join(f"{s.path}: {s.stats}" for s in sources))
        if split not in ("train", "heldout", "all"):
            raise DataError(f"split={split!r}; choose train, heldout or all")
        self.sources, self.split = usable, split
        w = np.array([s.weight for s in usable], np.float64)
        self.cdf = np.cumsum(w / w.sum())
        self.spans = []
        for s in usable:
            cut = int(len(s.tokens) * (1.0 - heldout_fraction))
            self.spans.append({"train": (0, cut), "heldout": (cut, len(s.tokens)), "all": (0, len(s.tokens))}[split])

    @classmethod
    def load(
        cls,
        spec,
        tokenizer: Tokenizer,
        cache_dir: str | None = DEFAULT_CACHE,
        split: str = "all",
        heldout_fraction: float = 0.01,
    ) -> Corpus:
        sources = []
        for path, weight in parse_sources(spec):
            tokens, stats = tokenize_file(path, tokenizer, cache_dir)
            sources.append(Source(path, weight, tokens, stats))
        return cls(sources, split, heldout_fraction)

    def with_split(self, split: str, heldout_fraction: float = 0.01) -> Corpus:
        return Corpus(self.sources, split, heldout_fraction)

    @property
    def stats(self) -> ReadStats:
        total = ReadStats()
        for s in self.sources:
            total = total.add(s.stats)
        return total

    def pick(self, rng: np.random.Generator) -> int:
        """A source index drawn by weight."""
        return min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.sources) - 1)

    def window(self, rng: np.random.Generator, n: int) -> np.ndarray:
        i = self.pick(rng)
        lo, hi = self.spans[i]
        t = self.sources[i].tokens[lo:hi]
        if len(t) < n:  # a tiny source: repeat it rather than fail
            return np.resize(np.asarray(t), n).astype(np.int32)
        start = int(rng.integers(0, len(t) - n + 1))
        return np.asarray(t[start : start + n], np.int32)


def load_instructions(
    path: str,
    tokenizer: Tokenizer,
    stats: ReadStats | None = None,
    prompt_field: str = "content",
    target_field: str = "summary",
):
    """(prompt ids, target ids) pairs from an AdvertiseGen-style JSON-lines file."""
    stats = stats if stats is not None else ReadStats()
    pairs = []
    for record in read_records(path, stats):
        prompt, target = record.get(prompt_field), record.get(target_field)
        if not isinstance(prompt, str) or not isinstance(target, str):
            stats.missing_text += 1
        elif not prompt.strip() or not target.strip():
            stats.empty_text += 1
        else:
            stats.documents += 1
            pairs.append(
                (np.asarray(tokenizer.encode(prompt), np.int32), np.asarray(tokenizer.encode(target), np.int32))
            )
    return pairs


# ---- the iterator ---------------------------------------------------------------------------------
class DataIterator:
    """Units of `unit` sequences one after the other (a gradient pass, or a 1F1B microbatch), each
    process building only its rows of each; `state()` / `restore()` for checkpoints.

    Unit k from position p holds global sequences p + k*unit ... p + (k+1)*unit - 1; `next()`
    builds those at offsets `rows` (ascending; `sharding.rows_held`: the rows this process's
    devices hold; default: all of them, one process) -> dict of int32 numpy arrays
    [len(rows), seq_len] (plus `kind` [rows]). The position is the next global sequence, whatever
    the unit: a run resumed on another mesh reads on where it stopped.
    """

    def __init__(
        self,
        builder: SequenceBuilder,
        unit: int,
        position: int = 0,
        prefetch: int = 2,
        rows: Sequence[int] | None = None,
    ):
        self.rows = np.arange(unit) if rows is None else np.asarray(rows, np.int64)
        if not len(self.rows) or self.rows.min() < 0 or self.rows.max() >= unit:
            raise DataError(f"rows {list(self.rows)} are not rows of a unit of {unit} sequences")
        self.builder, self.unit = builder, unit
        self.position = position
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows of the unit starting at global sequence `position`."""
        built = [self.builder.build(int(position + r)) for r in self.rows]
        return {k: np.stack([b[k] for b in built]) for k in built[0]}

    def state(self) -> dict:
        """What a checkpoint stores: the next global sequence (plus what must match on restore)."""
        return {"next": self.position, "seed": self.builder.seed, "seq_len": self.builder.seq_len}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's `state()` (or an older run's {"step", "global_batch"})."""
        for key in ("seed", "seq_len"):
            mine = self.state()[key]
            if state.get(key, mine) != mine:
                raise DataError(f"data state from a run with {key}={state[key]}, this run has {key}={mine}")
        self._stop_prefetch()
        self.position = int(state["next"]) if "next" in state else int(state["step"]) * int(state["global_batch"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            batch = self.batch_at(self.position)
        else:
            if self._thread is None:
                self._start_prefetch()
            position, batch = self._queue.get()
            if isinstance(batch, Exception):
                self._stop_prefetch()
                raise batch
            assert position == self.position, (position, self.position)
        self.position += self.unit
        return batch

    def _start_prefetch(self):
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        start = self.position

        def work():
            p = start
            while not self._stop.is_set():
                try:
                    item = (p, self.batch_at(p))
                except Exception as e:  # hand the error to the consumer instead of hanging it
                    item = (p, e)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                p += self.unit

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def _stop_prefetch(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def close(self):
        self._stop_prefetch()
