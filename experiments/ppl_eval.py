"""Language modelling as GLM-130B reports it (evaluation/dataset.py, evaluation/metrics.py), or on a JSONL corpus.

    python experiments/ppl_eval.py --task wikitext [--data ../shared/data/wikitext-2/wiki.test.tokens]
    python experiments/ppl_eval.py --task ptb --data ptb.test.txt
    python experiments/ppl_eval.py --task pile --data pile_test.jsonl      # {"text", "meta": {"pile_set_name"}}
    python experiments/ppl_eval.py [--task jsonl] [--data FILE.jsonl[.gz]] [--window 2048]

wikitext / ptb: the whole file tokenized at once, windows of max_sequence_length - 1 starting every
--generation-length tokens (256), each scoring its last 256 after the rest as bidirectional context
and [gMASK] sop (the first window scores all but its first token), per-WORD perplexity
exp(min(20, loss / words)), words = len(text.strip().split(" ")): the paper's 10.90 on WikiText-2.
pile: bits per UTF-8 byte per `pile_set_name` (generation length 1024). jsonl (default): our
held-out protocol, per-token perplexity and bits per byte with half-window strides; default data is
the shared corpus's held-out slice (last 1%), which pretrain.py never trains on. The checkpoint's
family and tokenizer are used. Ends with a JSON line.
(Named ppl_eval, not lm_eval: a script named lm_eval.py would shadow the lm-eval package.)
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit, parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
DEFAULT_DATA = {
    "wikitext": os.path.join(SHARED, "wikitext-2", "wiki.test.tokens"),
    "jsonl": os.path.join(SHARED, "corpus"),
}
GENERATION_LENGTH = {"wikitext": 256, "ptb": 256, "pile": 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--task", choices=("wikitext", "ptb", "pile", "jsonl"), default="jsonl")
    ap.add_argument("--data", default=None, help="the task's file (default: WikiText-2 test / the held-out corpus)")
    ap.add_argument("--generation-length", type=int, default=None, help="tokens scored per window (reference tasks)")
    ap.add_argument("--window", type=int, default=None, help="window (default: the model's max sequence, <= 2048)")
    ap.add_argument("--tokens", type=int, default=100_000, help="held-out tokens to score (jsonl, default data)")
    ap.add_argument("--docs", type=int, default=None, help="documents to score (jsonl / pile)")
    ap.add_argument("--batch", type=int, default=16)
    args = parse_args(ap, argv)
    from tqdm import tqdm

    from glm_jax.data import Corpus, DataError, ReadStats, read_records, read_texts
    from glm_jax.evaluate import ModelScorer, language_modelling, reference_bits_per_byte, reference_perplexity

    m = load_model_or_exit(args)
    config, tok = m.config, m.tokenizer
    window = args.window or min(config.max_sequence_length, 2048)
    scorer = ModelScorer(
        config, m.take_params(), tok, batch_size=args.batch, family=m.family, mesh=m.mesh, consume=True
    )
    data = args.data or DEFAULT_DATA.get(args.task)
    if data is None:
        ap.error(f"--task {args.task} needs --data PATH")
    g = args.generation_length or GENERATION_LENGTH.get(args.task, 0)
    progress = lambda it: tqdm(it, desc=args.task, unit="batch")
    try:
        if args.task in ("wikitext", "ptb"):
            if not os.path.isfile(data):
                raise FileNotFoundError(f"{data} not found (pass --data PATH)")
            with open(data, encoding="utf-8") as f:
                raw = f.read()
            r = reference_perplexity(raw, tok, scorer.score, window, g, m.family, progress, args.batch)
        elif args.task == "pile":
            docs = []
            for record in read_records(data, ReadStats()):
                meta = record.get("meta") or {}
                if isinstance(record.get("text"), str):
                    docs.append((meta.get("pile_set_name", "all") if isinstance(meta, dict) else "all", record["text"]))
                if args.docs and len(docs) >= args.docs:
                    break
            r = reference_bits_per_byte(docs, tok, scorer.score, window, g, m.family, progress, args.batch)
        else:
            if args.data:
                texts = []
                for text in read_texts(args.data, ReadStats()):
                    texts.append(text)
                    if args.docs and len(texts) >= args.docs:
                        break
            else:
                corpus = Corpus.load(data, tok)
                texts = []
                for src in corpus.sources:  # the held-out tail of every source, decoded back to text
                    stream = src.tokens[int(len(src.tokens) * 0.99) :]
                    texts.append(tok.decode(stream[: args.tokens // len(corpus.sources)]))
            r = language_modelling(texts, tok, scorer.score, window=window, progress=progress, family=m.family)
    except (FileNotFoundError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = {
        "task": args.task,
        **r,
        "window": window,
        "generation_length": g or None,
        "step": m.step,
        "family": m.family.name,
        "cut_rows": scorer.cut_rows,
        **m.placement_summary(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
