"""Sample construction speed and measured statistics of the GLM objective mixture (one CPU core).

    python experiments/bench_objectives.py [--seq 2048] [--n 2000] [--dump FILE.npz]

Builds sequences from the already tokenized shared corpus (tokenizing is timed separately, as
the encode rate), reports tokens/s of construction, the masked fraction, mean span length,
gMASK share, MIP token share and padding fraction, and ends with a JSON line. `--dump` writes
the first --n sequences as the contract arrays plus `original` / `original_segment_ids`.
"""

import argparse
import json
import os
import time

import numpy as np

from glm_jax.data import Corpus, ReadStats, load_instructions, read_texts
from glm_jax.objectives import ObjectiveConfig, SequenceBuilder, mixture_statistics
from glm_jax.tokenizer import GLMTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(DATA, "corpus"))
    ap.add_argument("--instructions", default=os.path.join(DATA, "advertisegen", "train.json"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--n", type=int, default=2000, help="sequences to build (and dump)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-d", action="store_true", help="2D positions (GLM / ChatGLM-6B)")
    ap.add_argument("--dump", default=None, metavar="FILE.npz")
    args = ap.parse_args(argv)

    tok = GLMTokenizer()
    corpus = Corpus.load(args.data, tok)
    pairs = load_instructions(args.instructions, tok) if args.instructions else None

    # encode rate on one core, over ~2 MB of the corpus's own text
    sample_text = []
    for path in sorted({s.path for s in corpus.sources}):
        size = 0
        for text in read_texts(path, ReadStats()):
            sample_text.append(text)
            size += len(text)
            if size > 1_000_000:
                break
    t0 = time.perf_counter()
    n_tok = sum(len(ids) for ids in tok.encode_batch(sample_text, num_threads=1))
    dt = time.perf_counter() - t0
    encode = {"encode_tokens_per_s": n_tok / dt, "encode_chars_per_s": sum(map(len, sample_text)) / dt}

    builder = SequenceBuilder(
        corpus.window, args.seq, args.seed, ObjectiveConfig(position_encoding_2d=args.two_d), pairs
    )
    builder.build(0)
    t0 = time.perf_counter()
    seqs = [builder.build(i, with_original=bool(args.dump)) for i in range(args.n)]
    dt = time.perf_counter() - t0
    stacked = {k: np.stack([s[k] for s in seqs]) for k in seqs[0]}
    stats = mixture_statistics(stacked)
    result = {
        "seq": args.seq,
        "build_tokens_per_s": args.n * args.seq / dt,
        **encode,
        **stats,
        "corpus_read": {s.path: vars(s.stats) for s in corpus.sources},
    }
    for k, v in result.items():
        if not isinstance(v, dict):
            print(f"{k:>22}: {v:,.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.dump:
        np.savez_compressed(args.dump, **stacked)
        print(f"wrote {args.n} sequences to {args.dump}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
