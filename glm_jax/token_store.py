"""The token store: a corpus tokenized once into shards, read lazily by any number of processes.

A store is a folder, local or a URL (`paths.py`):

    index.json        {"format": "glm_jax-token-store", "version": 1, "dtype": "uint32",
                       "tokenizer": {"kind", "file_sha256"}, "eos", "shards": [entry, ...],
                       "tokens", "documents", "stats"}: written last, when every shard is done
    NAME.bin          little-endian uint32 tokens, every document followed by eos
    NAME.idx.npy      int64 [documents + 1]: where each document starts in NAME.bin, then the end
    NAME.json         the shard's entry {"name", "tokens", "documents", "inputs", "stats"}: written
                      after the other two, so its presence says the shard is whole

Every file is written under a temporary name and renamed, so a killed writer never leaves a file
that counts. Reading never loads a store: `TokenStore.open(path).tokens` is a `ShardedTokens`, a
view whose slices are views and whose `np.asarray` reads just its tokens (np.memmap for local
shards, byte ranges through fsspec for URLs).

    store = TokenStore.open("gs://bucket/store")
    window = np.asarray(store.tokens[start : start + 2048], np.int32)

`store_builder.py` fills a store from corpus files (experiments/tokenize_corpus.py).
"""

from __future__ import annotations

import bisect
import io
import json
import os
import secrets

import numpy as np

from glm_jax import paths

FORMAT = "glm_jax-token-store"
VERSION = 1
DTYPE = np.dtype("<u4")
INDEX = "index.json"
STAT_FIELDS = ("lines", "documents", "bad_json", "bad_utf8", "empty_text", "missing_text")  # data.ReadStats


class StoreError(ValueError):
    """A store that cannot be read or written as asked; says what to fix."""


# ---- writing ----------------------------------------------------------------------------------------
def _replace(tmp: str, dst: str) -> None:
    if paths.is_url(dst):
        fs, inner = paths.filesystem(tmp)
        fs.mv(inner, paths.filesystem(dst)[1])
    else:
        os.replace(tmp, dst)


def write_atomic(path: str, data: bytes) -> None:
    """`data` into `path` through a temporary file and a rename (a URL's object store: a move).
    The temporary name is this writer's own: hosts writing the same file never mix their bytes."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with paths.open_raw(tmp, "wb") as f:
        f.write(data)
    _replace(tmp, path)


def json_bytes(obj) -> bytes:
    """The one JSON spelling of store files (sorted keys, so reruns write the same bytes)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_json(path: str):
    try:
        with paths.open_raw(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} cannot be read as JSON ({e})") from None


def finished_shards(root: str) -> set[str]:
    """The names of the shards whose NAME.json exists (one listing of the folder, not a request
    per shard)."""
    if not paths.isdir(root):
        return set()
    return {n[: -len(".json")] for n in paths.listdir(root) if n.endswith(".json")}


def _read_entries(root: str, names: list[str]) -> list[dict]:
    files = [paths.join(root, n + ".json") for n in names]
    if not paths.is_url(root):
        return [read_json(f) for f in files]
    fs, _ = paths.filesystem(root)
    inner = [paths.filesystem(f)[1] for f in files]
    got = fs.cat(inner)  # one batch: concurrent requests on object stores
    return [json.loads(got[i]) for i in inner]


class ShardWriter:
    """One shard, streamed: `add(docs)` appends documents (each followed by eos) to NAME.bin's
    temporary file; `finish(inputs, stats)` renames it, writes NAME.idx.npy and then NAME.json.

    Memory holds one batch of tokens and the document offsets (8 bytes a document)."""

    def __init__(self, root: str, name: str, eos: int):
        if paths.is_url(root):
            paths.filesystem(root)[0].makedirs(paths.filesystem(root)[1], exist_ok=True)
        else:
            os.makedirs(root, exist_ok=True)
        self.root, self.name, self.eos = root, name, eos
        self.path = paths.join(root, name)
        self._file = paths.open_raw(self.path + ".bin.tmp", "wb")
        self.starts = [0]

    def add(self, docs) -> None:
        """docs: token id lists, one per document."""
        if not docs:
            return
        lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
        flat = np.empty(int(lengths.sum()), DTYPE)
        ends = np.cumsum(lengths)
        flat[ends - 1] = self.eos
        for doc, end, n in zip(docs, ends, lengths):
            flat[end - n : end - 1] = doc
        self._file.write(flat.tobytes())
        self.starts.extend((self.starts[-1] + ends).tolist())

    def finish(self, inputs: list, stats: dict) -> dict:
        """Close the shard; its entry (what NAME.json and the index hold)."""
        self._file.close()
        _replace(self.path + ".bin.tmp", self.path + ".bin")
        buf = io.BytesIO()
        np.save(buf, np.asarray(self.starts, np.int64))
        write_atomic(self.path + ".idx.npy", buf.getvalue())
        entry = {
            "name": self.name,
            "tokens": self.starts[-1],
            "documents": len(self.starts) - 1,
            "inputs": inputs,
            "stats": {k: int(stats[k]) for k in STAT_FIELDS},
        }
        write_atomic(self.path + ".json", json_bytes(entry))  # last: the shard now counts
        return entry

    def abort(self) -> None:
        self._file.close()


def sum_stats(entries) -> dict:
    return {k: sum(int(e["stats"][k]) for e in entries) for k in STAT_FIELDS}


def write_index(root: str, names: list[str], tokenizer: dict, eos: int) -> dict | None:
    """index.json over the shards `names` (in this order) once every one is done; None (nothing
    written) while some are missing. Rewritten only when it would change."""
    if not set(names) <= finished_shards(root):
        return None
    entries = _read_entries(root, names)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint32",
        "tokenizer": tokenizer,
        "eos": int(eos),
        "shards": entries,
        "tokens": sum(e["tokens"] for e in entries),
        "documents": sum(e["documents"] for e in entries),
        "stats": sum_stats(entries),
    }
    path = paths.join(root, INDEX)
    data = json_bytes(index)
    if paths.exists(path):
        with paths.open_raw(path) as f:
            if f.read() == data:
                return index
    write_atomic(path, data)
    return index


# ---- reading ----------------------------------------------------------------------------------------
def is_store(path: str) -> bool:
    """A folder (local or URL) holding a token store's index.json."""
    try:
        return paths.isdir(path) and paths.exists(paths.join(path, INDEX))
    except (OSError, ValueError):
        return False


class _Shard:
    """One NAME.bin: an np.memmap when local, fsspec byte ranges when a URL (opened on first read)."""

    def __init__(self, path: str, tokens: int):
        self.path, self.tokens = path, tokens
        self._mm = self._fs = None

    def __getstate__(self):  # a view travels to another process without its open files
        return {"path": self.path, "tokens": self.tokens, "_mm": None, "_fs": None}

    def _check_size(self, size: int) -> None:
        if size != self.tokens * DTYPE.itemsize:
            raise StoreError(
                f"{self.path} holds {size} bytes, its index says {self.tokens} tokens "
                f"({self.tokens * DTYPE.itemsize} bytes): the store is damaged; tokenize it again"
            )

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of this shard: [b - a] uint32 (a read-only memmap view when local)."""
        if b <= a:
            return np.zeros(0, DTYPE)
        if paths.is_url(self.path):
            if self._fs is None:
                fs, inner = paths.filesystem(self.path)
                self._check_size(int(fs.size(inner)))
                self._fs = (fs, inner)
            fs, inner = self._fs
            raw = fs.cat_file(inner, start=a * DTYPE.itemsize, end=b * DTYPE.itemsize)
            return np.frombuffer(raw, DTYPE)
        if self._mm is None:
            if not os.path.exists(self.path):
                raise StoreError(f"{self.path} is missing: the store is damaged; tokenize it again")
            self._check_size(os.path.getsize(self.path))
            self._mm = np.memmap(self.path, DTYPE, mode="r")
        return self._mm[a:b]


class ShardedTokens:
    """A lazy 1-D array of a store's tokens (all shards, in index order), or a slice of them.

    `len(t)`; `t[i]` an int; `t[a:b]` another view (no read); `np.asarray(t)` / `t.read()` reads
    [len(t)] uint32 tokens, from the shards it spans only."""

    ndim = 1
    dtype = DTYPE

    def __init__(self, shards: list[_Shard], start: int = 0, stop: int | None = None, _ends=None):
        self._shards = shards
        self._ends = _ends if _ends is not None else np.cumsum([s.tokens for s in shards], dtype=np.int64).tolist()
        total = self._ends[-1] if self._ends else 0
        self.start, self.stop = start, total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise StoreError(f"a token store view takes contiguous slices only (step {step}); read it first")
            b = max(a, b)
            return ShardedTokens(self._shards, self.start + a, self.start + b, self._ends)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} out of range for {len(self)} tokens")
            return int(self.read(i, i + 1)[0])
        raise TypeError(f"a token store view is indexed by an int or a slice, not {type(key).__name__}")

    def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Tokens [a, b) of this view: [b - a] uint32 (read-only when it comes from one local shard)."""
        b = len(self) if b is None else b
        lo, hi = self.start + a, self.start + b
        if hi <= lo:
            return np.zeros(0, DTYPE)
        parts = []
        k = bisect.bisect_right(self._ends, lo)
        while lo < hi:
            begin = self._ends[k - 1] if k else 0
            end = min(hi, self._ends[k])
            parts.append(self._shards[k].read(lo - begin, end - begin))
            lo, k = end, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self.read()
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return np.array(out) if copy else out

    def __repr__(self):
        return f"ShardedTokens([{self.start}:{self.stop}] of {len(self._shards)} shards)"


class TokenStore:
    """An opened store: `tokens` (ShardedTokens over every shard), `documents` (their count),
    `stats` (the summed read counts, data.ReadStats's fields: `ReadStats(**store.stats)`),
    `tokenizer` ({"kind", "file_sha256"}), `eos`, `shards` (the index's entries)."""

    def __init__(self, path: str, index: dict):
        self.path, self.index = path, index
        self.shards = index["shards"]
        files = [_Shard(paths.join(path, s["name"] + ".bin"), int(s["tokens"])) for s in self.shards]
        self.tokens = ShardedTokens(files)
        self.documents = int(index["documents"])
        self.stats = {k: int(index["stats"].get(k, 0)) for k in STAT_FIELDS}
        self.tokenizer = index["tokenizer"]
        self.eos = int(index["eos"])

    @classmethod
    def open(cls, path: str) -> TokenStore:
        path = paths.normalize(path)
        index_path = paths.join(path, INDEX)
        if not paths.exists(index_path):
            raise StoreError(
                f"{path} is not a token store (no {INDEX}): build it with experiments/tokenize_corpus.py; "
                "a store being built gets its index when its last shard is done"
            )
        index = read_json(index_path)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise StoreError(f"{index_path} is not a {FORMAT} index")
        if index.get("version") != VERSION or index.get("dtype") != "uint32":
            raise StoreError(
                f"{index_path} is version {index.get('version')} ({index.get('dtype')}); this code reads "
                f"version {VERSION} (uint32): tokenize the corpus again"
            )
        return cls(path, index)

    def document_starts(self, shard: int) -> np.ndarray:
        """int64 [documents + 1]: where shard `shard`'s documents start in `tokens`, then its end."""
        name = self.shards[shard]["name"]
        with paths.open_raw(paths.join(self.path, name + ".idx.npy")) as f:
            local = np.load(io.BytesIO(f.read()))
        return local + (self.tokens._ends[shard - 1] if shard else 0)

    def __repr__(self):
        counts = f"{len(self.tokens)} tokens, {self.documents} documents, {len(self.shards)} shards"
        return f"TokenStore({self.path!r}: {counts})"
