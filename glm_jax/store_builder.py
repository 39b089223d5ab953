"""Filling a token store (`token_store.py`) from corpus files, by several processes and hosts.

    summary = build_store(["gs://bucket/c4/"], "gs://bucket/c4-store", tokenizer, workers=16,
                          shard_docs=50_000, num_hosts=4, host_index=jax.process_index())

The work is cut into units: each input file (`corpus_files.expand_inputs`) in row ranges of
`shard_docs` rows (or of about `shard_tokens` tokens, the rows a unit takes estimated from the
tokens of the file's first rows), unit k of file i written as shard `shard-IIIII-KKKKK`. The list
depends on the inputs and settings only, so every host computes the same one; it is kept in the
store folder as plan.json (reruns and later hosts read it instead of counting rows again, and
refuse a plan made from other inputs, tokenizer or settings). Host I of H takes the units i with
i % H == I; `workers` processes (spawned) tokenize them, one unit each at a time, one core each.
A unit whose NAME.json exists is done and skipped, so a rerun after a kill does only what is left
and writes the same bytes; the run that finds every shard done writes index.json.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence

from glm_jax import paths
from glm_jax.corpus_files import Input, count_rows, expand_inputs, iter_texts
from glm_jax.data import ReadStats, tokenizer_sha256
from glm_jax.token_store import (
    FORMAT,
    STAT_FIELDS,
    VERSION,
    ShardWriter,
    StoreError,
    finished_shards,
    json_bytes,
    read_json,
    write_atomic,
    write_index,
)
from glm_jax.tokenizer import Tokenizer, load_tokenizer

PLAN = "plan.json"
BATCH_DOCS = 256  # documents per encode call
SAMPLE_ROWS = 256  # rows of a file tokenized to estimate its tokens per row (--shard-tokens)


def tokenizer_info(tokenizer: Tokenizer) -> dict:
    """What a store records of its tokenizer: {"kind", "file_sha256"} (as data's caches hash it)."""
    return {"kind": tokenizer.kind, "file_sha256": tokenizer_sha256(tokenizer)}


# ---- worker processes ---------------------------------------------------------------------------------
_TOKENIZER: list[Tokenizer] = []  # the worker's tokenizer, loaded once per process


def _init_worker(kind: str, model_file: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: `workers` sets the parallelism
    _TOKENIZER[:] = [load_tokenizer(kind, model_file)]


def _tokens_per_row(inp: Input, field: str) -> float:
    """Tokens (eos included) per row of the file's first SAMPLE_ROWS rows (bad rows count as 0)."""
    stats = ReadStats()
    texts = list(iter_texts(inp, 0, SAMPLE_ROWS, field, stats))
    tokens = sum(len(ids) + 1 for ids in _TOKENIZER[0].encode_batch(texts))
    return tokens / max(stats.lines, 1)


def _count_task(job: tuple[Input, str, int | None, int | None]) -> dict:
    """One file's rows, rows per unit and (plain JSON lines) the byte offset of each unit's first row."""
    inp, field, shard_docs, shard_tokens = job
    every = shard_docs or max(1, round(shard_tokens / max(_tokens_per_row(inp, field), 1e-9)))
    rows, offsets = count_rows(inp, field, every)
    return {"rows": rows, "rows_per_unit": every, "offsets": offsets}


def _unit_task(job: tuple[str, dict, dict, str, int]) -> dict:
    """Tokenize one unit into its shard; its entry."""
    root, unit, inp, field, eos = job
    inp = Input(**inp)
    start, stop = unit["rows"]
    stats = ReadStats()
    writer = ShardWriter(root, unit["name"], eos)
    try:
        batch = []
        for text in iter_texts(inp, start, stop, field, stats, unit["offset"]):
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                writer.add(_TOKENIZER[0].encode_batch(batch))
                batch.clear()
        writer.add(_TOKENIZER[0].encode_batch(batch))
    except BaseException:
        writer.abort()
        raise
    return writer.finish([{"path": inp.path, "rows": [start, stop]}], dataclasses.asdict(stats))


# ---- the plan -----------------------------------------------------------------------------------------
def plan_units(inputs: list[Input], counts: list[dict]) -> list[dict]:
    """Units {"name", "input", "rows": [start, stop], "offset"} from each file's count."""
    units = []
    for i, count in enumerate(counts):
        every, offsets = count["rows_per_unit"], count["offsets"]
        for k, start in enumerate(range(0, count["rows"], every)):
            units.append(
                {
                    "name": f"shard-{i:05d}-{k:05d}",
                    "input": i,
                    "rows": [start, min(start + every, count["rows"])],
                    "offset": (0 if k == 0 else offsets[k - 1]) if offsets is not None else None,
                }
            )
    return units


def _settings_text(key: dict) -> str:
    return ", ".join(f"{k}={key.get(k)}" for k in ("field", "shard_docs", "shard_tokens"))


def load_or_plan(out: str, key: dict, inputs: list[Input], map_fn: Callable) -> dict:
    """The store's plan.json when it was made from `key`; else the plan counted now (and saved)."""
    path = paths.join(out, PLAN)
    if paths.exists(path):
        plan = read_json(path)
        if plan.get("key") != key:
            old = plan.get("key", {})
            what = [k for k in key if old.get(k) != key[k]] or ["format"]
            raise StoreError(
                f"{out} holds a store planned with other {', '.join(what)} (it has {_settings_text(old)} "
                f"and tokenizer {old.get('tokenizer')}); pass the same inputs and settings to resume it, "
                "or choose a new --out"
            )
        return plan
    field, docs, tokens = key["field"], key["shard_docs"], key["shard_tokens"]
    counts = list(map_fn(_count_task, [(inp, field, docs, tokens) for inp in inputs]))
    plan = {"key": key, "units": plan_units(inputs, counts), "rows": [c["rows"] for c in counts]}
    if paths.is_url(out):
        fs, inner = paths.filesystem(out)
        fs.makedirs(inner, exist_ok=True)
    else:
        os.makedirs(out, exist_ok=True)
    write_atomic(path, json_bytes(plan))
    return plan


# ---- the run ------------------------------------------------------------------------------------------
def _pool(workers: int, tokenizer: Tokenizer):
    """A spawn pool of `workers` tokenizer processes, or None: work in this process (workers 1)."""
    if workers <= 1:
        _TOKENIZER[:] = [tokenizer]
        return None
    ctx = multiprocessing.get_context("spawn")  # safe beside threads (JAX, fsspec) in the parent
    return ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.kind, tokenizer.model_file))


def build_store(
    items: Sequence[str],
    out: str,
    tokenizer: Tokenizer,
    workers: int = 1,
    shard_docs: int | None = None,
    shard_tokens: int | None = None,
    num_hosts: int = 1,
    host_index: int = 0,
    field: str = "text",
    on_start: Callable[[int], None] | None = None,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Tokenize this host's units of the corpus `items` into the store `out`; the run's summary.

    on_start(units to do), on_shard(entry) after each shard: progress for a caller."""
    if (shard_docs is None) == (shard_tokens is None) or (shard_docs or shard_tokens) < 1:
        raise StoreError("give one of shard_docs / shard_tokens (--shard-docs N or --shard-tokens N), N >= 1")
    if not 0 <= host_index < num_hosts:
        raise StoreError(f"host index {host_index} is not in 0..{num_hosts - 1} (--num-hosts {num_hosts})")
    if workers < 1:
        raise StoreError(f"workers={workers}: use at least 1")
    t0 = time.perf_counter()
    out = paths.normalize(out)
    inputs = expand_inputs(items)
    info, eos = tokenizer_info(tokenizer), int(tokenizer.eos_id)
    key = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": info,
        "eos": eos,
        "field": field,
        "shard_docs": shard_docs,
        "shard_tokens": shard_tokens,
        "inputs": [dataclasses.asdict(i) for i in inputs],
    }
    pool = _pool(workers, tokenizer)
    try:
        map_fn = pool.imap if pool else map
        plan = load_or_plan(out, key, inputs, map_fn)
        units = plan["units"]
        mine = [u for i, u in enumerate(units) if i % num_hosts == host_index]
        finished = finished_shards(out)
        todo = [u for u in mine if u["name"] not in finished]
        if on_start:
            on_start(len(todo))
        jobs = [(out, u, key["inputs"][u["input"]], field, eos) for u in todo]
        done = []
        for entry in pool.imap_unordered(_unit_task, jobs) if pool else map(_unit_task, jobs):
            done.append(entry)
            if on_shard:
                on_shard(entry)
    finally:
        if pool:
            pool.terminate()
    index = write_index(out, [u["name"] for u in units], info, eos)
    return _summary(out, done, len(mine) - len(todo), len(units), index, workers, time.perf_counter() - t0)


def _summary(out, done, already, total, index, workers, seconds) -> dict:
    tokens = sum(e["tokens"] for e in done)
    stats = {k: sum(e["stats"][k] for e in done) for k in STAT_FIELDS}
    return {
        "store": out,
        "tokens": tokens,
        "documents": sum(e["documents"] for e in done),
        "shards": len(done),
        "shards_already_done": already,
        "shards_in_store": total,
        "complete": index is not None,
        "store_tokens": index["tokens"] if index else None,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "workers": workers,
        "tokens_per_s_per_core": round(tokens / seconds / workers, 1),
        "lines": stats["lines"],
        "skipped": {k: stats[k] for k in ("bad_json", "bad_utf8", "empty_text", "missing_text")},
    }
