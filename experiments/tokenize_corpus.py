"""Tokenize a corpus into a token store (glm_jax/token_store.py), on many cores and hosts.

    python experiments/tokenize_corpus.py --input ../shared/data/corpus --out runs/store --workers 2
    python experiments/tokenize_corpus.py --input gs://b/c4/ --out gs://b/c4-glm --family chatglm2-6b \\
        --workers 96 --num-hosts 4 --host-index $I            # on each of 4 hosts
    python experiments/pretrain.py --data runs/store ...

Inputs: JSON-lines files (plain or gzip), Parquet files (a `text` column, --field), Hugging Face
`datasets` folders saved with `save_to_disk`, folders of these; local paths or fsspec URLs. The
work is cut into units (each file in shards of --shard-docs rows, or of about --shard-tokens
tokens), the same list on every host; host I of H takes every H-th unit from the I-th. Rows
without usable text are skipped and counted. A rerun (after a kill, or on the same --out) skips
the shards already written and writes the same bytes; the run that finds every shard done writes
index.json. Ends with a one-line JSON summary; bad input exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from glm_jax.data import DataError
from glm_jax.families import FamilyError, get_family
from glm_jax.store_builder import build_store
from glm_jax.token_store import StoreError
from glm_jax.tokenizer import TokenizerError, load_tokenizer

DEFAULT_SHARD_DOCS = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files or folders, local or URLs")
    ap.add_argument("--out", required=True, metavar="DIR", help="the store folder (local or URL)")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--family", default=None, help="the model family whose tokenizer encodes (default: glm)")
    who.add_argument("--tokenizer-kind", default=None, help="a tokenizer kind (glm, chatglm2-6b, hf, ...)")
    ap.add_argument("--tokenizer", default=None, metavar="FILE", help="the tokenizer's file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (one core each)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--shard-docs", type=int, default=None, help=f"rows per shard (default {DEFAULT_SHARD_DOCS})")
    size.add_argument("--shard-tokens", type=int, default=None, help="about this many tokens per shard")
    ap.add_argument("--num-hosts", type=int, default=1)
    ap.add_argument("--host-index", type=int, default=0)
    ap.add_argument("--field", default="text", help="the JSON key / column that holds the text")
    args = ap.parse_args(argv)
    if args.shard_docs is None and args.shard_tokens is None:
        args.shard_docs = DEFAULT_SHARD_DOCS
    return args


def tokenizer_of(args):
    if args.tokenizer_kind:
        return load_tokenizer(args.tokenizer_kind, args.tokenizer)
    return get_family(args.family or "glm").load_tokenizer(args.tokenizer)


def main(argv=None) -> int:
    args = parse_args(argv)
    bar = tqdm(unit="shard", desc="tokenize", file=sys.stderr, disable=None)
    tokens = [0]

    def on_start(n):
        bar.reset(total=n)

    def on_shard(entry):
        tokens[0] += entry["tokens"]
        bar.update(1)
        bar.set_postfix(tokens=tokens[0], refresh=False)

    try:
        summary = build_store(
            args.input,
            args.out,
            tokenizer_of(args),
            workers=args.workers,
            shard_docs=args.shard_docs,
            shard_tokens=args.shard_tokens,
            num_hosts=args.num_hosts,
            host_index=args.host_index,
            field=args.field,
            on_start=on_start,
            on_shard=on_shard,
        )
    except (StoreError, TokenizerError, FamilyError, DataError) as e:
        bar.close()
        print(f"tokenize_corpus: error: {e}", file=sys.stderr)
        return 2
    bar.close()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
