"""The model the inference-on-a-mesh tests share: 8 heads and 2 KV heads, so tensor 2 splits the
KV heads and tensor 4 replicates them; float32, tiny."""

import jax

from glm_jax import sharding as sh
from glm_jax.config import get_config

CONFIG = get_config(
    "glm-tiny",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    num_kv_heads=2,
    vocab_size=512,
    vocab_pad_multiple=64,
    max_sequence_length=128,
    dtype="float32",
)


def mesh(spec: str) -> jax.sharding.Mesh:
    """A mesh over the first devices it needs (the suite has 32 fake CPU devices)."""
    return sh.make_mesh(spec, jax.devices()[: sh.devices_needed(spec)])
