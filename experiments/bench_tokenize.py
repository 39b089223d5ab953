"""Tokenization and token-store read rates, per core, beside Hugging Face `datasets` in the same run.

    python experiments/bench_tokenize.py [--data ../shared/data/corpus] [--mb 5] [--workers 1,2]
                                         [--family glm] [--json rows.json]

The same JSON lines (the first --mb MB of text of each corpus file, written out as plain JSONL)
go through (1) experiments/tokenize_corpus.py's pipeline (`store_builder.build_store`, end to
end: planning, reading, tokenizing, writing shards) with 1 and 2 worker processes, and (2) the
peer: `datasets.load_dataset("json")` then `Dataset.map` (batched) calling the same tokenizer's
`encode_batch` with num_proc 1 and 2 (load and map timed apart, each end to end). Both streams
are checked equal token for token. Then the store is read as training reads it: random windows
of --seq tokens (`np.asarray(tokens[s:s + seq], np.int32)`) and the same windows in order, from
the local folder and through fsspec (file://), one thread; each rate is also given against the
1M tokens/s/core that sample construction reaches (bench_objectives.py). Tokens/s per core =
tokens/s / processes. Each pipeline runs --repeat times, interleaved, and its fastest run counts
(a shared machine's busy moments slow some runs). One worker tokenizes in this process; more are
spawned processes, whose start-up (about a second) is in the time. Ends with one JSON line;
--json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from glm_jax.corpus_files import expand_inputs, iter_texts
from glm_jax.data import ReadStats
from glm_jax.families import get_family
from glm_jax.store_builder import build_store
from glm_jax.token_store import TokenStore

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "corpus"))
OBJECTIVE_RATE = 1e6  # tokens/s/core of sample construction, the rate reading must not hold back


def subset(data: str, mb: float, folder: str) -> list[str]:
    """The first `mb` MB of text of each corpus file, as plain JSONL files in `folder`."""
    out = []
    for inp in expand_inputs([data]):
        name = os.path.join(folder, os.path.basename(inp.path).split(".")[0] + ".jsonl")
        size = 0
        with open(name, "w", encoding="utf-8") as f:
            for text in iter_texts(inp, 0, 1 << 62, "text", ReadStats()):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                size += len(text.encode())
                if size >= mb * 1e6:
                    break
        out.append(name)
    return out


def ours(files, tok, workers, folder, shard_docs):
    out = os.path.join(folder, f"store-w{workers}")
    s = build_store(files, out, tok, workers=workers, shard_docs=shard_docs)
    row = {"pipeline": "tokenize_corpus", "processes": workers, "tokens": s["tokens"], "seconds": s["seconds"]}
    return row, out


def peer(files, tok, workers, folder):
    import datasets

    datasets.disable_progress_bars()
    eos = tok.eos_id

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tok.encode_batch(batch["text"])]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=os.path.join(folder, f"hf{workers}"))
    t1 = time.perf_counter()
    mapped = ds.map(
        encode, batched=True, batch_size=256, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names
    )
    t2 = time.perf_counter()
    tokens = np.concatenate([np.asarray(ids, np.uint32) for ids in mapped["ids"]])
    row = {"pipeline": "datasets load_dataset+map", "processes": workers, "tokens": len(tokens), "seconds": t2 - t0}
    return row, {**row, "pipeline": "datasets map only", "seconds": t2 - t1}, tokens


def read_rates(store_path: str, seq: int, windows: int) -> list[dict]:
    rows = []
    for where, path in (("local memmap", store_path), ("fsspec file://", "file://" + store_path)):
        t = TokenStore.open(path).tokens
        starts = np.random.default_rng(0).integers(0, len(t) - seq, windows)
        ordered = np.arange(windows) * seq % (len(t) - seq)
        for order, at in (("random", starts), ("sequential", ordered)):
            t0 = time.perf_counter()
            for s in at:
                np.asarray(t[int(s) : int(s) + seq], np.int32)
            dt = time.perf_counter() - t0
            rows.append({"read": f"{order} windows of {seq}, {where}", "tokens": windows * seq, "seconds": dt})
    return rows


def finish(row: dict) -> dict:
    rate = row["tokens"] / row["seconds"]
    return {**row, "seconds": round(row["seconds"], 3), "tokens_per_s_per_core": round(rate / row.get("processes", 1))}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--mb", type=float, default=5.0, help="MB of text taken from each corpus file")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--family", default="glm")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--shard-docs", type=int, default=500)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline, interleaved; the fastest counts")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    from benchutil import emit, environment  # here, not at the top: spawned workers re-import this file, not JAX

    tok = get_family(args.family).load_tokenizer(args.tokenizer)
    best: dict[tuple, dict] = {}  # (pipeline, processes) -> the fastest run
    with tempfile.TemporaryDirectory() as folder:
        files = subset(args.data, args.mb, folder)
        for rep in range(args.repeat):  # interleaved, so a busy moment of a shared machine hits all alike
            for w in map(int, args.workers.split(",")):
                row, out = ours(files, tok, w, os.path.join(folder, str(rep)), args.shard_docs)
                ours_tokens = np.asarray(TokenStore.open(out).tokens)
                whole, map_only, theirs = peer(files, tok, w, os.path.join(folder, str(rep)))
                if not np.array_equal(ours_tokens, theirs):
                    raise SystemExit("the store and datasets.map disagree on the tokens")
                for r in (row, whole, map_only):
                    key = (r["pipeline"], w)
                    if key not in best or r["seconds"] < best[key]["seconds"]:
                        best[key] = r
        rows = [finish(r) for r in best.values()]
        first_store = os.path.join(folder, "0", f"store-w{args.workers.split(',')[0]}")
        rows += [finish(r) for r in read_rates(first_store, args.seq, args.windows)]
    for r in rows:
        r["vs_1M_per_core"] = round(r["tokens_per_s_per_core"] / OBJECTIVE_RATE, 3)
        name, procs, rate = r.get("pipeline") or r["read"], r.get("processes", 1), r["tokens_per_s_per_core"]
        print(f"{name:48s} {procs:>2} proc {r['tokens']:>10,} tok {r['seconds']:8.3f} s {rate:>12,} tok/s/core")
    record = {"bench": "tokenize", **environment(), "cpu": cpu_name(), "cores": os.cpu_count(), "rows": rows}
    record.update(family=args.family, mb_per_file=args.mb, repeat=args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    emit(record)


if __name__ == "__main__":
    main()
