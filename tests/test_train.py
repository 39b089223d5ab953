"""Training end to end: pretrain.py on 8x4, kill -9 mid-ramp on a pipeline and resume, errors."""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import pytest

from glm_jax import sharding as sh
from glm_jax.optim import OptimConfig
from glm_jax.checkpoints import Checkpoints
from glm_jax.train import Trainer, TrainingError, RunConfig, train
import sharding_case as case

ROOT = pathlib.Path(__file__).parents[1]
PRETRAIN = str(ROOT / "experiments" / "pretrain.py")
SMALL = ["--set", "num_layers=2", "--seq", "64", "--batch", "4", "--no-progress"]
# 2 pipeline stages (1F1B), the batch ramping 1 -> 4 over steps 1-8 of 10
RAMPED = [*SMALL, "--mesh", "2x1", "--ramp-start", "1", "--ramp-increment", "1", "--ramp-fraction", "0.3"]


def _env():
    # no XLA_FLAGS: the script sets its own device count (--mesh), and its runs of many steps are
    # faster compiled at XLA's default optimisation level than at the suite's -O0
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def pretrain(run_dir, *extra, check=True, timeout=600):
    args = [sys.executable, PRETRAIN, "--ckpt-dir", f"{run_dir}/ck", "--log-dir", f"{run_dir}/log", *extra]
    out = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir) -> dict:
    out = {}
    with open(f"{run_dir}/log/metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


def test_pretrain_8x4_trains_and_the_loss_falls(tmp_path):
    out = pretrain(tmp_path, "--mesh", "8x4", "--steps", "5", "--seq", "64", "--batch", "4", "--no-progress",
                   "--lr", "1e-2", "--warmup", "0", "--eval-every", "5", timeout=900)
    assert "simulating 32 CPU devices" in out.stderr and "1f1b" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    loss = losses(tmp_path)
    assert sorted(loss) == list(range(1, 6)) and summary["final_loss"] == loss[5]
    # the held-out loss on the same batches, before step 1 and after step 5
    assert summary["eval_loss"] < summary["initial_eval_loss"]
    assert (tmp_path / "log" / "metrics.png").exists() and (tmp_path / "log" / "summary.json").exists()
    assert any((tmp_path / "log" / "tensorboard").iterdir())


def _kill_when(run_dir, ready, steps, timeout=300):
    """Start a run, SIGKILL it once ready(run_dir) is true; return whether it was killed."""
    args = [sys.executable, PRETRAIN, "--ckpt-dir", f"{run_dir}/ck", "--log-dir", f"{run_dir}/log",
            "--steps", str(steps), "--ckpt-every", "3", *RAMPED]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if ready(run_dir):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _steps_logged(run_dir):
    try:
        with open(f"{run_dir}/log/metrics.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _saving(run_dir):
    try:
        return any("tmp" in name for name in os.listdir(f"{run_dir}/ck"))
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    pretrain(run_dir, "--steps", "10", "--ckpt-every", "3", *RAMPED)
    with open(f"{run_dir}/log/metrics.jsonl") as f:
        batches = [r["batch"] for r in map(json.loads, f) if "batch" in r]
    assert batches == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    return run_dir, losses(run_dir)


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, uninterrupted):
    at = random.Random(os.getpid()).randint(3, 8)  # mid-ramp
    assert _kill_when(tmp_path, lambda d: _steps_logged(d) >= at, 10), "the run ended before the kill"
    pretrain(tmp_path, "--steps", "10", "--ckpt-every", "3", *RAMPED)
    assert losses(tmp_path) == uninterrupted[1]  # bitwise: JSON floats round-trip exactly


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, uninterrupted):
    killed = _kill_when(tmp_path, _saving, 10)
    assert killed, "never saw a checkpoint being written"
    pretrain(tmp_path, "--steps", "10", "--ckpt-every", "3", *RAMPED)
    assert losses(tmp_path) == uninterrupted[1]


def test_checkpoint_from_another_config_is_a_clear_error(uninterrupted):
    out = pretrain(uninterrupted[0], "--steps", "12", *SMALL, "--set", "hidden_size=64", check=False)
    assert out.returncode == 2
    assert "trained with another model config" in out.stderr and "hidden_size: checkpoint 128 vs run 64" in out.stderr


def test_bad_flags_are_clear_errors(tmp_path):
    out = pretrain(tmp_path, "--mesh", "8by4", check=False)
    assert out.returncode == 2 and "expected PxT" in out.stderr
    out = pretrain(tmp_path, "--mesh", "1x3", "--steps", "1", check=False)
    assert out.returncode == 2 and "tensor axis of 3 does not divide num_attention_heads=4" in out.stderr
    out = pretrain(tmp_path, "--set", "num_layer=3", check=False)
    assert out.returncode == 2 and "unknown config field" in out.stderr
    out = pretrain(tmp_path, "--data", str(tmp_path / "missing.jsonl"), check=False)
    assert out.returncode == 2 and "not found" in out.stderr
    out = pretrain(tmp_path, "--seq", "32", "--steps", "1", check=False)
    assert out.returncode == 2 and "too short" in out.stderr and "longer --seq" in out.stderr


def test_training_a_quantized_config_is_a_clear_error():
    from glm_jax.config import ConfigError

    with pytest.raises(ConfigError, match="train in float"):
        Trainer(case.config().override(quantization="int4"), OptimConfig(), sh.make_mesh("1x1", jax.devices()[:1]), 1)


def test_too_many_skipped_steps_stop_with_a_checkpoint(tmp_path):
    # fp16 with an absurd loss scale overflows every backward pass: each step is skipped
    c = case.config(num_layers=2, dtype="float16")
    optim = OptimConfig(loss_scale_init=2.0**120, max_consecutive_skips=3)
    run = RunConfig(steps=10, global_batch=4, seq_len=64, ckpt_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "log"),
                    ckpt_every=100, async_checkpoints=False, progress=False)
    with pytest.raises(TrainingError, match=r"3 consecutive steps had non-finite gradients .* by step 3; "
                                            r"saved step (\d+)") as error:
        train(c, optim, run, sh.make_mesh("1x1", jax.devices()[:1]), case.builder(), log=lambda m: None)
    # step 3's metrics are read while step 4 runs: the state after step 4 is saved
    saved = int(re.search(r"saved step (\d+)", str(error.value)).group(1))
    assert saved == 4 and Checkpoints(str(tmp_path / "ck")).latest_step() == saved
