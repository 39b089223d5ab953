"""PPO on a checkpoint (glm_jax/ppo.py): rollouts from the serving engine, the actor a LoRA on the
frozen base, the critic a LoRA and a value head on the same base, the reward a reward model.

    python experiments/ppo.py --checkpoint runs/default/checkpoints --reward-model runs/rm \\
        --prompts prompts.jsonl --out runs/ppo --rounds 20 --batch 8 --max-new-tokens 32
    python experiments/ppo.py ... --reward-token 100      # a toy reward: how often id 100 is sampled

--reward-model is `finetune.py --objective reward`'s --out (a LoRA + value-head adapter on this
base; it also starts the critic, as ColossalChat does); --reward-token instead scores a response by
the count of one token id (the issue's toy reward, for tests and benchmarks without a reward
model). Prompts: JSON lines (or one JSON array) of {"prompt": str}, {"prompt": [messages]},
{"messages": [{"role"|"from", "content"}, ...]} ending with the user's query, or {"instruction",
"input"}; each becomes the family's chat prompt (as serve.py builds it), its oldest history rounds
dropped to fit max_sequence_length - --max-new-tokens; unusable rows are skipped and counted.
Defaults are trl's PPOConfig (kl_coef 0.05, gamma 1, lambda 0.95, clip 0.2, value clip 0.2,
vf_coef 0.1, 4 PPO epochs, lr 1e-5); `--set` takes the actor's LoRA knobs as finetune.py does
(lora_rank=16, lora_alpha=32, lora_targets=query_key_value,dense, ...), also the fresh critic's.

Writes OUT/logs/rounds.jsonl (one line per round: reward, KL per token to the base, response
length, losses, clip fractions, seconds), OUT/logs/ppo.png (reward and KL per round) and
OUT/adapter (the actor: `--adapter OUT` on generate.py and serve.py). Ends with a one-line JSON
summary. Bad input exits 2 with a message saying what to fix.
"""

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from glm_jax.script_args import DEFAULT_CHECKPOINTS, add_mesh_arg, prepare_devices  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS, help="the base model (any checkpoint folder)")
    reward = ap.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", metavar="DIR", help="finetune.py --objective reward's --out on this base")
    reward.add_argument("--reward-token", type=int, metavar="ID", help="toy reward: the count of this id in a response")
    ap.add_argument("--prompts", required=True, metavar="FILE", help="JSON lines of prompts (see above)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="prompts (rollouts) per round")
    ap.add_argument("--minibatch", type=int, default=0, help="rollouts per optimizer step (0: the whole batch)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="beta of the per-token KL penalty to the base")
    ap.add_argument("--lr", type=float, default=1e-5, help="the actor's AdamW learning rate")
    ap.add_argument("--critic-lr", type=float, default=0.0, help="the critic's (0: --lr)")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="passes over each round's rollouts")
    ap.add_argument("--vf-coef", type=float, default=0.1)
    ap.add_argument("--cliprange", type=float, default=0.2)
    ap.add_argument("--cliprange-value", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0, help="seeds the adapters' init, the prompt order and the rollouts")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a LoRA knob (lora_rank, ...)")
    ap.add_argument("--tokenizer", default=None, metavar="FILE")
    ap.add_argument("--family", default=None)
    ap.add_argument("--no-progress", action="store_true", help="no line per round on stderr")
    add_mesh_arg(ap)
    args = ap.parse_args(argv)
    for name in ("rounds", "batch", "max_new_tokens", "ppo_epochs"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.minibatch < 0 or (args.minibatch and args.batch % args.minibatch):
        ap.error(f"--minibatch {args.minibatch} must divide --batch {args.batch}")
    if not os.path.isfile(args.prompts):
        ap.error(f"--prompts {args.prompts!r}: no such file")
    prepare_devices(ap, args.mesh)
    return args


def lora_config(items):
    """--set items -> the actor's PeftConfig (LoRA knobs only)."""
    from finetune import split_sets

    from glm_jax.config import ConfigError
    from glm_jax.peft import PeftConfig

    knobs, model = split_sets(items, PeftConfig)
    if model or "value_head" in knobs or "method" in knobs:
        raise ConfigError(
            f"--set {items}: PPO takes the actor's LoRA knobs (lora_rank, lora_alpha, lora_targets, lora_dropout, "
            "lora_rslora, ...), not model config fields"
        )
    return PeftConfig("lora", **knobs)


def reward_of(args, base):
    """The reward: the --reward-model adapter (checked against the base) or the toy token count."""
    from glm_jax.adapters import load_adapter
    from glm_jax.config import ConfigError
    from glm_jax.peft import check_base

    if args.reward_model is None:
        if not 0 <= args.reward_token < base.config.vocab_size:
            raise ConfigError(
                f"--reward-token {args.reward_token} is not an id of the vocabulary (0..{base.config.vocab_size - 1})"
            )
        token = args.reward_token
        return lambda prompt, response: float(sum(t == token for t in response))
    adapter = load_adapter(args.reward_model)
    if not adapter.peft.is_adapter:
        raise ConfigError(
            f"the reward model {adapter.path} is a {adapter.peft.method} fine-tune; PPO puts it on the shared base, "
            "so it must be an adapter method (lora, ...)"
        )
    check_base(adapter.base, base.config, base.params, base.step, adapter.path)
    return adapter


def plot_rounds(jsonl: str, out_png: str) -> None:
    """The mean reward and the mean KL per token to the base against the round (runlog's style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(rounds, [r["reward"] for r in rows], "o-", label="reward (score)")
    ax1.plot(rounds, [r["rlhf_reward"] for r in rows], "--", label="score - kl_coef x KL")
    ax1.set_ylabel("mean reward")
    ax1.legend()
    ax2.plot(rounds, [r["kl_per_token"] for r in rows], "o-", color="tab:red")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("round")
    ax2.set_ylabel("KL to the base (nats / token)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from glm_jax.adapters import save_adapter
    from glm_jax.checkpoints import CheckpointError
    from glm_jax.config import ConfigError
    from glm_jax.data import DataError
    from glm_jax.generate import GenerationError
    from glm_jax.peft import base_identity
    from glm_jax.ppo import PPO, PPOSettings, read_prompts, round_prompts
    from glm_jax.script_args import load_model_or_exit
    from glm_jax.tokenizer import bundled_file

    out = os.path.abspath(args.out)
    log = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    args.quantize, args.adapter = "none", None
    base = load_model_or_exit(args)
    try:
        lora = lora_config(args.set)
        settings = PPOSettings(
            batch=args.batch,
            minibatch=args.minibatch,
            ppo_epochs=args.ppo_epochs,
            max_new_tokens=args.max_new_tokens,
            kl_coef=args.kl_coef,
            gamma=args.gamma,
            lam=args.lam,
            cliprange=args.cliprange,
            cliprange_value=args.cliprange_value,
            vf_coef=args.vf_coef,
            lr=args.lr,
            critic_lr=args.critic_lr,
            seed=args.seed,
        )
        limit = base.config.max_sequence_length - args.max_new_tokens
        if limit < 2:
            raise ConfigError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within the model's "
                f"max_sequence_length={base.config.max_sequence_length}"
            )
        prompts, stats = read_prompts(args.prompts, base.family, base.tokenizer, limit)
        log(f"prompts: {json.dumps(stats.summary())}")
        reward = reward_of(args, base)
        identity = base_identity(base.config, base.params, base.step)
        ppo = PPO(
            base.config,
            base.take_params(),
            base.tokenizer.specials,
            base.family.causal,
            base.family.stop_ids(base.tokenizer),
            settings,
            lora,
            reward,
            max(len(p) for p in prompts),
            mesh=base.mesh,
        )
    except (ConfigError, DataError, CheckpointError, GenerationError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    jsonl = os.path.join(logs, "rounds.jsonl")
    rows = []
    try:
        with open(jsonl, "w") as f:
            for r in range(args.rounds):
                row = ppo.round(r, round_prompts(prompts, r, args.batch, args.seed))
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                log(
                    f"round {r}: reward {row['reward']:.4f}  KL/token {row['kl_per_token']:.4f}  "
                    f"length {row['response_length']:.1f}  {row['seconds']:.2f}s"
                )
    finally:
        ppo.close()
    plot = os.path.join(logs, "ppo.png")
    plot_rounds(jsonl, plot)
    # written beside, then swapped in: a run again into the same --out replaces its adapter
    tmp = os.path.join(out, ".adapter.new")
    shutil.rmtree(tmp, ignore_errors=True)
    written = save_adapter(
        tmp, ppo.actor_config, lora, ppo.actor, args.rounds, identity, base.family.name, bundled_file(base.tokenizer)
    )
    adapter = os.path.join(out, "adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(written, adapter)
    shutil.rmtree(tmp, ignore_errors=True)
    first, last = rows[: min(5, len(rows))], rows[-min(5, len(rows)) :]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    summary = {
        "rounds": args.rounds,
        "prompts": stats.summary(),
        "reward": "model" if args.reward_model else f"count of id {args.reward_token}",
        "first_rounds_reward": mean(first, "reward"),
        "last_rounds_reward": mean(last, "reward"),
        "last_rounds_kl_per_token": mean(last, "kl_per_token"),
        "max_kl_per_token": max(r["kl_per_token"] for r in rows),
        "mean_response_length": mean(rows, "response_length"),
        "round_seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2],
        "wall_seconds": time.perf_counter() - start,
        "rounds_jsonl": jsonl,
        "plot": plot,
        "adapter_dir": adapter,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
