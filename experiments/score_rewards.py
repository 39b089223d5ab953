"""Score answers with a reward model (`finetune.py --objective reward`): JSON lines of
{"prompt", "answer"} in, the same lines with "reward" added out.

    python experiments/score_rewards.py --checkpoint BASE --adapter runs/rm \\
        --input answers.jsonl --output scored.jsonl

"prompt" is a string or a trl message list ending with the user's query, "answer" a string or an
assistant message; each line is laid out as one answer of a training pair (the family's prompt,
cut to --max-source / --max-target as in training) and scored by the value head at the answer's
last position (`pair_objectives.last_answer_values`). Lines that are not JSON objects with both
fields are skipped and counted. The output is written whole or not at all. Ends with a one-line
JSON summary (rows, scored, skipped, mean reward).
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import DEFAULT_CHECKPOINTS


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS, help="the base the reward model was trained on")
    ap.add_argument("--adapter", required=True, help="the reward model: finetune.py --objective reward's --out")
    ap.add_argument("--input", required=True, help='JSON lines of {"prompt", "answer"}')
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-source", type=int, default=64, help="prompt ids kept, as in training")
    ap.add_argument("--max-target", type=int, default=128, help="answer ids kept, as in training")
    ap.add_argument("--tokenizer", default=None, metavar="FILE")
    ap.add_argument("--family", default=None)
    args = ap.parse_args(argv)
    for name in ("batch", "max_source", "max_target"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not os.path.isfile(args.input):
        ap.error(f"--input {args.input!r}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    from glm_jax.checkpoints import CheckpointError
    from glm_jax.config import ConfigError
    from glm_jax.loading import load_model

    try:
        model = load_model(args.checkpoint, tokenizer_file=args.tokenizer, family=args.family, adapter=args.adapter)
        if not model.config.value_head:
            raise ConfigError(f"{args.adapter} has no value head: train one with finetune.py --objective reward")
        summary = score_file(model, args)
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary))
    return summary


def score_file(model, args) -> dict:
    """Score every usable line of args.input into args.output (written to a temporary file, then
    moved into place) -> the summary."""
    import numpy as np

    from glm_jax.preference import answer_example
    from glm_jax.sft import BadRow, to_sample

    two_d = model.config.position_encoding_2d
    rows, samples, skipped = [], [], {}
    with open(args.input, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids, mask = answer_example(row, model.family, model.tokenizer, args.max_source, args.max_target)
            except (json.JSONDecodeError, BadRow) as e:
                reason = "bad_json" if isinstance(e, json.JSONDecodeError) else str(e)
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            rows.append(row)
            samples.append(to_sample(ids, mask, model.family, model.tokenizer, two_d))
    rewards = score_samples(model, samples, args.batch)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row, reward in zip(rows, rewards):
            f.write(json.dumps({**row, "reward": float(reward)}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    return {
        "output": args.output,
        "rows": len(rows) + sum(skipped.values()),
        "scored": len(rows),
        "skipped": skipped,
        "mean_reward": float(np.mean(rewards)) if len(rewards) else None,
    }


def score_samples(model, samples: list, batch: int):
    """Samples of the batch contract (one answer each) -> their rewards [n], in batches padded to
    one length (a single compile)."""
    import jax
    import numpy as np

    from glm_jax.decoding import bucket_length
    from glm_jax.pair_objectives import sequence_rewards

    if not samples:
        return np.zeros(0, np.float32)
    width = bucket_length(max(len(s["tokens"]) for s in samples))
    score = jax.jit(lambda params, rows: sequence_rewards(model.config, params, rows)[:, 0])
    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        rows = {name: np.zeros((batch, width), np.int32) for name in (*chunk[0], "segment_ids")}
        for i, sample in enumerate(chunk):
            for name, values in sample.items():
                rows[name][i, : len(values)] = values
            rows["segment_ids"][i, : len(sample["tokens"])] = 1
        out.append(np.asarray(score(model.params, rows))[: len(chunk)])
    return np.concatenate(out)


if __name__ == "__main__":
    main()
