"""What a training run hears and writes: stop signals, metrics.jsonl and TensorBoard, the plot.

A stop signal (SIGTERM / SIGINT) only sets a flag; the loop passes it into the next step as this
process's vote, the step reduces the votes of all processes (`Trainer.update`'s `stop`), and every
process reads the same result with that step's metrics: all save and stop at the same step.
"""

from __future__ import annotations

import json
import os
import signal


class StopSignal:
    """SIGTERM/SIGINT set a flag (this process's stop vote); the loop saves and stops at the step
    boundary every process agrees on."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsWriter:
    """metrics.jsonl (one JSON object per step, flushed per line; a resumed run drops the lines
    past its restored step and appends) and TensorBoard events. Process 0 only."""

    def __init__(self, log_dir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.tensorboard = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tensorboard = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tensorboard.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def plot_metrics(jsonl: str, out_png: str) -> None:
    """Loss and gradient norms (total, embedding, rest) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl) as f:
        every = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in every if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], label="train loss")
    evals = [r for r in every if r.get("eval_loss") is not None]
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key in ("grad_norm", "embedding_grad_norm", "other_grad_norm"):
        ax2.semilogy(steps, [max(r[key], 1e-12) for r in rows], label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("gradient norm")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
