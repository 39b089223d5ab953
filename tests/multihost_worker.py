"""One process of the two-process test (tests/test_sharding.py starts two of these).

Env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, XLA_FLAGS (4 fake CPU devices).
argv: output .npz path, a run folder. Computes the loss and every gradient of the shared test
model on a 2x2x2 mesh over both processes' devices, each process loading only its rows of the
batch; then trains in the run folder (losses in RUN/log/metrics.jsonl) until process 1 alone gets
SIGTERM, once process 0 has logged LOGGED steps: every process must save the same step and stop.
Each writes its run summary to RUN/summary-<process>.json.
"""

import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import sharding as sh  # noqa: E402

sh.initialize_distributed()

import sharding_case  # noqa: E402  (tests/ is on sys.path: this file's folder)

from glm_jax.train import RunConfig, train  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 8, (jax.process_count(), jax.devices())
mesh = sh.make_mesh("2x2x2")
local = sharding_case.local_rows(mesh)
config = sharding_case.config(num_layers=sharding_case.MULTIHOST_LAYERS)
loss, grads = sharding_case.sharded_loss_and_grads(mesh, sh.global_batch(local, mesh), c=config)
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    np.savez(sys.argv[1], loss=np.asarray(loss), **flat)

run_dir = sys.argv[2]
LOGGED = 2


def _sigterm_once_steps_are_logged():
    metrics = os.path.join(run_dir, "log", "metrics.jsonl")  # process 0 writes it
    while True:
        try:
            with open(metrics) as f:
                if sum(line.endswith("\n") for line in f) >= LOGGED:
                    break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)


if jax.process_index() == 1:
    threading.Thread(target=_sigterm_once_steps_are_logged, daemon=True).start()
run = RunConfig(
    steps=40,
    global_batch=sharding_case.BATCH,
    seq_len=sharding_case.SEQ,
    ckpt_dir=f"{run_dir}/ck",
    log_dir=f"{run_dir}/log",
    ckpt_every=100,
    async_checkpoints=False,
    progress=False,
)
summary = train(config, sharding_case.optim(), run, mesh, sharding_case.builder(), log=lambda m: None)
with open(os.path.join(run_dir, f"summary-{jax.process_index()}.json"), "w") as f:
    json.dump(summary, f)
jax.distributed.shutdown()
