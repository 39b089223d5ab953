"""MMLU by [MASK] scoring (docs/reference.md#7-evaluation-protocols): each choice letter's log-likelihood after sop.

    python experiments/mmlu_eval.py [--checkpoint DIR] [--shots 0|5] [--subjects a,b] [--limit N]
    python experiments/mmlu_eval.py --format cmmlu --data CMMLU_DIR        # Chinese, CMMLU's CSV layout

Accuracy per subject, per category of GLM-130B's tasks/mmlu (STEM, social sciences, humanities,
other; CMMLU subjects count as other) and weighted by subject size; over-long contexts are cut
from the left and counted. Ends with a JSON line.
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit, parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mmlu"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--format", choices=("mmlu", "cmmlu"), default="mmlu")
    ap.add_argument("--shots", type=int, default=0, choices=range(0, 6))
    ap.add_argument("--subjects", default=None, help="comma-separated subset")
    ap.add_argument("--limit", type=int, default=None, help="questions per subject")
    args = parse_args(ap, argv)
    from tqdm import tqdm

    from glm_jax.evaluate import ModelScorer, multiple_choice, read_mmlu

    try:
        test, dev = read_mmlu(args.data, "test", args.format), read_mmlu(args.data, "dev", args.format)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.subjects:
        wanted = args.subjects.split(",")
        unknown = sorted(set(wanted) - set(test))
        if unknown:
            ap.error(f"unknown subjects {unknown}")
        test = {s: test[s] for s in wanted}
    if args.limit:
        test = {s: rows[: args.limit] for s, rows in test.items()}
    m = load_model_or_exit(args)
    scorer = ModelScorer(m.config, m.take_params(), m.tokenizer, family=m.family, mesh=m.mesh, consume=True)
    r = multiple_choice(
        test,
        scorer.tokenizer,
        scorer.score,
        shots=dev,
        k=args.shots,
        progress=lambda it: tqdm(it, desc="mmlu", unit="subject"),
        family=m.family,
    )
    print(
        json.dumps(
            {
                "accuracy": r["accuracy"],
                "n": r["n"],
                "shots": args.shots,
                "step": m.step,
                "family": m.family.name,
                "cut_rows": scorer.cut_rows,
                **m.placement_summary(),
                "categories": r["categories"],
                "category_average": r["category_average"],
                "subjects": r["subjects"],
            }
        )
    )
    return r


if __name__ == "__main__":
    main()
