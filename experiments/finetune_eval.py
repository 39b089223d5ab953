"""Generate an answer per held-out row and score it as ChatGLM's ptuning evaluation does.

    python experiments/finetune_eval.py --checkpoint runs/default/checkpoints --adapter runs/lora \\
        --data ../shared/data/advertisegen/dev.json --limit 100 --out runs/lora/predictions.jsonl

Each row's last reply is the reference; the prompt is the family's chat prompt of the rows
before it, cut to --max-source as in training. Greedy by default; --sample uses the reference's
top_p 0.7, temperature 0.95. Prints one JSON line: n, loss (mean teacher-forced NLL per reply
token, end token included, as in training), bleu-4, rouge-1, rouge-2, rouge-l (glm_jax/text_metrics.py).
Each line of --out is {"index", "prompt", "reference", "prediction"}; the file is written whole
or not at all.
"""

import argparse
import json
import os
import sys

from glm_jax import script_args
from glm_jax.script_args import add_checkpoint_args, load_model_or_exit


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--data", required=True, metavar="FILE")
    ap.add_argument("--limit", type=int, default=None, help="first N rows")
    ap.add_argument("--out", required=True, metavar="PREDICTIONS.jsonl")
    ap.add_argument("--sample", action="store_true", help="sample (top_p 0.7, temperature 0.95) instead of greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-source", type=int, default=64)
    ap.add_argument("--max-target", type=int, default=128, help="also the generation budget")
    ap.add_argument("--batch", type=int, default=8, help="rows generated together")
    ap.add_argument("--no-progress", action="store_true")
    args = script_args.parse_args(ap, argv)
    for name in ("max_source", "max_target", "batch"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    from tqdm import tqdm

    from glm_jax.data import DataError
    from glm_jax.evaluate import sft_loss
    from glm_jax.generate import Generator
    from glm_jax.sft import BadRow, SFTBuilder, SFTStats, conversation, cut_prompt, read_rows
    from glm_jax.text_metrics import corpus_scores

    m = load_model_or_exit(args)
    fam, tok = m.family, m.tokenizer
    try:
        stats = SFTStats()
        rows = []
        for row in read_rows(args.data, stats):
            if args.limit is not None and stats.rows > args.limit:
                break
            try:
                system, rounds, _ = conversation(row, fam)
            except BadRow:
                continue
            rows.append((system, rounds))
        if not rows:
            raise DataError(f"no usable rows in {args.data}")
        seq_len = args.max_source + args.max_target + 4
        scored = SFTBuilder.from_files(
            [args.data],
            fam,
            tok,
            m.config.position_encoding_2d,
            seq_len,
            args.max_source,
            args.max_target,
            last_only=True,
            shuffle=False,
            limit=args.limit,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    loss = sft_loss(m.config, m.params, scored.sequences, args.batch)

    gen = Generator(m.config, m.take_params(), ids=tok.specials, causal=fam.causal, mesh=m.mesh, consume=True)
    prompts = [
        cut_prompt(fam.chat_prompt(tok, rounds[:-1], rounds[-1][0], system), fam, args.max_source)
        for system, rounds in rows
    ]
    sampling = dict(temperature=0.95, top_p=0.7) if args.sample else {}
    key = jax.random.key(args.seed)
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
    outs = [None] * len(prompts)
    for i in tqdm(range(0, len(order), args.batch), disable=args.no_progress, desc="generate", file=sys.stderr):
        idx = order[i : i + args.batch]
        key, sub = jax.random.split(key)
        got = gen.generate(
            [prompts[j] for j in idx], args.max_target, key=sub, stop_tokens=fam.stop_ids(tok), **sampling
        )
        for j, ids in zip(idx, got):
            outs[j] = ids
    predictions = [fam.postprocess(tok.decode(o)) for o in outs]
    references = [rounds[-1][1] for _, rounds in rows]
    scores = corpus_scores(predictions, references)
    tmp = f"{args.out}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, ((system, rounds), pred) in enumerate(zip(rows, predictions)):
            f.write(
                json.dumps(
                    {"index": i, "prompt": rounds[-1][0], "reference": rounds[-1][1], "prediction": pred},
                    ensure_ascii=False,
                )
                + "\n"
            )
    os.replace(tmp, args.out)
    report = {
        "n": len(rows),
        "loss": loss,
        **scores,
        "sample": args.sample,
        "checkpoint": m.path,
        "adapter": args.adapter,
        "predictions": os.path.abspath(args.out),
        **m.placement_summary(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
