"""GLM-130B's training plans (and 2x2x2 tiny ones) side by side: per-chip memory, what the
compiled step communicates and computes, and the step time that implies at the chips' peak.

    python experiments/plan_130b.py                     # compile every plan (~30 min on 2 CPU cores)
    python experiments/plan_130b.py --only tiny         # the four 2x2x2 CPU plans
    python experiments/plan_130b.py --only bloom-176b   # BLOOM-176B on GLM-130B's pods (also opt-175b, llama-70b)
    python experiments/plan_130b.py --out DIR           # keep each plan's JSON (and HLO) in DIR
    python experiments/plan_130b.py --from DIR          # the table from JSON kept before: no compile
    python experiments/plan_130b.py -- --fsdp-gather tick   # more pretrain.py flags for every plan

Each plan is `experiments/pretrain.py --dry-run --dump-hlo` (its JSON: `glm_jax/dry_run.py`). The
step time at peak is compute plus collectives, not overlapped: compute = executed FLOPs per chip
(loops times their trip counts: the pipeline's bubble ticks and 1F1B's recomputation included)
/ the chip's peak; collectives = per mesh axis, the bytes a chip sends by ring algorithms
(`wire_bytes`) / (ICI bandwidth per link and direction x the link directions a ring over that
axis has: 2 for a physical torus dimension it spans whole, 1 for part of one; `topology.py`).
A step whose stages skip idle ticks under `lax.cond` is counted at each conditional's busiest
branch on every tick, so the compute time and a stage's work are scaled by `work_shares`.
MFU = model FLOPs / (chips x peak x step), HFU = executed FLOPs / (chips x peak x step); GLM-130B
reports 32.5% MFU / 43.3% HFU on 96 x 8 A100 (its paper, ../shared/GLM_SPEC.md). Tiny plans run
on CPU: no step time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--preset", "glm-tiny", "--mesh", "2x2x2", "--batch", "8", "--seq", "64"]
BIG = ["--preset", "glm-130b", "--mesh", "24x8x4", "--batch", "192", "--seq", "2048", "--set", "remat_policy=full"]
# the paper's 175B-class comparison models and LLaMA-2-70B, each on a mesh of the same 768 chips whose
# data axis divides its hidden size (ZeRO-1 shards a moment over `data` on a dimension data divides:
# 24 divides GLM-130B's and OPT's 12288, not BLOOM's 14336 or LLaMA's 8192); 16 x 12 x 4 is BLOOM's
# own tensor 4 x pipeline 12 with twice its data replicas
OTHER_MODELS = {"bloom-176b": "16x12x4", "opt-175b": "24x8x4", "llama-70b": "16x12x4"}
FLAGS = {"zero1": [], "fsdp": ["--fsdp"], "fsdp_tick": ["--fsdp", "--fsdp-gather", "tick"]}
PLANS = {
    **{
        f"tiny_{schedule}_{params}": TINY + ["--schedule", schedule] + (["--fsdp"] if params == "fsdp" else [])
        for schedule in ("1f1b", "gpipe")
        for params in ("zero1", "fsdp")
    },
    "tiny_1f1b_fsdp_tick": TINY + ["--schedule", "1f1b", "--fsdp", "--fsdp-gather", "tick"],
    **{
        f"130b_{topology}_{params}": BIG + ["--topology", topology] + FLAGS[params]
        for topology in ("v4-1536", "v5p-1536")
        for params in ("zero1", "fsdp", "fsdp_tick")
    },
    **{
        f"{model}_{topology}_{params}": ["--preset", model, "--mesh", mesh, *BIG[4:], "--topology", topology]
        + FLAGS[params]
        for model, mesh in OTHER_MODELS.items()
        for topology in ("v4-1536", "v5p-1536")
        for params in ("zero1", "fsdp_tick")
    },
}
SHORT = {
    "all-gather": "AG",
    "all-reduce": "AR",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}
GIB = 2.0**30


def ticks(report: dict) -> int:
    """The tick loop's trip count: M + 2 (S - 1) for 1F1B, M + S - 1 for GPipe."""
    stages = report["mesh"]["stage"]
    return report["microbatches"] + (2 if report["schedule"] == "1f1b" else 1) * (stages - 1)


def work_shares(report: dict) -> tuple[float, float]:
    """(a stage's working share of the counted FLOPs, the step's share of the counted time).

    The FLOP count takes a conditional's busiest branch on every tick. A schedule whose stages
    skip idle ticks under `lax.cond` (the step has conditionals) runs M of its T ticks' work on a
    stage; in time, 1F1B's fill and drain ticks hold a forward or a backward only, so its step
    lasts (M + S - 1) of T full ticks, GPipe's every tick. A schedule without conditionals computes
    on every tick (1, 1)."""
    if not report.get("collectives", {}).get("conditionals"):
        return 1.0, 1.0
    m, stages, count = report["microbatches"], report["mesh"]["stage"], ticks(report)
    return m / count, ((m + stages - 1) / count if report["schedule"] == "1f1b" else 1.0)


def tick_loop_traffic(text: str, report: dict) -> dict:
    """Weight traffic over `data` inside the tick loop (the outermost loop of `ticks` trips):
    float all-gathers (FSDP's weight gathers) and collective-permutes (XLA's windowed gathers and
    reduce-scatters), as instructions and bytes per step."""
    from glm_jax.collectives import collective_ops  # deferred: after pretrain.py's device setup

    count = ticks(report)
    default = count if report["schedule"] == "1f1b" else None
    ops = collective_ops(text, report["mesh"], default)
    inside = [op for op in ops if op.loops and op.loops[0].trip_count == count and "data" in op.axis]
    gathers = [op for op in inside if op.kind == "all-gather" and re.match(r"b?f\d+", op.shape)]
    permutes = [op for op in inside if op.kind == "collective-permute"]
    return {
        "data_all_gathers_in_tick_loop": len(gathers),
        "data_all_gathers_in_tick_loop_executed": sum(op.executions for op in gathers),
        "data_all_gather_bytes_in_tick_loop": sum(op.bytes * op.executions for op in gathers),
        "data_permutes_in_tick_loop": len(permutes),
        "data_permute_bytes_in_tick_loop": sum(op.bytes * op.executions for op in permutes),
    }


def run_plan(name: str, extra: list[str], out: str) -> dict:
    """One plan's dry run (pretrain.py in a subprocess), with its tick-loop traffic, kept in out."""
    hlo = os.path.join(out, f"{name}.hlo")
    command = [sys.executable, os.path.join(HERE, "pretrain.py"), *PLANS[name], *extra, "--dry-run", "--dump-hlo", hlo]
    print(f"{name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    root = os.path.dirname(HERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    report = {"name": name, "command": " ".join(command[1:]), **json.loads(done.stdout.strip().splitlines()[-1])}
    if os.path.exists(hlo):
        with open(hlo) as f:
            report |= tick_loop_traffic(f.read(), report)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


# ---- step time ---------------------------------------------------------------------------------------
def link_directions(report: dict) -> dict[str, int]:
    """{axes ("data", "data+tensor", ...): ICI link directions a ring over them has per chip}:
    per physical torus dimension the axes' devices span, 2 when they span it whole, else 1."""
    import itertools

    from glm_jax import sharding as sh  # deferred: libtpu's devices, only for a TPU plan
    from glm_jax.topology import topology_devices

    mesh = sh.make_mesh("x".join(str(n) for n in report["mesh"].values()), topology_devices(report["topology"]))
    grid = [int(n) for n in report["grid"].split("x")]
    names, out = list(mesh.axis_names), {}
    for size in range(1, len(names) + 1):
        for axes in itertools.combinations(names, size):
            group = mesh.devices[tuple(slice(None) if n in axes else 0 for n in names)].reshape(-1)
            spans = [len({d.coords[k] for d in group}) for k in range(len(grid))]
            out["+".join(axes)] = sum(2 if s == g else 1 for s, g in zip(spans, grid) if s > 1)
    return out


def step_times(report: dict) -> dict:
    """Compute, collective and step seconds at the chip's peak, and the MFU / HFU they imply."""
    from glm_jax.topology import CHIPS  # deferred: after pretrain.py's device setup

    if report.get("platform") != "tpu" or "collectives" not in report:
        return {}
    chip = CHIPS[report["chip"]]
    peak = chip.peak_tflops * 1e12
    links = link_directions(report)
    wire = report["collectives"]["wire_bytes"]
    collective = sum(
        b / (links[axis] * chip.ici_gb_per_s * 1e9)
        for kinds in wire.values()
        for axis, b in kinds.items()
        if axis != "none"
    )
    work, time = work_shares(report)
    compute = report["executed_flops_per_device"] * time / peak
    step = compute + collective
    return {
        "compute_s": compute,
        "collective_s": collective,
        "step_s": step,
        "mfu": report["model_flops_per_step"] / (report["chips"] * peak * step),
        "hfu": report["executed_flops_per_device"] * work / (peak * step),
    }


# ---- the table ---------------------------------------------------------------------------------------
def compact(collectives: dict) -> str:
    """'CP data 696, AG data 329, ...': GB (1e9 bytes, module docstring of collectives.py) per
    step by kind and axis, largest first, those under 0.5% of the total left out."""
    items = [(b, f"{SHORT[k]} {a}") for k, axes in collectives["bytes"].items() for a, b in axes.items()]
    total = sum(b for b, _ in items) or 1.0
    return ", ".join(f"{label} {b / 1e9:.3g}" for b, label in sorted(items, reverse=True) if b >= 0.005 * total)


def gib(report: dict, key: str) -> str:
    value = report.get(key)
    return "-" if value is None else f"{value:.2f}"


def row(report: dict) -> str:
    times = step_times(report)
    refused = report.get("compiler_message")
    temp = (
        "refused: " + re.search(r"\(([\d.]+G)\)", refused).group(1) if refused else gib(report, "temp_gib_per_device")
    )
    gathers = (
        f"{report['data_all_gathers_in_tick_loop']} / {report['data_permutes_in_tick_loop']}"
        if "data_all_gathers_in_tick_loop" in report
        else "-"
    )
    fmt = lambda key, scale=1.0, spec=".2f": f"{times[key] * scale:{spec}}" if key in times else "-"  # noqa: E731
    flops = report.get("executed_flops_per_device")
    cells = [
        report["name"],
        str(report.get("chips", report["devices"])),
        gib(report, "weights_gib_per_device"),
        gib(report, "optimizer_gib_per_device"),
        temp,
        gib(report, "peak_gib_per_device"),
        gib(report, "hbm_gib_per_chip"),
        "yes" if report.get("fits", True) else "no",
        compact(report["collectives"]) if "collectives" in report else "-",
        gathers,
        "-" if flops is None else f"{flops / 1e12:.4g} / {flops * work_shares(report)[0] / 1e12:.4g}",
        fmt("compute_s"),
        fmt("collective_s"),
        fmt("step_s"),
        fmt("mfu", 100, ".1f"),
        fmt("hfu", 100, ".1f"),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| plan | chips | weights GiB | optimizer GiB | temporaries GiB | peak GiB | HBM GiB | fits "
    "| collectives GB / step (kind axis) | data AG / CP in tick loop | executed TFLOP / chip (counted / stage work) "
    "| compute s | collectives s | step s | MFU % | HFU % |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="only the plans whose names start with this (tiny, 130b_v4, ...)")
    ap.add_argument("--out", default=None, help="keep each plan's JSON and HLO here (default: a temporary folder)")
    ap.add_argument(
        "--from", dest="saved", default=None, metavar="DIR", help="read NAME.json from DIR, compile nothing"
    )
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    names = [n for n in PLANS if args.only is None or n.startswith(args.only)]
    sys.path.insert(0, os.path.dirname(HERE))
    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        os.makedirs(out, exist_ok=True)
        for name in names:
            if args.saved:
                path = os.path.join(args.saved, f"{name}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        reports.append({"name": name, **json.load(f)})
            else:
                reports.append(run_plan(name, extra, out))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(HEADER)
    for report in reports:
        print(row(report))
    print(
        "\nGLM-130B (paper): 32.5% MFU / 43.3% HFU on 96 x 8 A100-40G, tensor 4 x pipeline 8 x data 24. "
        "Collectives GB: bytes per chip and step by kind (AG all-gather: result; AR all-reduce, RS "
        "reduce-scatter, A2A all-to-all, CP collective-permute: operand) and mesh axis; "
        "data AG / CP in tick loop: float all-gathers / collective-permutes over `data` inside the "
        "pipeline's tick loop (instructions)."
    )


if __name__ == "__main__":
    main()
