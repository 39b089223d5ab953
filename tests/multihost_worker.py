"""One process of the two-process test (tests/test_sharding.py starts two of these).

Env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, XLA_FLAGS (4 fake CPU devices).
argv: output .npz path. Computes the loss and every gradient of the shared test model on a
2x2x2 mesh over both processes' devices, each process loading only its rows of the batch, then
the losses of a few training steps.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import sharding as sh  # noqa: E402

sh.initialize_distributed()

import sharding_case  # noqa: E402  (tests/ is on sys.path: this file's folder)

assert jax.process_count() == 2 and len(jax.devices()) == 8, (jax.process_count(), jax.devices())
mesh = sh.make_mesh("2x2x2")
local = sharding_case.local_rows(jax.process_index(), jax.process_count())
loss, grads = sharding_case.sharded_loss_and_grads(mesh, sh.global_batch(local, mesh))
train_losses = sharding_case.train_losses(mesh, jax.process_index(), jax.process_count())
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    np.savez(sys.argv[1], loss=np.asarray(loss), train_losses=np.asarray(train_losses), **flat)
jax.distributed.shutdown()
