"""The fine-tuning benchmark's peer: transformers + peft LoRA on the same tiny model, same data, same objective.

bench_finetune.py calls `compare`: it builds a small ChatGLM2-6B-block model (random weights, fp32,
ChatGLM2's real tokenizer; bench_serve.py's `build`: a serving checkpoint), optionally full-fine-tunes
it for a few steps on general instructions (`base_steps`, so that LoRA adapts a model that has
learnt something), exports it with `experiments/export.py --format hf-glm`, then trains LoRA on it
twice:

- ours: `experiments/finetune.py --method lora --set lora_targets=query,key,value` (r 8, alpha 32,
  dropout 0.1);
- the peer: `GlmForCausalLM.from_pretrained(export)` wrapped by peft's `LoraConfig(target_modules=
  [q_proj, k_proj, v_proj])` with the same r, alpha and dropout, torch AdamW (no weight decay,
  betas (0.9, 0.999), eps 1e-8), global-norm clip 1.0 and the learning rate finetune.py's
  `OptimConfig` gives each step (`glm_jax.optim.learning_rate`).

Both see exactly the same training batches: step s is sequences s*B .. s*B+B-1 of the
`glm_jax.sft.SFTBuilder` finetune.py builds (same files, seed, lengths). Ours trains on them packed;
the peer gets each packed sequence's segments (one sample each) as separate right-padded rows, with
the segment's own position ids (they restart at 0 per segment, as ours do). Both minimise the same
token mean of the answer-token NLL over the step's whole batch. Measured for both: step time (the
median after the first few steps), the held-out answer loss on the same dev rows before training,
every --eval-every steps and after; and each trained adapter read by the other framework (ours
exported with `export.py --format peft` into peft, peft's `save_pretrained` folder into
`load_model(..., adapter=)`), whose held-out loss should equal its own framework's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LORA = dict(r=8, alpha=32.0, dropout=0.1)
INSTRUCTIONS = [
    os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "instructions", f"alpaca_{lang}_demo.json"))
    for lang in ("zh", "en")
]
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj"]  # GlmForCausalLM's names of our query, key, value
WARMUP_STEPS = 3  # steps left out of the median step time (the first compiles / warms the allocator)
SAMPLE_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "prefix_mask")


class PeerError(RuntimeError):
    """The peer cannot run what ours runs (a layout or data it cannot take)."""


# ---- data: packed sequences -> padded rows ---------------------------------------------------------------
def segments(sequence: dict) -> list[dict]:
    """A packed sequence (the batch contract, each key [S]) -> its samples in order, each key [n]."""
    ids = sequence["segment_ids"]
    out = []
    for s in range(1, int(ids.max(initial=0)) + 1):
        at = np.nonzero(ids == s)[0]
        sample = {k: np.asarray(sequence[k])[at] for k in SAMPLE_KEYS}
        if sample["prefix_mask"].any():
            raise PeerError("a prefix-LM sample (bidirectional prompt): GlmForCausalLM is causal only")
        out.append(sample)
    return out


def padded_rows(sequences) -> dict:
    """Packed sequences -> their segments as right-padded rows, torch tensors [R, T] (T the longest
    segment): input_ids, attention_mask, position_ids, labels (-100 where no loss)."""
    import torch

    samples = [s for seq in sequences for s in segments(seq)]
    width = max(len(s["tokens"]) for s in samples)
    rows = {
        "input_ids": np.zeros((len(samples), width), np.int64),
        "attention_mask": np.zeros((len(samples), width), np.int64),
        "position_ids": np.zeros((len(samples), width), np.int64),
        "labels": np.full((len(samples), width), -100, np.int64),
    }
    for i, s in enumerate(samples):
        n = len(s["tokens"])
        rows["input_ids"][i, :n] = s["tokens"]
        rows["attention_mask"][i, :n] = 1
        rows["position_ids"][i, :n] = s["position_ids"]
        rows["labels"][i, :n] = np.where(s["loss_mask"] > 0, s["targets"], -100)
    return {k: torch.from_numpy(v) for k, v in rows.items()}


def step_sequences(builder, step: int, batch: int) -> list[dict]:
    """The packed sequences of training step `step`, as data.DataIterator hands them to ours."""
    return [builder.build(step * batch + r) for r in range(batch)]


# ---- the objective ------------------------------------------------------------------------------------
def answer_loss_sum(model, rows: dict):
    """(sum of the answer tokens' NLL, their count) of padded rows: logits [R, T, V] -> scalars."""
    import torch.nn.functional as F

    logits = model(
        input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], position_ids=rows["position_ids"]
    ).logits
    labels = rows["labels"]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def heldout_loss(model, sequences, batch: int) -> float:
    """Mean answer-token NLL over packed held-out sequences, no dropout (as ours evaluates)."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            nll, n = answer_loss_sum(model, padded_rows(sequences[i : i + batch]))
            total, count = total + float(nll), count + n
    model.train()
    return total / max(count, 1.0)


def finetune_optim(lr: float, warmup: float = 0.0):
    """The OptimConfig experiments/finetune.py builds (transformers' Trainer defaults: AdamW, no weight
    decay, b2 0.999, clip 1.0; the schedule from lr, warm-up and cosine to 0)."""
    from glm_jax.optim import OptimConfig

    return OptimConfig(
        peak_lr=lr,
        init_lr=lr if warmup == 0 else lr * 1e-3,
        warmup_fraction=warmup,
        min_lr_ratio=0.0,
        weight_decay=0.0,
        b2=0.999,
    )


def step_lrs(lr: float, steps: int, batch: int) -> list[float]:
    """The learning rate of each step, as ours computes it (samples seen before the step)."""
    from glm_jax.optim import learning_rate

    optim = finetune_optim(lr)
    return [float(learning_rate(optim, s * batch, steps * batch)) for s in range(steps)]


def median_step_time(times: list[float]) -> float:
    """Median seconds per step after the first WARMUP_STEPS (at least the last step counts)."""
    return statistics.median(times[min(WARMUP_STEPS, len(times) - 1) :])


# ---- the peer ------------------------------------------------------------------------------------------
def peer_model(exported: str, seed: int):
    """GlmForCausalLM from the export, wrapped in peft's LoRA (peft's default init: kaiming A, zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GlmForCausalLM

    torch.manual_seed(seed)
    base = GlmForCausalLM.from_pretrained(exported, dtype=torch.float32)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=PEFT_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def train_peer(exported: str, builder, eval_builder, steps: int, batch: int, lr: float, eval_every: int, seed: int):
    """LoRA with transformers + peft on the same batches and schedule as ours -> its measurements and
    the trained model."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # XLA's CPU pool is sized to the same cores
    model = peer_model(exported, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    lrs = step_lrs(lr, steps, batch)
    curve = [(0, heldout_loss(model, eval_builder.sequences, batch))]
    model.train()
    losses, times, rows, positions, answers = [], [], [], [], []
    for step in range(steps):
        data = padded_rows(step_sequences(builder, step, batch))
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        t0 = time.perf_counter()
        nll, n = answer_loss_sum(model, data)
        loss = nll / max(n, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        answers.append(n)
        rows.append(int(data["input_ids"].shape[0]))
        positions.append(int(data["input_ids"].numel()))
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append((step + 1, heldout_loss(model, eval_builder.sequences, batch)))
    curve.append((steps, heldout_loss(model, eval_builder.sequences, batch)))
    result = {
        "trainable_params": sum(p.numel() for p in trainable),
        "initial_eval_loss": curve[0][1],
        "eval_loss": curve[-1][1],
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "step_time_s": median_step_time(times),
        "rows_per_step": statistics.mean(rows),
        "padded_positions_per_step": statistics.mean(positions),
        "threads": torch.get_num_threads(),
        "attention": model.base_model.model.config._attn_implementation,
        "eval_curve": curve,
        "losses": losses,
        "step_times": times,
        "lrs": lrs,
        "answer_tokens": answers,
    }
    return result, model


# ---- cross-reads: each framework's adapter in the other -----------------------------------------------------
def peft_reads_ours(checkpoint: str, exported: str, adapter: str, out: str, eval_builder, batch: int) -> float:
    """Our trained adapter exported with export.py --format peft, loaded by peft on the export ->
    its held-out loss (equals ours' when both frameworks compute the same model)."""
    import torch
    from peft import PeftModel
    from transformers import GlmForCausalLM

    folder = os.path.join(out, "ours-as-peft")
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "export.py"),
            "--checkpoint",
            checkpoint,
            "--adapter",
            adapter,
            "--out",
            folder,
            "--format",
            "peft",
            "--layout",
            "hf-glm",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    base = GlmForCausalLM.from_pretrained(exported, dtype=torch.float32)
    return heldout_loss(PeftModel.from_pretrained(base, folder), eval_builder.sequences, batch)


def ours_reads_peft(checkpoint: str, peft_model, out: str, eval_builder, batch: int) -> float:
    """peft's trained adapter (save_pretrained) read by `load_model(..., adapter=)` -> its held-out
    loss in glm_jax (equals peft's own)."""
    from glm_jax.evaluate import sft_loss
    from glm_jax.loading import load_model

    folder = os.path.join(out, "peft-adapter")
    peft_model.save_pretrained(folder)
    m = load_model(checkpoint, adapter=folder)
    return sft_loss(m.config, m.params, eval_builder.sequences, batch)


# ---- the comparison ----------------------------------------------------------------------------------------
def ours_lora_args(checkpoint, train_file, eval_file, out, steps, batch, eval_rows, eval_every, seed) -> list[str]:
    """finetune.py's flags for our side: LoRA on query, key, value as peft's q/k/v_proj target."""
    sets = [
        "lora_targets=query,key,value",
        f"lora_rank={LORA['r']}",
        f"lora_alpha={LORA['alpha']}",
        f"lora_dropout={LORA['dropout']}",
    ]
    return [
        "--method",
        "lora",
        "--checkpoint",
        checkpoint,
        "--data",
        train_file,
        "--eval-data",
        eval_file,
        "--eval-limit",
        str(eval_rows),
        "--out",
        out,
        "--steps",
        str(steps),
        "--batch",
        str(batch),
        "--eval-every",
        str(eval_every),
        "--ckpt-every",
        str(steps),
        "--seed",
        str(seed),
        "--no-progress",
        *[x for s in sets for x in ("--set", s)],
    ]


def builders(checkpoint: str, train_file: str, eval_file: str, eval_rows: int, seed: int, seq_len: int):
    """The training and held-out SFTBuilders exactly as finetune.py builds them (its default lengths)."""
    from glm_jax.loading import load_model
    from glm_jax.sft import SFTBuilder

    m = load_model(checkpoint)
    common = dict(
        family=m.family,
        tok=m.tokenizer,
        two_d=m.config.position_encoding_2d,
        seq_len=seq_len,
        max_source=64,
        max_target=128,
        last_only=False,
    )
    train = SFTBuilder.from_files([train_file], seed=seed, **common)
    held_out = SFTBuilder.from_files([eval_file], seed=seed, shuffle=False, limit=eval_rows or None, **common)
    return train, held_out


def ours_metrics(metrics_file: str) -> dict:
    """Our run's metrics.jsonl -> {"eval_curve": [(step, loss)], and per step: "losses",
    "step_times", "lrs", "answer_tokens"}."""
    import json

    out = {"eval_curve": [], "losses": [], "step_times": [], "lrs": [], "answer_tokens": []}
    with open(metrics_file) as f:
        for line in f:
            p = json.loads(line)
            if set(p) == {"step", "eval_loss"}:
                out["eval_curve"].append((p["step"], p["eval_loss"]))
            elif "loss" in p:
                for key, name in (("losses", "loss"), ("step_times", "step_time"), ("lrs", "learning_rate")):
                    out[key].append(p[name])
                out["answer_tokens"].append(int(p["tokens"]))
    return out


def export_hf(checkpoint: str, out: str) -> str:
    """experiments/export.py --format hf-glm in float32 -> the folder."""
    args = ["--checkpoint", checkpoint, "--out", out, "--format", "hf-glm", "--dtype", "float32"]
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), *args], check=True, stdout=subprocess.DEVNULL)
    return out


def base_model(out: str, layers: int, hidden: int, base_steps: int, batch: int) -> tuple[str, str, str]:
    """The peer comparison's base: bench_serve.py's random ChatGLM2-block model, then, with base_steps,
    that many steps of full fine-tuning on the general Alpaca demo instructions (zh + en; lr 1e-3)
    so that LoRA adapts a model that has learnt something, saved as a serving checkpoint ->
    (checkpoint, hf-glm export, description)."""
    import finetune
    from bench_serve import build

    from glm_jax.checkpoints import move_to_device, save_serving
    from glm_jax.loading import load_model
    from glm_jax.tokenizer import bundled_file

    checkpoint, exported = build(out, layers, hidden)
    what = f"chatglm2-6b block, {layers} layers x {hidden} hidden, float32, random weights (seed 0)"
    if not base_steps:
        return checkpoint, exported, what
    sft = os.path.join(out, "base-sft")
    args = ["--method", "full", "--checkpoint", checkpoint, "--out", sft, "--no-progress"]
    args += [x for f in INSTRUCTIONS for x in ("--data", f)]
    args += ["--steps", str(base_steps), "--batch", str(batch), "--lr", "1e-3", "--ckpt-every", str(base_steps)]
    finetune.main(args)
    m = load_model(checkpoint, adapter=sft)  # a full run's adapter is every parameter
    what += f", then {base_steps} steps of full SFT on {[os.path.basename(f) for f in INSTRUCTIONS]} at lr 1e-3"
    checkpoint = os.path.join(out, "checkpoint-sft")
    save_serving(checkpoint, m.config, move_to_device(m.params), 0, what, m.family.name, bundled_file(m.tokenizer))
    return checkpoint, export_hf(checkpoint, os.path.join(out, "hf-glm-sft")), what


def compare(
    out: str,
    train_file: str,
    eval_file: str,
    steps: int,
    batch: int,
    eval_rows: int,
    eval_every: int,
    layers: int = 4,
    hidden: int = 256,
    base_steps: int = 0,
    seed: int = 0,
) -> dict:
    """The peer comparison, in `out` -> the results' "peer" section."""
    import finetune
    import peft
    import torch
    import transformers

    checkpoint, exported, what = base_model(out, layers, hidden, base_steps, batch)
    ours_out = os.path.join(out, "glm_jax-lora")
    report = finetune.main(
        ours_lora_args(checkpoint, train_file, eval_file, ours_out, steps, batch, eval_rows, eval_every, seed)
    )
    train, held_out = builders(checkpoint, train_file, eval_file, eval_rows, seed, report["seq_len"])
    logged = ours_metrics(os.path.join(ours_out, "logs", "metrics.jsonl"))
    ours = {
        **{k: report[k] for k in ("trainable_params", "initial_eval_loss", "eval_loss", "first_loss", "final_loss")},
        "step_time_s": median_step_time(logged["step_times"]),
        "rows_per_step": batch,
        "padded_positions_per_step": batch * report["seq_len"],
        **logged,
    }
    peer, peft_model = train_peer(exported, train, held_out, steps, batch, report["lr"], eval_every, seed)
    ours["eval_loss_in_peft"] = peft_reads_ours(checkpoint, exported, report["adapter_dir"], out, held_out, batch)
    peer["eval_loss_in_glm_jax"] = ours_reads_peft(checkpoint, peft_model, out, held_out, batch)
    tokens = sum(int((s["segment_ids"] > 0).sum()) for s in (train.build(i) for i in range(steps * batch)))
    return {
        "base": {
            "model": what,
            "checkpoint": checkpoint,
            "export": exported,
        },
        "lora": dict(LORA, ours_targets="query,key,value", peft_targets=PEFT_TARGETS),
        "lr": report["lr"],
        "lr_max_abs_diff": max(abs(a - b) for a, b in zip(ours["lrs"], peer["lrs"])),
        "same_answer_tokens": ours["answer_tokens"] == peer["answer_tokens"],
        "steps": steps,
        "batch": batch,
        "seq_len": report["seq_len"],
        "real_tokens_per_step": tokens / steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "glm_jax": ours,
        "transformers_peft": peer,
        "peer_step_time_over_ours": peer["step_time_s"] / ours["step_time_s"],
    }
