"""Fine-tuning quality and cost: every method from one base on AdvertiseGen, and a transformers + peft peer, in one run.

    python experiments/bench_finetune.py --steps 60 --batch 8 --eval-every 20 --eval-rows 128 --gen-rows 32 \\
        --peer-base-steps 100                                              # BENCHMARKS.md's run
    python experiments/bench_finetune.py --runs lora,prompt --no-peer ...   # some methods only
    python experiments/bench_finetune.py --peer-only ...                    # the peer comparison only
    python experiments/bench_finetune.py --objective dpo --steps 60 --batch 8 --eval-every 10
    python experiments/bench_finetune.py --objective reward --steps 60 --batch 8 --eval-every 10

For each run of RUNS (every method; LoRA also fused / apart, rsLoRA, DoRA and on an INT4 base):
finetune.py on the train rows, held-out answer loss on the first --eval-rows dev rows before and
after (the main figure: a model this small scores near 0 BLEU), then finetune_eval.py's BLEU-4 /
ROUGE on the first --gen-rows dev rows, greedy. Cost: trainable parameters, Adam state bytes and
adapter folder size for the checkpoint's model, the same counts computed from the chatglm-6b and
glm-130b configs, and the median step time (after the first few steps) over full fine-tuning's in
the same run.

The peer (bench_finetune_peer.py): LoRA on query/key/value of a small ChatGLM2-6B-block model
(random weights, or with --peer-base-steps first that many steps of full SFT on general
instructions), once with finetune.py and once with transformers' GlmForCausalLM + peft on its
`export.py --format hf-glm` folder, the same batches, objective, schedule and steps: step times,
held-out loss before, during and after, and each adapter read by the other framework.

Writes OUT/results.json ("runs", "computed", "peer"), OUT/heldout_loss.png and
OUT/peer_heldout_loss.png (the held-out curves); prints one JSON line per row.

--objective dpo / reward: the preference stages on the small preference set of
make_preference_set.py (the instruction demos' reference answers chosen, another row's answer in
the other language rejected), its last --eval-rows pairs held out: DPO, IPO, SimPO and ORPO with
LoRA and DPO with full fine-tuning (the cached reference), or the reward model with LoRA and full
(each + a value head); held-out pair accuracy and reward margin before step 1 and every
--eval-every steps (OUT/pair_accuracy.png), step time over the first run's in the same run.
"""

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "advertisegen"))
PRESETS = ("chatglm-6b", "glm-130b")


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run of the benchmark: a finetune.py --method with its --set knobs."""

    name: str
    method: str
    label: str  # what the table and the plot call it
    sets: tuple[str, ...] = ()
    quantize: str = "none"
    loss: str = "dpo"  # --objective dpo: finetune.py --loss


RUNS = (
    Run("lora", "lora", "LoRA r 8, fused query_key_value"),
    Run("lora-qkv", "lora", "LoRA r 8, query/key/value apart", ("lora_targets=query,key,value",)),
    Run("rslora", "lora", "rsLoRA r 8", ("lora_rslora=true",)),
    Run("dora", "lora", "DoRA r 8", ("lora_dora=true",)),
    Run("lora-int4", "lora", "LoRA r 8 on an INT4 base", quantize="int4"),
    Run("ptuning", "ptuning", "P-tuning v2, 128 prefix"),
    Run("prefix-tuning", "ptuning", "prefix tuning (P-tuning v2 + projection)", ("prefix_projection=true",)),
    Run("prompt", "prompt", "prompt tuning"),
    Run("ptuning-v1", "ptuning-v1", "P-tuning v1, MLP encoder"),
    Run("adapter", "adapter", "bottleneck adapters"),
    Run("ia3", "ia3", "IA3"),
    Run("freeze", "freeze", "freeze, last 2 layers"),
    Run("full", "full", "full"),
)
PAIR_RUNS = {
    "dpo": (
        Run("dpo", "lora", "DPO, LoRA r 8"),
        Run("ipo", "lora", "IPO, LoRA r 8", loss="ipo"),
        Run("simpo", "lora", "SimPO, LoRA r 8", loss="simpo"),
        Run("orpo", "lora", "ORPO, LoRA r 8", loss="orpo"),
        Run("dpo-full", "full", "DPO, full (cached reference)"),
    ),
    "reward": (
        Run("reward", "lora", "reward model, LoRA r 8 + value head"),
        Run("reward-full", "full", "reward model, full + value head"),
    ),
}
PAIR_KEYS = ("trainable_params", "first_loss", "final_loss", "lr", "eval_pairs")
TRAIN_KEYS = (
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


def computed_costs(preset: str, run: Run) -> dict:
    """Parameter counts of a run's method and knobs on a preset's config, from shapes alone."""
    from finetune import split_sets

    from glm_jax.config import get_config
    from glm_jax.peft import PeftConfig, count, split_shapes

    knobs, _ = split_sets(run.sets, PeftConfig)
    peft = PeftConfig(run.method, **knobs)
    trainable, frozen = split_shapes(peft, peft.model_config(get_config(preset)))
    n = count(trainable)
    return {
        "trainable_params": n,
        "optimizer_bytes": 8 * n,
        "adapter_bytes_fp32": 4 * n,
        "trainable_fraction": n / (n + count(frozen)),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join("runs", "default", "checkpoints"))
    ap.add_argument("--out", default=os.path.join("runs", "bench_finetune"), help="emptied first")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=256)
    ap.add_argument("--gen-rows", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64, help="generation budget per row")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--objective", choices=("sft", "dpo", "reward"), default="sft")
    ap.add_argument("--runs", default=None, help="comma-separated subset of the runs (default: all of the objective's)")
    peer = ap.add_mutually_exclusive_group()
    peer.add_argument("--no-peer", action="store_true", help="skip the transformers + peft comparison")
    peer.add_argument("--peer-only", action="store_true", help="only the transformers + peft comparison")
    ap.add_argument("--peer-layers", type=int, default=4)
    ap.add_argument("--peer-hidden", type=int, default=256, help="a multiple of 64 (heads of 32, 2 KV heads)")
    ap.add_argument(
        "--peer-base-steps",
        type=int,
        default=0,
        help="full SFT steps on the Alpaca demo instructions before the LoRA runs (0: the random base itself)",
    )
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "eval_rows", "gen_rows", "gen_tokens", "eval_every", "peer_layers"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.peer_base_steps < 0:
        ap.error(f"--peer-base-steps must be >= 0, got {args.peer_base_steps}")
    from bench_finetune_peer import INSTRUCTIONS

    missing = [f for f in INSTRUCTIONS if not os.path.isfile(f)]
    if args.peer_base_steps and not args.no_peer and missing:
        ap.error(f"--peer-base-steps trains on {missing}, which are missing")
    if args.peer_hidden <= 0 or args.peer_hidden % 64:
        ap.error(f"--peer-hidden must be a positive multiple of 64, got {args.peer_hidden}")
    known = RUNS if args.objective == "sft" else PAIR_RUNS[args.objective]
    names = [n.strip() for n in (args.runs or ",".join(r.name for r in known)).split(",") if n.strip()]
    unknown = sorted(set(names) - {r.name for r in known})
    if unknown or not names:
        ap.error(f"--runs {args.runs!r}: unknown {unknown}; choose from {[r.name for r in known]}")
    args.runs = names
    if not os.path.isdir(DATA):
        ap.error(f"no AdvertiseGen data at {DATA} (../shared/data/advertisegen beside the project)")
    return args


def finetune_args(run: Run, args, out: str) -> list[str]:
    """finetune.py's flags for one run."""
    return [
        "--method",
        run.method,
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
        run.quantize,
        "--no-progress",
        *[x for s in run.sets for x in ("--set", s)],
    ]


def eval_args(run: Run, args, out: str) -> list[str]:
    """finetune_eval.py's flags: greedy replies of the run's adapter on the first --gen-rows dev rows."""
    return [
        "--checkpoint",
        args.checkpoint,
        "--adapter",
        out,
        "--quantize",
        run.quantize,
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


def bench_run(run: Run, args) -> dict:
    """Train, evaluate and generate one run -> its row."""
    import finetune
    import finetune_eval
    from bench_finetune_peer import median_step_time, ours_metrics

    out = os.path.join(args.out, run.name)
    train = finetune.main(finetune_args(run, args, out))
    gen = finetune_eval.main(eval_args(run, args, out))
    metrics = os.path.join(out, "logs", "metrics.jsonl")
    return {
        "run": run.name,
        "label": run.label,
        "method": run.method,
        "sets": list(run.sets),
        "quantize": run.quantize,
        **{k: train[k] for k in TRAIN_KEYS},
        "step_time_s": median_step_time(ours_metrics(metrics)["step_times"]),
        **{k: gen[k] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")},
        "metrics": metrics,
    }


def pair_data(args) -> tuple[str, str]:
    """The small preference set (make_preference_set.py, both languages) split into OUT/pairs/train.jsonl
    and its last --eval-rows pairs, OUT/pairs/held_out.jsonl."""
    import make_preference_set

    folder = os.path.join(args.out, "pairs")
    every = os.path.join(folder, "all.jsonl")
    make_preference_set.main(["--out", every, "--lang", "both"])
    with open(every, encoding="utf-8") as f:
        rows = f.readlines()
    paths = os.path.join(folder, "train.jsonl"), os.path.join(folder, "held_out.jsonl")
    for path, part in zip(paths, (rows[: -args.eval_rows], rows[-args.eval_rows :])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(part)
    return paths


def pair_run(run: Run, args, data: tuple[str, str]) -> dict:
    """One preference run -> its row: held-out pair accuracy and margin per evaluation, step time."""
    import finetune
    from bench_finetune_peer import median_step_time, ours_metrics

    out = os.path.join(args.out, run.name)
    flags = finetune_args(run, args, out)
    flags[flags.index("--data") + 1], flags[flags.index("--eval-data") + 1] = data
    flags += ["--objective", args.objective] + (["--loss", run.loss] if args.objective == "dpo" else [])
    train = finetune.main(flags)
    metrics = os.path.join(out, "logs", "metrics.jsonl")
    with open(metrics) as f:
        evals = [p for p in map(json.loads, f) if "eval_pair_accuracy" in p]
    return {
        "run": run.name,
        "label": run.label,
        "method": run.method,
        "loss": run.loss if args.objective == "dpo" else "reward",
        **{k: train[k] for k in PAIR_KEYS},
        "accuracy_curve": [(p["step"], p["eval_pair_accuracy"]) for p in evals],
        "margin_curve": [(p["step"], p["eval_reward_margin"]) for p in evals],
        "step_time_s": median_step_time(ours_metrics(metrics)["step_times"]),
    }


def pair_main(args) -> dict:
    """--objective dpo / reward: every run of PAIR_RUNS[objective] on the small preference set."""
    from benchutil import environment

    results = {"environment": environment(), "args": vars(args), "runs": []}
    data = pair_data(args)
    for run in (r for r in PAIR_RUNS[args.objective] if r.name in args.runs):
        row = pair_run(run, args, data)
        row["step_time_vs_first"] = row["step_time_s"] / (results["runs"] or [row])[0]["step_time_s"]
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    series = [(r["label"], r["accuracy_curve"]) for r in results["runs"]]
    title = f"{args.objective}: held-out pair accuracy ({args.eval_rows} pairs), glm-tiny base"
    plot(series, title, os.path.join(args.out, "pair_accuracy.png"), "held-out pair accuracy")
    return results


def main(argv=None):
    args = parse_args(argv)
    import shutil

    if args.objective != "sft":
        shutil.rmtree(args.out, ignore_errors=True)
        return pair_main(args)
    from bench_finetune_peer import compare, ours_metrics
    from benchutil import environment

    shutil.rmtree(args.out, ignore_errors=True)  # fresh runs: a resumed one would time nothing
    results = {"environment": environment(), "args": vars(args), "runs": [], "computed": []}
    runs = [r for r in RUNS if r.name in args.runs]
    if not args.peer_only:
        for run in runs:
            results["runs"].append(bench_run(run, args))
            print(json.dumps(results["runs"][-1]), flush=True)
        full = next((r for r in results["runs"] if r["method"] == "full"), None)
        for r in results["runs"]:
            r["step_time_vs_full"] = r["step_time_s"] / full["step_time_s"] if full else None
        for preset in PRESETS:
            for run in runs:
                if run.quantize == "none":
                    results["computed"].append({"preset": preset, "run": run.name, **computed_costs(preset, run)})
        print(json.dumps({"computed": results["computed"]}), flush=True)
    if not args.no_peer:
        results["peer"] = compare(
            os.path.join(args.out, "peer"),
            os.path.join(DATA, "train.json"),
            os.path.join(DATA, "dev.json"),
            args.steps,
            args.batch,
            args.eval_rows,
            args.eval_every,
            args.peer_layers,
            args.peer_hidden,
            args.peer_base_steps,
        )
        print(json.dumps({"peer": peer_summary(results["peer"])}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if results["runs"]:
        series = [(r["label"], ours_metrics(r["metrics"])["eval_curve"]) for r in results["runs"]]
        plot(series, "AdvertiseGen dev, glm-tiny base", os.path.join(args.out, "heldout_loss.png"))
    if "peer" in results:
        peer = results["peer"]
        series = [("glm_jax", peer["glm_jax"]["eval_curve"])]
        series.append(("transformers + peft", peer["transformers_peft"]["eval_curve"]))
        plot(series, "LoRA, AdvertiseGen dev, tiny ChatGLM2 block", os.path.join(args.out, "peer_heldout_loss.png"))
    return results


def peer_summary(peer: dict) -> dict:
    """The peer section without its per-step lists (one printable line)."""
    lists = ("eval_curve", "losses", "step_times", "lrs", "answer_tokens")
    side = lambda d: {k: v for k, v in d.items() if k not in lists}  # noqa: E731
    return {**peer, "glm_jax": side(peer["glm_jax"]), "transformers_peft": side(peer["transformers_peft"])}


def plot(series, title: str, path: str, ylabel: str = "held-out answer loss (nats/token)"):
    """Held-out curves: series of (label, [(step, value), ...])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tab20 = plt.get_cmap("tab20").colors  # 13 runs: the default cycle of 10 would repeat
    colors = tab20[0::2] + tab20[1::2]  # the strong colours first, then their light pairs
    for i, (label, points) in enumerate(series):
        ax.plot(*zip(*points), marker="o", ms=3, label=label, color=colors[i % len(colors)])
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
