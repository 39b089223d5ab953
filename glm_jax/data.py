"""Corpus readers and the deterministic, resumable input pipeline.

Sources (`--data SPEC`: SOURCE[:share], comma separated; local paths or fsspec URLs, `paths.py`):
- a token store (`token_store.py`: a folder with index.json), read lazily: a window reads its
  tokens straight from the store's memory-mapped shards (byte ranges for a URL), never the store;
- a JSON-lines file `{"text": ...}`, plain or gzip (detected from the bytes);
- a folder of JSON-lines files: one source, its files (sorted by name) concatenated, so a folder
  of uneven files is sampled by tokens, not by file.
Shares are shares of tokens: `a:0.7,b:0.3` draws 70% of the training tokens from a (a window's
length never depends on its source, so drawing windows with those probabilities gives those token
shares). Without shares every token of every source is equally likely (the sources' token
counts are the shares). Malformed JSON, non-UTF-8 bytes, empty or missing text are skipped and
counted in `ReadStats`, never raised. A JSON-lines file is tokenized once into one int32 stream
(documents separated by eos) and cached as .npy under `cache_dir`, keyed by its path or URL, size,
version (mtime, or the object store's etag / generation) and the tokenizer model's hash.

The pipeline is random access: global sequence i is `SequenceBuilder.build(i)`, a pure function
of (seed, i). A run reads the sequences in order, a step's batch after the one before; each
process builds only the rows its devices hold (`sharding.rows_held`; processes holding parts of
one data replica build the same rows). The iterator's whole state is the next global sequence,
whatever the mesh or the number of processes, so a resumed run, on this mesh or another, reads on
exactly where the uninterrupted one would. (We chose this over
grain: with samples as pure functions of their index, grain's checkpointable iterators add a
dependency, which the GPU image lacks, without adding determinism; a prefetch thread gives the
overlap.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from glm_jax import paths
from glm_jax.objectives import SequenceBuilder
from glm_jax.token_store import StoreError, TokenStore, is_store
from glm_jax.tokenizer import Tokenizer

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "tokens")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


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


def read_records(path: str, stats: ReadStats) -> Iterator[dict]:
    """JSON objects of a JSON-lines file (plain or gzip; a local path or a URL); bad lines are
    counted in `stats`."""
    if not paths.exists(path):
        raise DataError(f"corpus file {path} not found")
    with paths.open_file(path) as f:
        for raw in f:
            stats.lines += 1
            record = line_record(raw, stats)
            if record is not None:
                yield record


def line_record(raw: bytes, stats: ReadStats) -> dict | None:
    """One JSON-lines line's object, or None with the reason counted (non-UTF-8, blank, bad JSON,
    not an object): the one rule every corpus reader counts by."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.bad_utf8 += 1
        return None
    if not line.strip():
        stats.empty_text += 1
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        stats.bad_json += 1
        return None
    if not isinstance(record, dict):
        stats.bad_json += 1
        return None
    return record


def usable_text(value, stats: ReadStats) -> str | None:
    """A record's text, or None with the reason counted (missing or not a string, blank); a
    usable one counts as a document."""
    if not isinstance(value, str):
        stats.missing_text += 1
        return None
    if not value.strip():
        stats.empty_text += 1
        return None
    stats.documents += 1
    return value


def read_texts(path: str, stats: ReadStats, field: str = "text") -> Iterator[str]:
    """The `text` of every usable line of a JSON-lines corpus."""
    for record in read_records(path, stats):
        text = usable_text(record.get(field), stats)
        if text is not None:
            yield text


# ---- tokenized sources ----------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """One corpus source: its token stream (documents separated by eos), share and read counts.

    tokens: [T] tokens, a numpy array (JSON lines, tokenized) or a token store's lazy
    `ShardedTokens` (slicing gives another view, `np.asarray` reads just those tokens).
    weight: its share of the tokens (normalised over the sources), None for "by its size".
    name: its file or folder base name, unique in a corpus (`eval_loss/<name>`)."""

    path: str
    weight: float | None
    tokens: np.ndarray
    stats: ReadStats
    name: str = ""


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The hex sha256 of the tokenizer's model file (what caches and token stores record)."""
    with open(tokenizer.model_file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cache_key(path: str, tokenizer: Tokenizer) -> str:
    """The file's path or URL (as given, never made local), size and version, and the tokenizer."""
    size, version = paths.size_and_version(path)
    ident = f"{paths.normalize(path)}|{size}|{version}|{tokenizer.kind}|{tokenizer_sha256(tokenizer)[:16]}|v1"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def tokenize_file(
    path: str, tokenizer: Tokenizer, cache_dir: str | None = DEFAULT_CACHE, batch_docs: int = 256
) -> tuple[np.ndarray, ReadStats]:
    """A corpus file (local or URL) as one int32 token stream, each document followed by eos
    (cached in the local folder `cache_dir`)."""
    if not paths.exists(path):
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


def parse_sources(spec: str | Sequence[str]) -> list[tuple[str, float | None]]:
    """'a.jsonl.gz:0.7,gs://b/store:0.3' or a list of such -> [(path, share or None)]. Shares are
    given for every source or for none (None: by size); a folder stays one source."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        path, weight = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:  # a ':' of the path itself (a URL's scheme)
                pass
        if weight is not None and not weight > 0:
            raise DataError(f"source {path}: share {weight} must be positive")
        out.append((path, weight))
    if not out:
        raise DataError("no corpus sources given")
    given = [w is not None for _, w in out]
    if any(given) and not all(given):
        missing = ", ".join(p for p, w in out if w is None)
        raise DataError(f"give a share to every source or to none (none: by size); {missing} has none")
    return out


def source_files(path: str) -> list[str]:
    """The JSON-lines files of a source: the file itself, or a folder's *.jsonl / *.jsonl.gz
    files sorted by name (one source, concatenated in that order)."""
    if not paths.isdir(path):
        if not paths.exists(path):
            raise DataError(f"corpus source {path} not found")
        return [path]
    files = [paths.join(path, f) for f in paths.listdir(path) if f.endswith(JSONL_SUFFIXES)]
    if not files:
        raise DataError(f"folder {path} holds no .jsonl or .jsonl.gz files and is not a token store (no index.json)")
    return files


def source_names(sources: Sequence[str]) -> list[str]:
    """Each source's file or folder base name without a JSON-lines suffix, made unique by -2, -3, ..."""
    names, seen = [], {}
    for path in sources:
        base = paths.basename(path)
        for suffix in (*JSONL_SUFFIXES, ".json"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
                break
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _store_source(path: str, tokenizer: Tokenizer) -> tuple[object, ReadStats]:
    """A token store's lazy tokens and read counts, after checking it was tokenized as this run
    tokenizes (the same tokenizer file, the same eos)."""
    try:
        store = TokenStore.open(path)
    except StoreError as error:
        raise DataError(str(error)) from None
    recorded = store.tokenizer or {}
    sha = recorded.get("file_sha256")
    if sha and sha != tokenizer_sha256(tokenizer):
        raise DataError(
            f"token store {path} was tokenized with another tokenizer ({recorded.get('kind')}, sha256 "
            f"{sha[:12]}...); this run's is {tokenizer.kind} {tokenizer.model_file}: pass the store's "
            "--family / --tokenizer, or tokenize the corpus again"
        )
    if store.eos != tokenizer.eos_id:
        raise DataError(f"token store {path} separates documents by {store.eos}, this run's eos is {tokenizer.eos_id}")
    stats = ReadStats(**store.stats)
    return store.tokens, stats


def load_source(path: str, weight: float | None, tokenizer: Tokenizer, cache_dir: str | None, name: str = "") -> Source:
    """A token store (read lazily), a JSON-lines file or a folder of them (tokenized, cached)."""
    if is_store(path):
        tokens, stats = _store_source(path, tokenizer)
        return Source(path, weight, tokens, stats, name)
    parts, stats = [], ReadStats()
    for file in source_files(path):
        tokens, file_stats = tokenize_file(file, tokenizer, cache_dir)
        parts.append(tokens)
        stats = stats.add(file_stats)
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return Source(path, weight, tokens, stats, name)


class Corpus:
    """Sources mixed by token share; `window(rng, n)` draws n consecutive tokens from one source.

    split: "train" draws from the first (1 - heldout_fraction) of every source's stream,
    "heldout" from the rest (evaluation text the training never sees), "all" from everything.
    """

    def __init__(self, sources: list[Source], split: str = "all", heldout_fraction: float = 0.01):
        empty = [s for s in sources if len(s.tokens) == 0]
        if len(empty) == len(sources):
            raise DataError("no source holds any readable text: " + "; ".join(f"{s.path}: {s.stats}" for s in sources))
        if empty:
            raise DataError(
                "; ".join(f"source {s.path} holds no readable text ({s.stats})" for s in empty)
                + ": remove it from --data"
            )
        if split not in ("train", "heldout", "all"):
            raise DataError(f"split={split!r}; choose train, heldout or all")
        self.sources, self.split, self.heldout_fraction = list(sources), split, heldout_fraction
        self.shares = self._shares(self.sources)
        self.cdf = np.cumsum(self.shares)
        self.spans = []
        for s in self.sources:
            cut = int(len(s.tokens) * (1.0 - heldout_fraction))
            self.spans.append({"train": (0, cut), "heldout": (cut, len(s.tokens)), "all": (0, len(s.tokens))}[split])

    @staticmethod
    def _shares(sources: list[Source]) -> np.ndarray:
        """[sources] token shares summing to 1: the given shares, or (none given) the token counts."""
        if all(s.weight is None for s in sources):
            w = np.array([len(s.tokens) for s in sources], np.float64)
        elif any(s.weight is None for s in sources):
            raise DataError("give a share to every source or to none (none: by size)")
        else:
            w = np.array([s.weight for s in sources], np.float64)
        return w / w.sum()

    @classmethod
    def load(
        cls,
        spec,
        tokenizer: Tokenizer,
        cache_dir: str | None = DEFAULT_CACHE,
        split: str = "all",
        heldout_fraction: float = 0.01,
    ) -> Corpus:
        parsed = parse_sources(spec)
        names = source_names([p for p, _ in parsed])
        sources = [load_source(p, w, tokenizer, cache_dir, n) for (p, w), n in zip(parsed, names)]
        return cls(sources, split, heldout_fraction)

    def with_split(self, split: str, heldout_fraction: float | None = None) -> Corpus:
        fraction = self.heldout_fraction if heldout_fraction is None else heldout_fraction
        return Corpus(self.sources, split, fraction)

    def only(self, i: int) -> Corpus:
        """Source i alone, in this split (per-source held-out loss)."""
        return Corpus([self.sources[i]], self.split, self.heldout_fraction)

    @property
    def names(self) -> list[str]:
        return [s.name or source_names([s.path])[0] for s in self.sources]

    @property
    def stats(self) -> ReadStats:
        total = ReadStats()
        for s in self.sources:
            total = total.add(s.stats)
        return total

    def pick(self, rng: np.random.Generator) -> int:
        """A source index drawn by share."""
        return min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.sources) - 1)

    def window(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n] int32 consecutive tokens of one source's split, the source drawn by share; reads
        only those n tokens (a store's shards are never read whole)."""
        i = self.pick(rng)
        lo, hi = self.spans[i]
        tokens = self.sources[i].tokens
        if hi - lo < n:  # a tiny source: repeat it rather than fail
            return np.resize(np.asarray(tokens[lo:hi]), n).astype(np.int32)
        start = lo + int(rng.integers(0, hi - lo - n + 1))
        return np.asarray(tokens[start : start + n]).astype(np.int32, copy=False)


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
