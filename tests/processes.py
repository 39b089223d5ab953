"""How the tests start several JAX processes on loopback, as the README starts a pod's."""

import os
import pathlib
import re
import socket
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(processes: int, devices: int, argv: list[str]) -> list[subprocess.Popen]:
    """`processes` processes of argv with `devices` fake CPU devices each (JAX_COORDINATOR_ADDRESS
    on a free loopback port, JAX_NUM_PROCESSES, JAX_PROCESS_ID), sharing the suite's compile cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith("JAX_COMPILATION")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=re.sub(r"device_count=\d+", f"device_count={devices}", os.environ["XLA_FLAGS"]),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        JAX_NUM_PROCESSES=str(processes),
        PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]),
    )
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]


def wait(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Their output once all have exited (any still running is killed); every one must succeed."""
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return logs
