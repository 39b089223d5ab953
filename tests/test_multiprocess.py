"""Input by device and runs over several processes: which rows each process builds (fake processes
on one process's devices), then real runs -- 4 processes x 2 devices on 2x2x2 (each data replica
on two processes) against one process of 8 devices, that run resumed on another data size, and
two-process fine-tuning to its adapter."""

import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import processes
import pytest
import sharding_case as case
from multiprocess_worker import MESH, SETTINGS, STEPS, builder, config, run_config
from script_runs import ROOT

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.adapters import load_adapter
from glm_jax.checkpoints import Checkpoints, move_to_device, save_serving
from glm_jax.config import get_config
from glm_jax.loading import load_model
from glm_jax.model import init_params
from glm_jax.train import train

sys.path.insert(0, str(ROOT / "experiments"))
import pretrain  # noqa: E402

HERE = pathlib.Path(__file__).parent


# ---- which rows a process builds ------------------------------------------------------------------
def _processes(mesh, per_process):
    """Fake processes: consecutive groups of `per_process` devices in the order the mesh was given them."""
    devices = sorted(mesh.devices.flat, key=lambda d: d.id)
    return [devices[i : i + per_process] for i in range(0, len(devices), per_process)]


def _expected_rows(mesh, devices, rows):
    """Reference: the rows of the data shards at these devices' mesh positions."""
    d = sh.axis_size(mesh, "data")
    shards = {int(np.argwhere(mesh.devices == device)[0][0]) for device in devices}
    return np.concatenate([np.arange(s * rows // d, (s + 1) * rows // d) for s in sorted(shards)])


def _mesh(shape, order):
    devices = np.array(jax.devices())[list(order)]
    return jax.sharding.Mesh(devices.reshape(shape), sh.AXES)


LAYOUTS = [  # (mesh shape, device order, devices a process): replicas across, inside and beside processes
    ((2, 2, 2), range(8), 2),  # each replica on 2 processes
    ((4, 1, 2), [0, 2, 4, 6, 1, 3, 5, 7], 2),  # each process holds two data shards, not adjacent
    ((8, 1, 1), range(8), 2),  # two adjacent shards a process
    ((1, 2, 4), range(8), 4),  # one replica on every process
    ((2, 4, 1), range(8), 4),  # one replica a process
]


@pytest.mark.parametrize("shape,order,per_process", LAYOUTS)
def test_each_process_builds_the_rows_its_devices_hold(shape, order, per_process):
    mesh = _mesh(shape, order)
    sharding = sh.batch_sharding(mesh)
    microbatches, microbatch_rows = 3, 2 * shape[0]
    rows = microbatches * microbatch_rows
    full = np.arange(rows * 2).reshape(rows, 2)  # the step's rows, microbatch after microbatch
    padded = pipeline.pad_microbatches({"x": full}, microbatches, 4)["x"]
    for devices in _processes(mesh, per_process):
        np.testing.assert_array_equal(sh.rows_held(sharding, rows, devices), _expected_rows(mesh, devices, rows))
        # 1F1B: the process's rows of each microbatch, padded, are the padded batch's rows it holds
        mine = sh.microbatch_rows_held(sharding, microbatch_rows, 4, devices)
        local = np.concatenate([full[m * microbatch_rows + mine] for m in range(microbatches)])
        held = sh.rows_held(sharding, 4 * microbatch_rows, devices)
        np.testing.assert_array_equal(pipeline.pad_microbatches({"x": local}, microbatches, 4)["x"], padded[held])
    for m in range(microbatches):  # the layout `split_microbatches` reads
        split = pipeline.split_microbatches(padded, 4)
        np.testing.assert_array_equal(split[m], full[m * microbatch_rows : (m + 1) * microbatch_rows])


def test_layouts_that_cannot_be_fed_name_the_sizes():
    mesh = _mesh((4, 1, 2), range(8))
    with pytest.raises(sh.MeshError, match="batch of 6 rows cannot be split over the data axis of 4"):
        sh.rows_held(sh.batch_sharding(mesh), 6)
    with pytest.raises(sh.MeshError, match="4 microbatches of 1 rows cannot be split over the data axis of 4"):
        sh.microbatch_rows_held(sh.batch_sharding(mesh), 1, 4, _processes(mesh, 2)[0])


def test_one_process_places_its_rows_as_a_plain_put():
    mesh = sh.make_mesh("2x2x2", jax.devices()[:8])
    local = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3), "kind": np.zeros(8, np.int32)}
    placed = sh.global_batch(local, mesh)
    assert set(placed) == {"tokens"} and placed["tokens"].sharding == sh.batch_sharding(mesh)
    np.testing.assert_array_equal(placed["tokens"], local["tokens"])


# ---- several processes ----------------------------------------------------------------------------


def _losses(folder) -> list[float]:
    with open(os.path.join(folder, "log", "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process run of this file, at once: the pod run (tests/multiprocess_worker.py),
    two-process LoRA fine-tuning (--mesh 1x1x2: its replica on both processes; held-out loss,
    --merge), and
    meanwhile here the reference of each pod setting on one process of 8 devices (default
    microbatches one step longer, for the resumed run to compare with)."""
    root = tmp_path_factory.mktemp("multiprocess")
    c = get_config("glm-tiny", num_layers=2)
    save_serving(str(root / "base"), c, move_to_device(init_params(c, jax.random.key(0))), 5, "test")
    colours = ("红色", "蓝色", "白色", "黑色")
    rows = [{"content": f"类型#裙*颜色#{x}", "summary": f"这条{x}的裙子很好看。"} for x in colours]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    finetune = [str(ROOT / "experiments" / "finetune.py"), "--method", "lora", "--checkpoint", str(root / "base")]
    finetune += ["--data", str(root / "sft.jsonl"), "--eval-data", str(root / "sft.jsonl"), "--out", str(root / "ft")]
    finetune += ["--steps", "2", "--batch", "4"]
    finetune += ["--max-source", "16", "--max-target", "16", "--mesh", "1x1x2", "--merge", "--no-progress"]
    started = [
        processes.start(4, 2, [str(HERE / "multiprocess_worker.py"), str(root / "pod")]),
        processes.start(2, 1, finetune),
    ]
    mesh = sh.make_mesh(MESH, jax.devices()[:8])
    for name, microbatches in SETTINGS:
        steps = STEPS + 1 if microbatches is None else STEPS
        run = run_config(str(root / "one"), name, microbatches, steps)
        train(config(), case.optim(), run, mesh, builder(), log=lambda m: None)
    processes.wait(started[0])
    return root, processes.wait(started[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _ in SETTINGS])
def test_replicas_across_processes_train_as_one_process(runs, name):
    root, _ = runs
    np.testing.assert_allclose(_losses(root / "pod" / name), _losses(root / "one" / name)[:STEPS], rtol=1e-5)
    assert pretrain.parse_args([])[1].microbatches is None  # "default" is pretrain.py's choice


@pytest.mark.slow
def test_resumed_on_another_data_size_reads_on(runs, tmp_path):
    """The pod run's checkpoint (data 2: 4 microbatches of 2 rows) resumed on data 4 (2 of 4 rows)
    trains step STEPS + 1 on the sequences the uninterrupted run does."""
    root, _ = runs
    shutil.copytree(root / "pod" / "default" / "ck", tmp_path / "ck")
    run = run_config(str(tmp_path), "", None, STEPS + 1)
    summary = train(config(), case.optim(), run, sh.make_mesh("4x2x1", jax.devices()[:8]), builder(), log=print)
    assert summary["steps"] == STEPS + 1
    np.testing.assert_allclose(_losses(tmp_path), _losses(root / "one" / "default")[STEPS:], rtol=1e-5)
    ckpt = Checkpoints(str(tmp_path / "ck"))
    try:
        assert ckpt.restore_meta(STEPS + 1)["data"]["next"] == (STEPS + 1) * 8
    finally:
        ckpt.close()


@pytest.mark.slow
def test_two_process_fine_tuning_ends_and_writes_its_adapter_once(runs):
    root, logs = runs
    reports = [[line for line in log.splitlines() if line.startswith("{")] for log in logs]
    assert len(reports[0]) == 1 and reports[1] == []  # process 0 reports
    report = json.loads(reports[0][0])
    assert report["steps"] == 2 and report["adapter_dir"] == str(root / "ft" / "adapter")
    assert np.isfinite(report["initial_eval_loss"]) and np.isfinite(report["eval_loss"])  # the same rows on both
    assert sorted(os.listdir(root / "ft")) == ["adapter", "checkpoints", "logs", "merged"]  # no leftovers
    adapter = load_adapter(str(root / "ft"))
    assert adapter.step == 2 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(adapter.params))
    merged = load_model(str(root / "ft" / "merged"))
    base = load_model(str(root / "base"))
    assert merged.config.lora_rank == 0 and merged.step == 2
    assert jax.tree_util.tree_structure(merged.params) == jax.tree_util.tree_structure(base.params)
    changed = [
        not np.allclose(m, b)
        for m, b in zip(jax.tree_util.tree_leaves(merged.params), jax.tree_util.tree_leaves(base.params))
    ]
    assert any(changed)  # the trained LoRA is merged in
