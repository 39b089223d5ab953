"""Command-line pieces the experiments/ scripts share. Imports no JAX, so `--help` stays fast."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_RUN = os.path.join("runs", "default")  # pretrain.py writes here; the evaluation scripts read it
DEFAULT_CHECKPOINTS = os.path.join(DEFAULT_RUN, "checkpoints")


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """--checkpoint (default: pretrain.py's) and --quantize, as the evaluation and generation
    scripts take them (for `loading.load_model`)."""
    ap.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINTS,
        help="a run's checkpoint folder (its latest step), one step's folder, or a serving checkpoint",
    )
    ap.add_argument(
        "--quantize",
        choices=("none", "int8", "int4"),
        default="none",
        help="weight-only quantization of the layers' linear weights (GLM-130B's scheme)",
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="tokenizer model file (default: the one the checkpoint carries)",
    )
    ap.add_argument(
        "--family",
        default=None,
        help="model family (default: the one the checkpoint records): glm, glm-130b, chatglm-6b, "
        "chatglm2-6b, chatglm3-6b",
    )
    ap.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a fine-tuned adapter (finetune.py's --out folder) to put on the checkpoint",
    )
    add_mesh_arg(ap)


def add_mesh_arg(ap: argparse.ArgumentParser) -> None:
    """--mesh for inference: pretrain.py's spec with one stage (weights over `tensor`, rows over `data`)."""
    ap.add_argument(
        "--mesh",
        default="1x1",
        help="devices to run on, as pretrain.py's spec with one stage: 1xT (T tensor shards) or Dx1xT "
        "(D data replicas of the rows); CPU devices are simulated when there are fewer",
    )


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`ap.parse_args(argv)`, then the devices `--mesh` needs prepared before JAX starts."""
    args = ap.parse_args(argv)
    prepare_devices(ap, args.mesh)
    return args


def prepare_devices(ap: argparse.ArgumentParser, mesh_spec: str) -> tuple[int, bool]:
    """Before JAX starts its backends: the devices `--mesh` needs (a bad spec is `ap.error`), CPU
    devices simulated when there are fewer, the multi-process runtime started when configured.
    -> (devices needed, whether CPU devices were simulated)."""
    from glm_jax import sharding as sh  # deferred: JAX, so a script's --help stays fast

    try:
        needed = sh.devices_needed(mesh_spec)
    except sh.MeshError as e:
        ap.error(str(e))
    simulated = sh.simulate_cpu_devices(needed)
    sh.initialize_distributed()
    return needed, simulated


def mesh_or_exit(spec: str):
    """The jax Mesh of an inference `--mesh` spec (None for 1x1: one device, as before); a spec
    the devices cannot hold prints `error: ...` and exits 2."""
    import jax

    from glm_jax import sharding as sh  # deferred: JAX, so --help stays fast

    try:
        needed = sh.devices_needed(spec)
        if needed == 1:
            return None
        if needed > len(jax.devices()):
            raise sh.MeshError(f"--mesh {spec} needs {needed} devices; {len(jax.devices())} available")
        return sh.make_mesh(spec, jax.devices()[:needed])
    except sh.MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_model_or_exit(args):
    """loading.load_model from the flags above (on `--mesh` when the script has it); a user
    mistake prints `error: ...` and exits 2."""
    from glm_jax.checkpoints import CheckpointError  # deferred: JAX, so --help stays fast
    from glm_jax.loading import load_model  # deferred: JAX, so --help stays fast

    mesh = mesh_or_exit(args.mesh) if getattr(args, "mesh", None) else None
    try:
        return load_model(
            args.checkpoint,
            quantize=args.quantize,
            tokenizer_file=args.tokenizer,
            family=args.family,
            adapter=getattr(args, "adapter", None),
            mesh=mesh,
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
