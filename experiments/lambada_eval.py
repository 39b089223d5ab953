"""Zero-shot LAMBADA, GLM-130B's headline benchmark (docs/reference.md#7-evaluation-protocols).

    python experiments/lambada_eval.py [--checkpoint DIR] [--protocol beam|greedy] [--limit N]

--checkpoint takes a run's checkpoint folder (its latest step) or one step's folder; it defaults
to pretrain.py's default, so the two scripts run one after the other with no flags. beam: the
GLM-130B protocol ([gMASK] sop, its beam search with 16 beams, at most 5 new tokens, no-repeat-ngram
3, the punctuation bans of tasks/lambada/task.py, its first-word rule, exact match). greedy: every target token is
the argmax under teacher forcing. Ends with a JSON line {"accuracy", "n", ...}.
"""

import argparse
import json
import os
import sys
import time

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit, parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--data", default=os.path.join(DATA, "lambada", "lambada_test.jsonl"))
    ap.add_argument("--protocol", choices=("beam", "greedy"), default="greedy")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N passages")
    ap.add_argument("--beams", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="teacher-forcing batch (greedy)")
    args = parse_args(ap, argv)
    if args.limit is not None and args.limit <= 0:
        ap.error("--limit must be positive")

    from tqdm import tqdm

    from glm_jax.evaluate import ModelScorer, lambada_beam, lambada_greedy, read_lambada

    try:
        examples = read_lambada(args.data, args.limit)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = load_model_or_exit(args)
    tok = m.tokenizer
    scorer = ModelScorer(
        m.config, m.take_params(), tok, batch_size=args.batch, family=m.family, mesh=m.mesh, consume=True
    )
    t0 = time.perf_counter()
    if args.protocol == "beam":
        beams = lambda prompt, ids, prefixes: scorer.beams(prompt, args.beams, 5, 3, ids, prefixes)
        hits = lambada_beam(
            examples, tok, beams, progress=lambda it: tqdm(it, desc="lambada", unit="ex"), family=m.family
        )
    else:
        hits = lambada_greedy(
            examples,
            tok,
            scorer.score,
            batch=args.batch,
            progress=lambda it: tqdm(it, desc="lambada", unit="batch"),
            family=m.family,
        )
    dt = time.perf_counter() - t0
    result = {
        "accuracy": sum(hits) / max(len(hits), 1),
        "n": len(hits),
        "protocol": args.protocol,
        "checkpoint": os.path.abspath(args.checkpoint),
        "step": m.step,
        "family": m.family.name,
        "cut_rows": scorer.cut_rows,
        "examples_per_s": len(hits) / dt,
        "prediction_rule": ("reference, punctuation split off words" if tok.kind == "glm" else "reference")
        if args.protocol == "beam"
        else "greedy: every target token the argmax",
        **m.placement_summary(),
    }
    print(
        f"LAMBADA ({args.protocol}): {result['accuracy']:.4f} on {len(hits)} passages, "
        f"{result['examples_per_s']:.1f} examples/s",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
