"""TPU pods without a TPU: topology names, meshes over described TPU devices (split physical
axes, several slices), and ahead-of-time compiles of glm-tiny's training and decode steps for
v4-8 and v5e-16 with libtpu (the test extra)."""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from script_runs import ROOT, script_env

from glm_jax import sharding as sh
from glm_jax.topology import CHIPS, TopologyError, parse_topology
from glm_jax.train import peak_flops

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu absent (pip install 'jax[tpu]', the test extra)"
)


def test_topology_names():
    t = parse_topology("v5p-1536")
    assert (t.chip.name, t.grid, t.chips) == ("v5p", "8x8x12", 768)
    assert parse_topology("v4-8").chips == 4 and parse_topology("v5e-16").grid == "4x4"
    assert parse_topology("v6e-256").chips == 256 and parse_topology("v5p:4x4x8").chips == 128
    assert parse_topology("v5e-16", slices=2).chips == 32
    for bad in ("v5p-1000", "v4-7", "v7-8", "v5e:2x2x2", "v5p-8x8"):
        with pytest.raises(TopologyError):
            parse_topology(bad)


def test_peak_flops_by_exact_tpu_kind():
    kind = lambda k: SimpleNamespace(device_kind=k)  # noqa: E731
    assert peak_flops(kind("TPU v5 lite")) == CHIPS["v5e"].peak_tflops * 1e12  # not v5p's
    assert peak_flops(kind("TPU v5")) == CHIPS["v5p"].peak_tflops * 1e12
    assert peak_flops(kind("TPU v6 lite")) == 918e12 and peak_flops(kind("TPU v4")) == 275e12
    assert peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12 and peak_flops(kind("cpu")) is None


def test_gpu_hosts_keep_tensor_inside_a_host():
    assert sh.host_split((4, 8, 4), 8) == ((1, 2, 4), (4, 4, 1))  # tensor + 2 stages per 8-GPU host
    assert sh.host_split((24, 1, 8), 8) == ((1, 1, 8), (24, 1, 1))
    assert sh.host_split((2, 1, 16), 8) == ((1, 1, 8), (2, 1, 2))  # tensor over two hosts
    with pytest.raises(sh.MeshError, match="tensor axis of 3"):
        sh.host_split((1, 1, 3), 8)


@needs_libtpu
def test_meshes_over_split_physical_axes_and_slices():
    from glm_jax.topology import topology_devices

    devices = topology_devices("v5p-128")  # 64 chips: 4x4x4; 2x8x4 splits a physical axis
    mesh = sh.make_mesh("8x4", devices)
    assert dict(mesh.shape) == {"data": 2, "stage": 8, "tensor": 4}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
    # each tensor group is 4 chips of one physical ring (one coordinate varies)
    for group in mesh.devices.reshape(-1, 4):
        coords = np.array([d.coords for d in group])
        assert (coords.max(0) != coords.min(0)).sum() == 1, coords
    sliced = topology_devices("v5e-16", slices=2)
    mesh = sh.make_mesh("2x4x4", sliced)
    for i in range(2):  # data parallel across slices: each data index is one whole slice
        assert len({d.slice_index for d in mesh.devices[i].flat}) == 1
    with pytest.raises(sh.MeshError, match="multiple of 2"):
        sh.make_mesh("1x8x4", sliced)


def _script(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=script_env(),
    )


@needs_libtpu
def test_train_and_decode_steps_compile_for_v4_and_v5e():
    import json

    small = [
        "--preset",
        "glm-tiny",
        "--set",
        "num_layers=2",
        "--set",
        "vocab_size=512",
        "--batch",
        "4",
        "--seq",
        "64",
        "--dry-run",
    ]
    for topology, mesh, hbm in (("v4-8", "2x2", 30.75), ("v5e-16", "2x2", 15.75)):
        p = _script("pretrain", *small, "--topology", topology, "--mesh", mesh)
        assert p.returncode == 0, p.stderr[-3000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert r["platform"] == "tpu" and r["topology"] == topology and r["fits"] is True
        assert r["hbm_gib_per_chip"] == hbm and r["devices"] == r["chips"]
        assert 0 < r["temp_gib_per_device"] < r["peak_gib_per_device"] < hbm
        assert r["step_seconds_at_50pct"] == pytest.approx(2 * r["step_seconds_at_peak"])
        for key in ("weights_gib_per_device", "optimizer_gib_per_device", "compile_seconds", "model_flops_per_step"):
            assert r[key] > 0
    p = _script(
        "bench_130b_int4",
        "--dry-run",
        "--topology",
        "v5e-16",
        "--preset",
        "glm-tiny",
        "--cache",
        "64",
        "--set",
        "num_layers=2",
        "--set",
        "vocab_size=512",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["device_kind"] == "TPU v5 lite" and r["fits"] is True and r["hbm_gib_per_chip"] == 15.75
    assert {"argument_gb", "temp_gb", "peak_estimate_gb", "compile_seconds"} <= set(r)
    # a mesh that does not divide the chips, and a plan without --dry-run: clear errors, exit 2
    p = _script("pretrain", *small, "--topology", "v4-8", "--mesh", "3x1")
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    p = _script("pretrain", "--topology", "v4-8")
    assert p.returncode == 2 and "--dry-run" in p.stderr


def test_kernel_choice_follows_the_platform_compiled_for():
    """A plan traced on this CPU process for GPU devices picks cuDNN attention, for TPU devices the
    Pallas TPU kernel; outside a target, the default backend decides (here: XLA)."""
    from glm_jax.config import get_config
    from glm_jax.layers import choose_attention, wants_flash
    from glm_jax.target import target_platform, targeting

    c = get_config("glm-tiny", dtype="bfloat16", attention_impl="auto")
    with targeting(SimpleNamespace(platform="gpu")):
        assert target_platform() == "gpu" and choose_attention(c, dropout_active=False) == "cudnn"
    with targeting([SimpleNamespace(platform="tpu")]):  # the layers get GLMMask: the Pallas TPU kernel
        assert target_platform() == "tpu" and wants_flash(c)
    assert target_platform() == "cpu" and not wants_flash(c) and choose_attention(c, dropout_active=False) == "xla"
