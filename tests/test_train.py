"""Training end to end: pretrain.py on 8x4, kill -9 mid-save and mid-ramp on a pipeline and resume, errors."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import sharding_case as case
from script_runs import ROOT, script_env

from glm_jax import pipeline, placement
from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints, move_to_device, read_checkpoint, save_serving
from glm_jax.config import ConfigError
from glm_jax.loading import load_model
from glm_jax.optim import OptimConfig
from glm_jax.peft import PeftConfig
from glm_jax.train import RunConfig, Trainer, TrainingError, _split_base, base_shardings, train

PRETRAIN = str(ROOT / "experiments" / "pretrain.py")
sys.path.insert(0, str(ROOT / "experiments"))
import pretrain as pretrain_script  # noqa: E402

SMALL = ["--set", "num_layers=2", "--seq", "64", "--batch", "4", "--no-progress"]
# 2 pipeline stages (1F1B), the batch ramping 1 -> 4 over steps 1-8 of 10
RAMPED = [*SMALL, "--mesh", "2x1", "--ramp-start", "1", "--ramp-increment", "1", "--ramp-fraction", "0.3"]


def pretrain(run_dir, *extra, timeout=600):
    """pretrain.py run to the end in a subprocess (its own devices, as a user runs it)."""
    args = [sys.executable, PRETRAIN, "--ckpt-dir", f"{run_dir}/ck", "--log-dir", f"{run_dir}/log", *extra]
    out = subprocess.run(args, env=script_env(), capture_output=True, text=True, timeout=timeout)
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


@pytest.mark.slow
def test_pretrain_8x4_trains_and_the_loss_falls(tmp_path):
    out = pretrain(
        tmp_path,
        "--mesh",
        "8x4",
        "--steps",
        "5",
        "--seq",
        "64",
        "--batch",
        "4",
        "--no-progress",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--eval-every",
        "5",
        timeout=900,
    )
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
    args = [
        sys.executable,
        PRETRAIN,
        "--ckpt-dir",
        f"{run_dir}/ck",
        "--log-dir",
        f"{run_dir}/log",
        "--steps",
        str(steps),
        "--ckpt-every",
        "3",
        *RAMPED,
    ]
    proc = subprocess.Popen(args, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _metrics_file(run_dir):
    """metrics.jsonl's inode (a resumed run rewrites the file: a new one), or None."""
    try:
        return os.stat(f"{run_dir}/log/metrics.jsonl").st_ino
    except FileNotFoundError:
        return None


def _logged(run_dir, step, stale):
    """A run whose metrics file is not the `stale` one has logged `step`."""
    if _metrics_file(run_dir) in (None, stale):
        return False
    try:
        with open(f"{run_dir}/log/metrics.jsonl") as f:
            return any(json.loads(line).get("step", 0) >= step for line in f if line.endswith("\n"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


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


@pytest.mark.slow
def test_kill_9_mid_save_then_mid_ramp_resumes_to_the_uninterrupted_losses(tmp_path, uninterrupted):
    """SIGKILL while a checkpoint is written (the one before stays the latest), then again in the
    resumed run between checkpoints, mid-ramp (its lost steps are redone): the run then finishes
    with the uninterrupted run's losses, bitwise (JSON floats round-trip exactly)."""
    assert _kill_when(tmp_path, _saving, 10), "never saw a checkpoint being written"
    resumed_from = Checkpoints(str(tmp_path / "ck")).latest_step() or 0
    assert resumed_from <= 6  # checkpoints every 3 steps; the last (10) is not written mid-run
    at = random.Random(os.getpid()).randint(resumed_from + 2, 8)  # mid-ramp, past the resumed step
    stale = _metrics_file(tmp_path)
    assert _kill_when(tmp_path, lambda d: _logged(d, at, stale), 10), "the run ended before the kill"
    pretrain(tmp_path, "--steps", "10", "--ckpt-every", "3", *RAMPED)
    assert losses(tmp_path) == uninterrupted[1]


def refused(capsys, run_dir, *flags) -> str:
    """pretrain.py's main in this process (its checks come before any compile), on flags it must
    refuse: it exits 2. -> what it printed to stderr. The mesh spans this process's 32 devices."""
    with pytest.raises(SystemExit) as exit_:
        pretrain_script.main(["--ckpt-dir", f"{run_dir}/ck", "--log-dir", f"{run_dir}/log", *flags])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_from_another_config_is_a_clear_error(uninterrupted, capsys):
    err = refused(capsys, uninterrupted[0], "--steps", "12", *SMALL, "--batch", "32", "--set", "hidden_size=64")
    assert "trained with another model config" in err and "hidden_size: checkpoint 128 vs run 64" in err


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    assert "expected PxT" in refused(capsys, tmp_path, "--mesh", "8by4")
    assert "tensor axis of 8 does not divide num_attention_heads=4" in refused(
        capsys, tmp_path, "--mesh", "1x8", "--steps", "1", "--batch", "4"
    )
    assert "unknown config field" in refused(capsys, tmp_path, "--set", "num_layer=3")
    assert "not found" in refused(capsys, tmp_path, "--data", str(tmp_path / "missing.jsonl"))
    err = refused(capsys, tmp_path, "--seq", "32", "--steps", "1")
    assert "too short" in err and "longer --seq" in err


def test_training_a_quantized_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="train in float"):
        Trainer(case.config().override(quantization="int4"), OptimConfig(), sh.make_mesh("1x1", jax.devices()[:1]), 1)


@pytest.mark.slow
def test_too_many_skipped_steps_stop_with_a_checkpoint(tmp_path):
    # fp16 with an absurd loss scale overflows every backward pass: each step is skipped
    c = case.config(num_layers=2, dtype="float16")
    optim = OptimConfig(loss_scale_init=2.0**120, max_consecutive_skips=3)
    run = RunConfig(
        steps=10,
        global_batch=4,
        seq_len=64,
        ckpt_dir=str(tmp_path / "ck"),
        log_dir=str(tmp_path / "log"),
        ckpt_every=100,
        async_checkpoints=False,
        progress=False,
    )
    with pytest.raises(
        TrainingError,
        match=r"3 consecutive steps had non-finite gradients .* by step 3; "
        r"saved step (\d+)",
    ) as error:
        train(c, optim, run, sh.make_mesh("1x1", jax.devices()[:1]), case.builder(), log=lambda m: None)
    # step 3's metrics are read while step 4 runs: the state after step 4 is saved
    saved = int(re.search(r"saved step (\d+)", str(error.value)).group(1))
    assert saved == 4 and Checkpoints(str(tmp_path / "ck")).latest_step() == saved


# ---- a fine-tuning base read into the trainer's shardings ----------------------------------------------
@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    # 3 layers: 2 stages do not divide the stacked layer axis; the glm tokenizer's 32000 rows
    c = case.config(num_layers=3, vocab_size=32000)
    path = str(tmp_path_factory.mktemp("base") / "base")
    save_serving(path, c, move_to_device(case.params(c)), 3, "test")
    return c, path


def _share(tree) -> float:
    """The bytes a device holds of `tree` over all its bytes."""
    return placement.bytes_per_device(tree) / sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "mesh_shape,method,quantize",
    [
        ("1x2x2", "lora", None),
        pytest.param("1x2x2", "lora", "int4", marks=pytest.mark.slow),
        pytest.param("1x1x4", "freeze", None, marks=pytest.mark.slow),
    ],
)
def test_a_fine_tuning_base_is_read_into_the_trainers_shardings(saved_base, mesh_shape, method, quantize):
    """On 4 devices (2 stages x 2 tensor shards, or 4 tensor shards) each device reads a quarter
    of every layer weight (quantized too) and of the embedding what `tensor` splits of it (norms
    and biases replicated), where the trainer holds it: no device ever holds the whole base.
    Without stages the trainer takes the arrays where they lie; with stages it lays them into
    its slots on the devices."""
    c, path = saved_base
    mesh = sh.make_mesh(mesh_shape, jax.devices()[:4])
    tensor = sh.axis_size(mesh, "tensor")
    peft = PeftConfig(method, trainable_layers=1)
    model = load_model(path, quantize, shardings=lambda base: base_shardings(peft.model_config(base), mesh))
    config, base = peft.model_config(model.config), model.take_params()
    for x in jax.tree_util.tree_leaves(base):
        assert x.sharding.mesh == mesh and x.sharding.num_devices == 4
    for linear in ("query", "dense", "dense_h_to_4h", "dense_4h_to_h"):
        block = base["layers"]["mlp" if linear.startswith("dense_") else "attention"][linear]
        assert _share(block["q" if quantize else "kernel"]) == 0.25, linear
    embedding = base["word_embeddings"]["embedding"]
    assert _share(embedding) == 1 / tensor
    assert _share(base) < 1.1 / tensor, _share(base)
    trainer = Trainer(config, OptimConfig(), mesh, 4, peft=peft)
    base_trainable = _split_base(trainer, base)
    assert base == {}  # the trainer holds the base now
    if mesh_shape == "1x1x4":
        assert trainer.frozen["word_embeddings"]["embedding"] is embedding  # used where it lies
        assert base_trainable["layers"]["mlp"]["dense_4h_to_h"]["kernel"].shape[0] == 1
        assert _share(base_trainable["layers"]) < 0.3
    assert _share(trainer.frozen) < 1.1 / tensor, _share(trainer.frozen)
    np.testing.assert_array_equal(trainer.frozen["word_embeddings"]["embedding"], embedding)


@pytest.mark.slow
def test_a_fine_tuning_run_drops_its_base_before_on_done(saved_base, tmp_path):
    """train() holds the base once (the loaded arrays themselves, no copy on a mesh without
    stages) and drops it with the training state before on_done, where --merge reads it again."""
    c, path = saved_base
    mesh = sh.make_mesh("1x1x4", jax.devices()[:4])
    peft = PeftConfig("lora")
    base = load_model(path, shardings=lambda b: base_shardings(peft.model_config(b), mesh)).take_params()
    embedding_shape = base["word_embeddings"]["embedding"].shape
    held = {}
    # arrays of that shape other tests of this process hold (fixtures) are not the run's
    others = {id(x) for x in jax.live_arrays() if x.shape == embedding_shape} - {
        id(base["word_embeddings"]["embedding"])
    }

    def on_done(params, step):
        held["step"], held["lora"] = step, sorted({x.shape[-1] for x in jax.tree_util.tree_leaves(params)})
        held["base"] = [
            x for x in jax.live_arrays() if x.shape == embedding_shape and not x.is_deleted() and id(x) not in others
        ]

    run = RunConfig(
        steps=1,
        global_batch=4,
        seq_len=64,
        ckpt_dir=str(tmp_path / "ck"),
        log_dir=str(tmp_path / "log"),
        async_checkpoints=False,
        progress=False,
    )
    train(
        peft.model_config(c),
        OptimConfig(),
        run,
        mesh,
        case.builder(),
        log=lambda m: None,
        peft=peft,
        base=base,
        on_done=on_done,
    )
    assert base == {} and held["step"] == 1 and held["base"] == [], held


def test_base_shardings_put_the_stage_axis_where_it_divides():
    mesh = sh.make_mesh("1x2x2", jax.devices()[:4])
    shardings = base_shardings(case.config(num_layers=3), mesh)
    # [L=3, E, H, D]: the 2 stages split the embedding dimension instead of the 3 layers
    assert shardings["layers"]["attention"]["query"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "stage", "tensor", None
    )
    assert base_shardings(case.config(num_layers=4), mesh)["layers"]["attention"]["query"]["kernel"].spec[0] == "stage"


def test_a_pipelined_checkpoint_is_read_as_a_base_onto_another_stage_count(tmp_path):
    """A base saved in a 3-stage slot layout (4 layers: 6 slots) read into a 4-stage trainer's
    base shardings: the slots (which 4 stages do not divide) are read over `tensor` only, then
    laid out as the plain layers, over `stage`."""
    c = case.config(num_layers=4)
    params = case.params(c)
    slots = jax.jit(lambda p: pipeline.params_to_slots(p, pipeline.PipelinePlan(4, 3)))(params)
    ckpt = Checkpoints(str(tmp_path), async_save=False)
    ckpt.save(7, {"params": slots}, {"config": c.to_dict(), "layout": {"stages": 3}})
    ckpt.close()
    mesh = sh.make_mesh("1x4x1", jax.devices()[:4])
    got = read_checkpoint(str(tmp_path), shardings=base_shardings(c, mesh))[1]
    assert got["layers"]["attention"]["query"]["kernel"].sharding.spec[0] == "stage"
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
