"""GLM's forward, compiled: the logits the tests compare. (Op by op instead, a config's first
forward compiles each of the model's primitives apart: seconds each time.)"""

import functools

import jax

from glm_jax.model import GLM


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, batch):
    """A batch of [B, S] int arrays -> [B, S, V] logits in the config's dtype; no dropout."""
    return GLM(config).apply({"params": params}, batch)
