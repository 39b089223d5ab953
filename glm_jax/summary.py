"""Parameter counts and bytes per component, from an abstract init (nothing allocated)."""

from __future__ import annotations

import math

import jax

from glm_jax.config import GLMConfig
from glm_jax.model import abstract_params

# our leaf path prefix -> component name in the report
COMPONENTS = (
    ("word_embeddings", "embedding"),
    ("output_layer", "output layer"),
    ("layers/attention/query", "attention qkv"),
    ("layers/attention/key", "attention qkv"),
    ("layers/attention/value", "attention qkv"),
    ("layers/attention/dense", "attention dense"),
    ("layers/mlp/dense_h_to_4h", "mlp h_to_4h"),
    ("layers/mlp/dense_4h_to_h", "mlp 4h_to_h"),
    ("layers/input_layernorm", "layer norms"),
    ("layers/post_attention_layernorm", "layer norms"),
    ("final_layernorm", "final norm"),
)
# the quantizable linear kernels (docs/reference.md section 6) and how many leading axes (after `layers`)
# they contract
QUANTIZED_KERNELS = {
    "layers/attention/query/kernel": 1,
    "layers/attention/key/kernel": 1,
    "layers/attention/value/kernel": 1,
    "layers/attention/dense/kernel": 2,
    "layers/mlp/dense_h_to_4h/kernel": 1,
    "layers/mlp/dense_4h_to_h/kernel": 1,
}


def _leaves(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    tree = abstract_params(config)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "value")):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out[key] = tuple(getattr(leaf, "value", leaf).shape)
    return out


def parameter_summary(config: GLMConfig) -> dict:
    """{'params': N, 'components': {name: N}, 'bytes': {'fp32','bf16','int8','int4': B}}.

    int8/int4 follow GLM-130B's scheme: the four linear weights of every layer at 8/4 bits plus
    one fp16 scale per output row; embeddings, norms and biases stay 16-bit.
    """
    leaves = _leaves(config)
    components: dict[str, int] = dict.fromkeys(dict.fromkeys(n for _, n in COMPONENTS), 0)
    for key, shape in leaves.items():
        name = next((n for prefix, n in COMPONENTS if key.startswith(prefix + "/")), key)
        components[name] = components.get(name, 0) + math.prod(shape)
    components = {n: v for n, v in components.items() if v}
    total = sum(components.values())
    quantized = {k: leaves[k] for k in QUANTIZED_KERNELS if k in leaves}
    q_params = sum(math.prod(s) for s in quantized.values())
    scale_rows = sum(math.prod(s) // math.prod(s[1 : 1 + QUANTIZED_KERNELS[k]]) for k, s in quantized.items())
    rest16 = 2 * (total - q_params)
    return {
        "params": total,
        "components": components,
        "quantized_linear_params": q_params,
        "bytes": {
            "fp32": 4 * total,
            "bf16": 2 * total,
            "int8": rest16 + q_params + 2 * scale_rows,
            "int4": rest16 + q_params // 2 + 2 * scale_rows,
        },
    }


def flops_per_token(config: GLMConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token (docs/design.md#measuring-performance): every matmul, attention included
    with the bidirectional prefix not halved; forward, and forward + backward (x3)."""
    e, h, kv, d, f = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_kv_heads,
        config.head_dim,
        config.inner_hidden_size,
    )
    per_layer = 2 * (e * (h + 2 * kv) * d + h * d * e + e * f * (2 if config.gated_ffn else 1) + f * e)
    attention = 2 * 2 * seq_len * h * d  # scores and context, every key
    head = 2 * e * config.padded_vocab_size
    forward = config.num_layers * (per_layer + attention) + head
    return {"forward": float(forward), "train": float(3 * forward)}
