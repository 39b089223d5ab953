"""One process of tests/test_multiprocess.py's pod run: 4 processes x 2 fake CPU devices on mesh
2x2x2 (data x stage x tensor), so each data replica spans two processes.

Env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=4, JAX_PROCESS_ID, XLA_FLAGS (2 devices).
argv: a folder. Trains `run_config(folder, name, microbatches)` for every SETTINGS entry through
`train.train`, as `pretrain.py` would with those flags; process 0 writes the losses to
FOLDER/NAME/log/metrics.jsonl. The test runs the same settings on one process of 8 devices.
"""

import os
import sys

import numpy as np

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from glm_jax import sharding as sh

    sh.initialize_distributed()

import sharding_case  # noqa: E402  (tests/ is on sys.path: this file's folder)

from glm_jax.objectives import ObjectiveConfig, SequenceBuilder  # noqa: E402
from glm_jax.train import RunConfig  # noqa: E402

MESH = "2x2x2"
BATCH, SEQ, STEPS = 8, 32, 3
# (name, --microbatches): pretrain.py's default (None: one sequence per data replica, 4 here) and 2
SETTINGS = (("default", None), ("two", 2))


def config():
    return sharding_case.config(num_layers=2)


def builder():
    corpus = np.random.default_rng(5).integers(10, 500, 20_000).astype(np.int32)

    def window(rng, n):
        start = int(rng.integers(0, len(corpus) - n + 1))
        return corpus[start : start + n]

    return SequenceBuilder(window, SEQ, 0, ObjectiveConfig(samples_per_sequence=2, position_encoding_2d=True))


def run_config(folder: str, name: str, microbatches: int | None, steps: int = STEPS) -> RunConfig:
    return RunConfig(
        steps=steps,
        global_batch=BATCH,
        seq_len=SEQ,
        microbatches=microbatches,
        ckpt_dir=os.path.join(folder, name, "ck"),
        log_dir=os.path.join(folder, name, "log"),
        ckpt_every=100,
        async_checkpoints=False,
        progress=False,
    )


if __name__ == "__main__":
    import jax

    from glm_jax.train import train

    assert jax.process_count() == 4 and len(jax.devices()) == 8, (jax.process_count(), jax.devices())
    mesh = sh.make_mesh(MESH)
    for name, microbatches in SETTINGS:
        train(config(), sharding_case.optim(), run_config(sys.argv[1], name, microbatches), mesh, builder(), log=print)
    jax.distributed.shutdown()
