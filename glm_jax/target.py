"""The platform a trace is compiled for: the mesh's devices, not `jax.default_backend()`.

An AOT plan for a described TPU pod traces on a CPU-only process; kernel choices (cuDNN
attention, the Pallas INT4 kernel, TPU kernels) must follow the devices the program is compiled
for. `Trainer.context()` and the dry runs enter `targeting(mesh or device)`; outside one the
default backend is the target.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("glm_jax_target_platform", default=None)


def target_platform() -> str:
    """ "cpu", "gpu" or "tpu": what the current trace compiles for."""
    return _TARGET.get() or jax.default_backend()


def platform_of(where) -> str:
    """The platform of a Mesh, a device, or a sequence of devices."""
    devices = getattr(where, "devices", where)
    device = next(iter(getattr(devices, "flat", devices))) if not hasattr(devices, "platform") else devices
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


@contextlib.contextmanager
def targeting(where):
    token = _TARGET.set(platform_of(where))
    try:
        yield
    finally:
        _TARGET.reset(token)
