"""GLM-130B and its family in JAX/Flax. README.md has the tour; docs/ the topics.

Importing the package does one thing before JAX starts: on a machine without a TPU, JAX is kept
from probing libtpu (which the test extra installs), whose start-up prints `E0000 ...
INVALID_ARGUMENT: unexpected worker hostname` lines that read like a failed run. The TPU plans
(`--topology`) load libtpu themselves and are unaffected.
"""

from __future__ import annotations

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id, as JAX detects them


def _has_tpu() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _skip_tpu_probe() -> None:
    """JAX_PLATFORMS (when the user has not set it) = every installed platform but the TPU:
    the PJRT plugins found (cuda, rocm, ...) and cpu."""
    if os.environ.get("JAX_PLATFORMS") or _has_tpu():
        return
    from importlib.metadata import entry_points

    plugins = {e.name for e in entry_points(group="jax_plugins")}
    platforms = ",".join([p for p in ("cuda", "rocm") if any(p in name for name in plugins)] + ["cpu"])
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported before us: its config read the environment already
        sys.modules["jax"].config.update("jax_platforms", platforms)


_skip_tpu_probe()
