"""TPU pods without a TPU: topology names, meshes over described TPU devices (split physical
axes, several slices), ahead-of-time compiles of glm-tiny's training and decode steps for v4-8
and v5e-16 with libtpu (the test extra), a sharded inference plan (prefill + decode) on v4-8, and
the GPU table of GLM-130B's setups counted from the shapes."""

import functools
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


@functools.cache
def bench_130b():
    """experiments/bench_130b_int4.py as a module (its sibling benchutil on the path)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("bench_130b_int4", ROOT / "experiments" / "bench_130b_int4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_topology_names():
    t = parse_topology("v5p-1536")
    assert (t.chip.name, t.grid, t.chips) == ("v5p", "8x8x12", 768)
    assert parse_topology("v4-8").chips == 4 and parse_topology("v5e-16").grid == "4x4"
    assert parse_topology("v6e-256").chips == 256 and parse_topology("v5p:4x4x8").chips == 128
    assert parse_topology("v5e-16", slices=2).chips == 32
    for bad in ("v5p-1000", "v4-7", "v7-8", "v5e:2x2x2", "v5p-8x8"):
        with pytest.raises(TopologyError):
            parse_topology(bad)


def test_every_chip_has_its_hbm_bandwidth_and_source():
    assert {name: chip.hbm_gb_per_s for name, chip in CHIPS.items()} == {
        "v4": 1200.0,
        "v5e": 819.0,
        "v5p": 2765.0,
        "v6e": 1638.0,
    }
    for chip in CHIPS.values():
        assert chip.bandwidth_source.startswith(chip.source) and "GBps" in chip.bandwidth_source


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


@pytest.mark.slow
@needs_libtpu
def test_train_and_decode_steps_compile_for_v4_and_v5e(tmp_path):
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
        hlo = tmp_path / f"{topology}.hlo"
        p = _script("pretrain", *small, "--topology", topology, "--mesh", mesh, "--dump-hlo", str(hlo))
        assert p.returncode == 0, p.stderr[-3000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        # what the compiled step does (collectives.py on the HLO --dump-hlo wrote), and the kernel traced
        assert hlo.read_text().startswith("HloModule") and r["attention_impl_used"]["self"] == "pallas_tpu"
        assert r["collectives"]["bytes"]["all-reduce"]["tensor"] > 0 and r["executed_flops_per_device"] > 0
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


@needs_libtpu
def test_sharded_inference_plan_compiles_for_v4():
    """glm-tiny's prefill (64 tokens) and decode step sharded on v4-8 (4 chips, tensor 4), through
    the script's own function: fits, with per-chip bytes and the decode floor from the shapes."""
    bench = bench_130b()
    config = bench.serving_config("glm-tiny", ["num_layers=2", "vocab_size=512"], "int4")
    r = bench.mesh_plan(config, "v4-8", "1x4", batch=1, cache=64, prefill_len=64, preset="glm-tiny")
    assert r["fits"] is True and r["topology"] == "v4-8" and r["mesh"] == "1x4" and r["quantize"] == "int4"
    assert r["mesh_axes"] == {"data": 1, "stage": 1, "tensor": 4} and r["device_kind"] == "TPU v4"
    assert (r["batch"], r["cache_slots"], r["prefill_tokens"], r["hbm_gib_per_chip"]) == (1, 64, 64, 30.75)
    # (k, v) x 2 layers x 64 slots x 1 of 4 KV heads x head_dim 32 x bf16
    assert r["kv_cache_gib_per_device"] * 2**30 == 2 * 2 * 64 * 1 * 32 * 2
    for key in ("weights_gib_per_device", "temp_gib_per_device", "peak_gib_per_device", "decode_peak_gib_per_device"):
        assert r[key] > 0, key
    assert r["peak_gib_per_device"] >= r["weights_gib_per_device"] + r["kv_cache_gib_per_device"]
    read = (r["weights_gib_per_device"] + r["kv_cache_gib_per_device"]) * 2**30
    assert r["decode_ms_per_token_floor"] == pytest.approx(1e3 * read / 1200e9)


def test_gpu_table_counts_glm_130b_from_the_shapes():
    """The GPU table's INT4 tensor-4 row (4 x RTX 3090) against the bytes written out by hand."""
    rows = {row["setup"]: row for row in bench_130b().gpu_table()}
    h, f, layers, vocab, t = 12288, 32768, 70, 150528, 4
    split = (h // 2) * 3 * h + 3 * h * 2 + 3 * h * 2  # QKV: packed, fp16 scales, bf16 bias per output
    split += (h // 2) * h + (h // 2) * 2 * f + 2 * f * 2 + 2 * f * 2 + (f // 2) * h  # dense, h->4h, 4h->h
    whole = 2 * (h * 2 + h * 2) + 2 * (2 * h * 2)  # row-parallel scales and biases, two layernorms
    per_device = layers * (split / t + whole) + vocab * h * 2 / t + 2 * h * 2  # + embedding, final norm
    row = rows["4 x RTX 3090 INT4"]
    assert row["tensor"] == 4 and row["quantize"] == "int4"
    assert row["weights_gib_per_device"] * 2**30 == pytest.approx(per_device, rel=0.01)
    assert row["kv_cache_gib_per_device"] * 2**30 == 2 * layers * 2048 * (96 // t) * 128 * 2
    read = (row["weights_gib_per_device"] + row["kv_cache_gib_per_device"]) * 2**30
    assert row["decode_ms_per_token_floor"] == pytest.approx(1e3 * read / 936e9)
    a100 = rows["8 x A100-40G FP16"]
    assert a100["fastertransformer_ms_per_token_2048"] == pytest.approx(43.9, abs=0.05)
    assert a100["weights_gib_per_device"] < a100["memory_gib_per_device"]
