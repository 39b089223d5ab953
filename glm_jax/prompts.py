"""Prompt tuning (Lester et al. 2021) and P-tuning v1 (Liu et al. 2021, "GPT Understands, Too"):
P virtual tokens before the input, trained while the model stays frozen (peft's PromptEmbedding
and PromptEncoder).

    x = prompt_module(config).apply({"params": p})          # virtual tokens [P, E]
    prefix = prefix_pass(x, run_layers, config)              # their keys/values [L, P, 2, K, D]

- prompt tuning (`prompt_encoder="none"`): the P embeddings themselves train (`PromptEmbedding`).
- P-tuning v1 (`"mlp"` / `"lstm"`): an embedding through a prompt encoder (`PromptEncoder`): an
  MLP E -> H -> H -> E, or a 2-layer bidirectional LSTM (H per direction) and an MLP 2H -> 2H -> E.

The virtual tokens come first and every real token sees them, while they see only each other
(causal among themselves), so their keys and values in every layer do not depend on the input.
`prefix_pass` runs them once per forward through the model's own frozen layers (the KV-cache
path) at positions -P..-1, block position 0, and collects each layer's new keys (rotated) and
values: the layout of P-tuning v2's prefix (`GLM.prefix`), which training, generation (cache
slots 0..P-1), evaluation and serving already take. A rotary score depends only on the two
positions' difference, so real tokens at 0..S-1 seeing virtual ones at -P..-1 score exactly as
peft's prepended sequence (virtual tokens at 0..P-1, the real ones shifted to P..P+S-1). On the
causal families (ChatGLM2/3, GLM-4) that is peft's computation; on the prefix LMs (GLM-130B,
ChatGLM-6B) a literal prepend would put the virtual tokens in the bidirectional part A, seeing the
input; here they stay input-independent there too, as a prompt before the input.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ConfigError, GLMConfig
from glm_jax.layers import GLMBlock, PrefixEncoder, rotary_tables

PIPELINE_ERROR = (
    "prompt tuning / P-tuning v1 run their virtual tokens through every layer once per step, which "
    "the pipeline's per-stage programs cannot: run on a mesh without pipeline stages (--mesh "
    "DATAx1xTENSOR), or use ptuning (P-tuning v2) / lora on this mesh"
)


def _torch_uniform(fan_in: int):
    """torch's default Linear / LSTM init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _embedding(module: nn.Module, c: GLMConfig):
    """The virtual token embeddings [P, E], N(0, 1) (torch's nn.Embedding; peft's RANDOM init)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
    return module.param("embedding", init, (c.num_virtual_tokens, c.hidden_size), c.params_dtype)


def _dense(features: int, fan_in: int, axes: tuple, c: GLMConfig, name: str) -> nn.Dense:
    """torch.nn.Linear as peft builds it, computed in fp32: kernel [in, out] named `axes`, bias [out]."""
    init = _torch_uniform(fan_in)
    return nn.Dense(
        features,
        dtype=jnp.float32,
        param_dtype=c.params_dtype,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(init, axes[1:]),
        name=name,
    )


class PromptEmbedding(nn.Module):
    """Prompt tuning: () -> the trainable virtual tokens [P, E] in the compute dtype."""

    config: GLMConfig

    @nn.compact
    def __call__(self):
        return _embedding(self, self.config).astype(self.config.compute_dtype)


class PromptEncoder(nn.Module):
    """P-tuning v1's prompt encoder (peft's PromptEncoder): () -> virtual tokens [P, E].

    An embedding [P, E] (N(0, 1)) through, with H = `prompt_encoder_hidden_size` (0: E):
    - "mlp": Linear(E, H), ReLU, Linear(H, H), ReLU, Linear(H, E) (`mlp_head_0/2/4`);
    - "lstm": a 2-layer bidirectional LSTM of H per direction over the P tokens (`lstm_head`, torch's
      layout), then Linear(2H, 2H), ReLU, Linear(2H, E) (`mlp_head_0/2`).
    Computed in fp32 (peft's encoder runs in its fp32 parameters) and returned in the compute dtype.
    Linear and LSTM weights start as torch's defaults, U(+-1/sqrt(fan_in)) (LSTM: fan_in = H).
    """

    config: GLMConfig

    @nn.compact
    def __call__(self):
        c = self.config
        e, hidden = c.hidden_size, c.prompt_encoder_hidden_size or c.hidden_size
        x = _embedding(self, c).astype(jnp.float32)
        if c.prompt_encoder == "lstm":
            x = BidirectionalLSTM(c, hidden, name="lstm_head")(x)
            x = nn.relu(_dense(2 * hidden, 2 * hidden, (None, None), c, "mlp_head_0")(x))
            return _dense(e, 2 * hidden, (None, "embed"), c, "mlp_head_2")(x).astype(c.compute_dtype)
        x = nn.relu(_dense(hidden, e, ("embed", "mlp"), c, "mlp_head_0")(x))
        x = nn.relu(_dense(hidden, hidden, ("mlp", None), c, "mlp_head_2")(x))
        return _dense(e, hidden, (None, "embed"), c, "mlp_head_4")(x).astype(c.compute_dtype)


class BidirectionalLSTM(nn.Module):
    """torch.nn.LSTM(in, hidden, num_layers=2, bidirectional=True) over one sequence: x [P, in] ->
    [P, 2 * hidden] (forward and backward outputs of the last layer, concatenated).

    Parameters as torch names them: weight_ih_l{k}[_reverse] [4H, in], weight_hh_l{k}[_reverse]
    [4H, H], bias_ih / bias_hh [4H], gates in torch's order (input, forget, cell, output).
    """

    config: GLMConfig
    hidden: int
    num_layers: int = 2

    @nn.compact
    def __call__(self, x):
        c, h = self.config, self.hidden
        init = _torch_uniform(h)
        for layer in range(self.num_layers):
            outputs = []
            for suffix in ("", "_reverse"):
                shapes = dict(weight_ih=(4 * h, x.shape[-1]), weight_hh=(4 * h, h), bias_ih=(4 * h,), bias_hh=(4 * h,))
                w = {
                    name: self.param(f"{name}_l{layer}{suffix}", init, shape, c.params_dtype).astype(jnp.float32)
                    for name, shape in shapes.items()
                }
                seq = x[::-1] if suffix else x
                out = _lstm_direction(seq, w, h)
                outputs.append(out[::-1] if suffix else out)
            x = jnp.concatenate(outputs, axis=-1)
        return x


def _lstm_direction(x, w: dict, hidden: int):
    """One LSTM direction over x [P, in] from zero states -> hidden states [P, H] (torch's cell)."""
    inputs = x @ w["weight_ih"].T + w["bias_ih"] + w["bias_hh"]  # [P, 4H]

    def step(carry, gates_x):
        h, cell = carry
        i, f, g, o = jnp.split(gates_x + h @ w["weight_hh"].T, 4)
        cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(cell)
        return (h, cell), h

    zeros = jnp.zeros((hidden,), jnp.float32)
    return jax.lax.scan(step, (zeros, zeros), inputs)[1]


def prompt_module(config: GLMConfig) -> nn.Module:
    """The module that makes the virtual tokens: `PromptEmbedding` or `PromptEncoder` (GLM's `prompt_encoder`)."""
    cls = PromptEmbedding if config.prompt_encoder == "none" else PromptEncoder
    return cls(config, name="prompt_encoder")


# ---- the prefix pass ------------------------------------------------------------------------------
def virtual_inputs(config: GLMConfig, p: int):
    """What the layers need for the P virtual tokens alone: (mask [1, 1, P, P], causal among them;
    rotary tables at positions -P..-1, block position 0)."""
    positions = jnp.arange(-p, 0, dtype=jnp.int32)[None]
    mask = jnp.tril(jnp.ones((p, p), bool))[None, None]
    return mask, rotary_tables(positions, jnp.zeros_like(positions), config)


def prefix_pass(x, run_layers, config: GLMConfig):
    """The virtual tokens x [P, E] -> their keys (rotated) and values in every layer [L, P, 2, K, D]
    (compute dtype), the layout of P-tuning v2's prefix.

    run_layers(h [1, P, E], mask [1, 1, P, P], tables, cache) -> (keys, values), each [L, 1, P, K, D]:
    the layer stack's KV-cache path given `cache`, a zero (k, v) pair [1, P, K, D] written from slot
    0, returning every layer's new entries (`GLM.prefix` scans `GLM.layers`, `layered_prefix`
    loops over per-layer parameters)."""
    p = x.shape[0]
    mask, tables = virtual_inputs(config, p)
    zeros = jnp.zeros((1, p, config.num_kv_heads, config.head_dim), config.compute_dtype)
    keys, values = run_layers(x[None].astype(config.compute_dtype), mask, tables, (zeros, zeros))
    return jnp.stack([keys[:, 0], values[:, 0]], axis=2)


def layered_prefix(config: GLMConfig, params: dict):
    """`prefix_pass` with params in the serving layout (`generate.serving_params`: `layers` a
    tuple of per-layer trees), no dropout -> [L, P, 2, K, D]."""
    x = prompt_module(config).apply({"params": params["prompt_encoder"]})
    block = GLMBlock(config)

    def run_layers(h, mask, tables, cache):
        entries = []
        for layer in params["layers"]:
            h, new = block.apply({"params": layer}, h, mask, tables, cache, 0)
            entries.append(new)
        return tuple(jnp.stack(parts) for parts in zip(*entries))

    return prefix_pass(x, run_layers, config)


def serving_prefix(config: GLMConfig, params: dict):
    """The keys/values [L, P, 2, K, D] every token sees before its sequence, from params in the
    serving layout: P-tuning v2's prefix encoder or the virtual tokens' pass; None without either."""
    if config.num_virtual_tokens:
        return layered_prefix(config, params)
    if config.pre_seq_len:
        return PrefixEncoder(config).apply({"params": params["prefix_encoder"]})
    return None


def check_pipeline(config: GLMConfig, stages: int) -> None:
    """A clear error for virtual tokens on a pipelined mesh (`PIPELINE_ERROR`)."""
    if config.num_virtual_tokens and stages > 1:
        raise ConfigError(PIPELINE_ERROR)
