"""How the tests start the experiments/ scripts in subprocesses."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def script_env() -> dict:
    """The environment of a script run: the suite's, on CPU, without its XLA_FLAGS -- the script
    sets its own devices (--mesh), and a run of many steps or requests is faster at XLA's default
    optimisation level than at the suite's -O0 (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
