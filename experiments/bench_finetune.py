"""Fine-tuning quality and cost: every method from one base on AdvertiseGen, in one run.

    python experiments/bench_finetune.py --checkpoint runs/default/checkpoints --steps 200

For each method (lora, ptuning, freeze, full, and lora on an INT4 base): finetune.py on the
train rows, held-out answer loss on the first --eval-rows dev rows before and after (the main
figure: a model this small scores near 0 BLEU), then finetune_eval.py's BLEU-4 / ROUGE on the
first --gen-rows dev rows, greedy. Cost: trainable parameters, Adam state bytes and adapter
folder size for the checkpoint's model, the same counts computed from the chatglm-6b and
glm-130b configs, and each method's step time over full fine-tuning's in the same run. Writes
OUT/results.json and OUT/heldout_loss.png (the held-out curves); prints one JSON line per row.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "advertisegen"))

RUNS = (("lora", "none"), ("ptuning", "none"), ("freeze", "none"), ("full", "none"), ("lora", "int4"))


def computed_costs(preset: str, method: str) -> dict:
    """Parameter counts of a method on a preset's config, from shapes alone (nothing allocated)."""
    from glm_jax.config import get_config
    from glm_jax.peft import PeftConfig, count, split_shapes

    peft = PeftConfig(method)
    trainable, frozen = split_shapes(peft, peft.model_config(get_config(preset)))
    n = count(trainable)
    return {
        "trainable_params": n,
        "optimizer_bytes": 8 * n,
        "adapter_bytes_fp32": 4 * n,
        "trainable_fraction": n / (n + count(frozen)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join("runs", "default", "checkpoints"))
    ap.add_argument("--out", default=os.path.join("runs", "bench_finetune"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=256)
    ap.add_argument("--gen-rows", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64, help="generation budget per row")
    ap.add_argument("--eval-every", type=int, default=25)
    args = ap.parse_args(argv)

    import shutil

    import finetune
    import finetune_eval
    from benchutil import environment

    shutil.rmtree(args.out, ignore_errors=True)  # fresh runs: a resumed one would time nothing
    results = {"environment": environment(), "args": vars(args), "runs": [], "computed": []}
    for method, quantize in RUNS:
        out = os.path.join(args.out, f"{method}-{quantize}")
        train = finetune.main(
            [
                "--method",
                method,
                "--checkpoint",
                args.checkpoint,
                "--data",
                os.path.join(DATA, "train.json"),
                "--eval-data",
                os.path.join(DATA, "dev.json"),
                "--eval-limit",
                str(args.eval_rows),
                "--out",
                out,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--eval-every",
                str(args.eval_every),
                "--ckpt-every",
                str(args.steps),
                "--quantize",
                quantize,
                "--no-progress",
            ]
        )
        gen = finetune_eval.main(
            [
                "--checkpoint",
                args.checkpoint,
                "--adapter",
                out,
                "--quantize",
                quantize,
                "--data",
                os.path.join(DATA, "dev.json"),
                "--limit",
                str(args.gen_rows),
                "--out",
                os.path.join(out, "predictions.jsonl"),
                "--max-target",
                str(args.gen_tokens),
                "--no-progress",
            ]
        )
        row = {
            "method": method,
            "quantize": quantize,
            **{
                k: train[k]
                for k in (
                    "trainable_params",
                    "frozen_params",
                    "optimizer_bytes",
                    "adapter_bytes",
                    "initial_eval_loss",
                    "eval_loss",
                    "first_loss",
                    "final_loss",
                    "tokens_per_s",
                    "lr",
                )
            },
            **{k: gen[k] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")},
            "metrics": os.path.join(out, "logs", "metrics.jsonl"),
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    full = next(r for r in results["runs"] if r["method"] == "full")
    for r in results["runs"]:
        r["step_time_vs_full"] = full["tokens_per_s"] / r["tokens_per_s"]
    for preset in ("chatglm-6b", "glm-130b"):
        for method in ("lora", "ptuning", "freeze", "full"):
            results["computed"].append({"preset": preset, "method": method, **computed_costs(preset, method)})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results["runs"], os.path.join(args.out, "heldout_loss.png"))
    print(json.dumps({"computed": results["computed"]}))


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        points = [json.loads(line) for line in open(r["metrics"])]
        points = [(p["step"], p["eval_loss"]) for p in points if "eval_loss" in p and set(p) == {"step", "eval_loss"}]
        ax.plot(
            *zip(*points),
            marker="o",
            ms=3,
            label=f"{r['method']}" + (" (INT4 base)" if r["quantize"] != "none" else ""),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out answer loss (nats/token)")
    ax.set_title("AdvertiseGen dev, glm-tiny base")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
