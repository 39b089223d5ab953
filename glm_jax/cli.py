"""Command-line pieces the experiments/ scripts share. Imports no JAX, so `--help` stays fast."""

from __future__ import annotations

import argparse
import os

DEFAULT_RUN = os.path.join("runs", "default")  # pretrain.py writes here; the evaluation scripts read it
DEFAULT_CHECKPOINTS = os.path.join(DEFAULT_RUN, "checkpoints")


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """--checkpoint (default: pretrain.py's) and --quantize, as the evaluation and generation
    scripts take them (for `train.load_checkpoint`)."""
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS,
                    help="a run's checkpoint folder (its latest step), one step's folder, or a serving checkpoint")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                    help="weight-only quantization of the layers' linear weights (GLM-130B's scheme)")
