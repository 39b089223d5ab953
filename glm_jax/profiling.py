"""`StepProfiler`: a `jax.profiler` trace of the training steps `--profile START:STOP` names, and
the seconds of collective ops read back from it where the backend's trace has a per-device op
timeline (GPU, TPU)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Callable

import jax

# collective ops of XLA's HLO (and their async -start / -done halves), as a trace's op names read
COLLECTIVE_OP = re.compile(r"^%?(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|ragged-all-to-all)")


class StepProfiler:
    """A `jax.profiler` trace of the steps span = (START, STOP) names (START..STOP-1, numbered as in
    metrics.jsonl; those this run reaches), written by every process (as jax's multi-host profiling
    does: each host traces its own devices) under log_dir/profile (several processes:
    log_dir/profile/process_<i>), for TensorBoard's profile plugin or Perfetto. The trace starts
    once the steps before it are done and stops once its last step's results are, so it holds
    those steps alone. A context manager: a trace still open when the loop ends is stopped."""

    def __init__(self, span: tuple[int, int] | None, log_dir: str, log: Callable[[str], None] = print):
        self.span, self.log = span, log
        self.folder = os.path.abspath(os.path.join(log_dir, "profile"))
        if jax.process_count() > 1:
            self.folder = os.path.join(self.folder, f"process_{jax.process_index()}")
        self.active = False
        self.traced: list[int] = []  # the steps traced

    def _in_span(self, step: int) -> bool:
        return self.span is not None and self.span[0] <= step < self.span[1]

    def before(self, step: int, state) -> None:
        """Before dispatching step `step`: start the trace at the span's first step this run runs."""
        if self._in_span(step) and not self.active and not self.traced:
            jax.block_until_ready(state)  # the steps before it stay out of the trace
            jax.profiler.start_trace(self.folder)
            self.active = True

    def annotate(self, step: int):
        """The step's dispatch, marked as step `step` in the trace while tracing."""
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, metrics) -> None:
        """After dispatching step `step`: at the span's last step, wait for it and stop the trace."""
        if self.active:
            self.traced.append(step)
            if step == self.span[1] - 1:
                jax.block_until_ready(metrics)
                self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.traced[0]}..{self.traced[-1]} written under {self.folder}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self._stop()

    def collectives(self) -> tuple[float | None, str]:
        """(device seconds in collective ops per traced step, mean over this process's devices, or
        None; a note saying what it is or why it is missing), from this process's trace: the
        `XLA Ops` line of each device plane (GPU and TPU traces have one; a CPU trace has no
        device plane)."""
        if not self.traced:
            return None, "collectives are read from a profile: pass --profile START:STOP"
        files = glob.glob(os.path.join(self.folder, "plugins", "profile", "*", "*.xplane.pb"))
        if not files:
            return None, f"no trace file under {self.folder}"
        trace = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
        devices = [
            [line for line in plane.lines if line.name == "XLA Ops"]
            for plane in trace.planes
            if plane.name.startswith("/device:") and any(line.name == "XLA Ops" for line in plane.lines)
        ]
        if not devices:
            return None, (
                f"the {jax.default_backend()} backend's trace has no per-device op timeline (XLA Ops): "
                "collectives not reported"
            )
        ops = [e for lines in devices for line in lines for e in line.events if COLLECTIVE_OP.match(e.name)]
        seconds = sum(e.duration_ns for e in ops) / 1e9 / len(devices) / len(self.traced)
        return seconds, "device seconds in collective ops per profiled step (the trace's XLA Ops, mean over devices)"
