"""Perplexity and bits per byte with [gMASK] sliding windows (spec section 7) on a JSONL corpus.

    python experiments/lm_eval.py [--checkpoint DIR] [--data FILE.jsonl[.gz]] [--window 2048] [--docs N]

Default data: the held-out slice (last 1%) of each shared-corpus source, the text pretrain.py
never trains on. Ends with a JSON line.
"""

import argparse
import json
import os
import sys

from glm_jax.cli import add_checkpoint_args, load_model_or_exit

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "corpus"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--data", default=None, help="JSON-lines corpus (default: the shared corpus's held-out slice)")
    ap.add_argument("--window", type=int, default=None, help="window (default: the model's max sequence, <= 2048)")
    ap.add_argument("--tokens", type=int, default=100_000, help="held-out tokens to score (default data only)")
    ap.add_argument("--docs", type=int, default=None, help="documents to score (--data only)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from glm_jax.data import Corpus, DataError, ReadStats, read_texts
    from glm_jax.evaluate import ModelScorer, language_modelling

    m = load_model_or_exit(args)
    config, tok = m.config, m.tokenizer
    try:
        if args.data:
            texts = []
            for text in read_texts(args.data, ReadStats()):
                texts.append(text)
                if args.docs and len(texts) >= args.docs:
                    break
        else:
            corpus = Corpus.load(DATA, tok)
            texts = []
            for src in corpus.sources:  # the held-out tail of every source, decoded back to text
                stream = src.tokens[int(len(src.tokens) * 0.99):]
                texts.append(tok.decode(stream[: args.tokens // len(corpus.sources)]))
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    window = args.window or min(config.max_sequence_length, 2048)
    scorer = ModelScorer(config, m.params, tok, family=m.family)
    r = language_modelling(texts, tok, scorer.score, window=window,
                           progress=lambda it: tqdm(it, desc="lm", unit="batch"), family=m.family)
    print(json.dumps({**r, "window": window, "step": m.step, "family": m.family.name, "cut_rows": scorer.cut_rows}))
    return r


if __name__ == "__main__":
    main()
