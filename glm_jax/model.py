"""GLM: word embedding (with GLM-130B's gradient shrink), stacked blocks, final norm, output head.

    logits = GLM(config).apply({"params": params}, batch)        # [B, S, vocab_size]

`batch` follows docs/design.md#the-batch-contract (int32 [B, S] arrays; `targets`/`loss_mask` are not read here).
Logits cover the tokenizer's `vocab_size`: the embedding's padding rows are sliced off. Without a
'dropout' rng the model runs deterministically (evaluation mode).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import REMAT_POLICIES, GLMConfig
from glm_jax.layers import (
    GLMBlock,
    GLMMask,
    Linear,
    PrefixEncoder,
    glm_attention_mask,
    make_norm,
    rotary_tables,
    wants_flash,
    xavier_normal,
)
from glm_jax.prompts import prefix_pass, prompt_module


def shrink_embedding_gradient(x, alpha):
    """Forward: x exactly; backward: alpha times the gradient (docs/reference.md#5-training-setup).

    Written as sg(x) + alpha*(x - sg(x)) rather than alpha*x + (1-alpha)*sg(x) so the forward
    value is bit-identical to x in any dtype.
    """
    sg = jax.lax.stop_gradient(x)
    return sg + jnp.asarray(alpha, x.dtype) * (x - sg)


def stacked_blocks(config: GLMConfig, name: str = "layers") -> nn.Module:
    """All layers as one scanned module: parameters carry a leading `layers` axis."""
    block = GLMBlock
    if config.remat_policy != "none":
        block = nn.remat(GLMBlock, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, name=name)


def attention_inputs(batch: dict, config: GLMConfig):
    """What every layer needs from the batch: the GLM mask (dense bool [B, 1, S, S], or its
    per-position data `GLMMask` for the TPU kernel) and the rotary tables."""
    mask = (
        GLMMask(batch["segment_ids"], batch["prefix_mask"])
        if wants_flash(config)
        else glm_attention_mask(batch["segment_ids"], batch["prefix_mask"])
    )
    block_positions = batch.get("block_position_ids")
    if block_positions is None:
        block_positions = jnp.zeros_like(batch["position_ids"])
    return mask, rotary_tables(batch["position_ids"], block_positions, config)


class GLM(nn.Module):
    """The GLM family's language model. batch of [B, S] int32 -> logits [B, S, vocab_size].

    `embed`, `blocks` and `head` are the three stages of `__call__`, callable on their own with
    `apply(..., method=...)` (the pipeline runs the blocks itself, between `embed` and `head`).
    """

    config: GLMConfig

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(
            c.padded_vocab_size,
            c.hidden_size,
            dtype=c.compute_dtype,
            param_dtype=c.params_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.embedding_init_std), ("vocab", "embed")
            ),
        )
        if c.position_encoding == "learned":
            tables = ["position_embeddings"] + (["block_position_embeddings"] if c.position_encoding_2d else [])
            self.position_tables = [
                nn.Embed(
                    c.learned_position_rows,
                    c.hidden_size,
                    dtype=c.compute_dtype,
                    param_dtype=c.params_dtype,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(c.embedding_init_std), (None, "embed")
                    ),
                    name=name,
                )
                for name in tables
            ]
        if c.embedding_norm:
            self.embedding_layernorm = make_norm(c, None)
        self.embedding_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = stacked_blocks(c)
        if c.final_norm:
            self.final_layernorm = make_norm(c, None)
        if c.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(c)
        if c.num_virtual_tokens:
            self.prompt_encoder = prompt_module(c)
        if c.value_head:
            self.value_head = nn.Dense(
                1,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                # ColossalChat's reward head: N(0, 1 / (hidden + 1)), zero bias
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(1.0 / (c.hidden_size + 1)), ("embed", None)
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            )
        if not c.tie_word_embeddings:
            self.output_layer = Linear(
                (c.hidden_size,),
                (c.padded_vocab_size,),
                ("embed", "vocab"),
                False,
                c,
                xavier_normal(),
                quantizable=False,
            )

    def __call__(self, batch, *, embedding_alpha=None, return_hidden: bool = False):
        """embedding_alpha: overrides config.embedding_shrink_alpha (a schedule may drive it).

        return_hidden: return the final hidden states [B, S, E] instead of logits.
        """
        h = self.blocks(self.embed(batch, embedding_alpha=embedding_alpha), batch)
        if self.config.value_head and self.is_initializing():
            self.values(h)  # init creates the value head's parameters too
        return self.head(h, return_hidden=return_hidden)

    def embed(self, batch, embedding_alpha=None):
        """tokens [B, S] -> [B, S, E]: lookup, gradient shrink, then learned position tables
        (position_ids + position_offset; 2D: block_position_ids too) added and BLOOM's embedding
        LayerNorm where the config has them, embedding dropout."""
        c = self.config
        h = self.word_embeddings(batch["tokens"])
        alpha = c.embedding_shrink_alpha if embedding_alpha is None else embedding_alpha
        h = shrink_embedding_gradient(h, alpha)
        if c.position_encoding == "learned":
            h = h + self.position_tables[0](batch["position_ids"] + c.position_offset)
            if c.position_encoding_2d:
                block_positions = batch.get("block_position_ids")
                if block_positions is None:
                    block_positions = jnp.zeros_like(batch["position_ids"])
                h = h + self.position_tables[1](block_positions)
        if c.embedding_norm:
            h = self.embedding_layernorm(h)
        h = self.embedding_dropout(h, deterministic=not self.has_rng("dropout"))
        return nn.with_logical_constraint(h, ("batch", "sequence", "embed"))

    def blocks(self, h, batch):
        """[B, S, E] -> [B, S, E] through every layer."""
        mask, tables = attention_inputs(batch, self.config)
        return self.layers(h, mask, tables, None, None, self.prefix())[0]

    def prefix(self):
        """The keys/values [L, P, 2, K, D] every token sees before its sequence, or None: P-tuning
        v2's prefix encoder, or the virtual tokens of prompt tuning / P-tuning v1 run through the
        layers at positions -P..-1 (`prompts.prefix_pass`; embedding dropout on them as on tokens)."""
        c = self.config
        if c.num_virtual_tokens:
            x = self.embedding_dropout(self.prompt_encoder(), deterministic=not self.has_rng("dropout"))
            return prefix_pass(x, lambda h, mask, tables, cache: self.layers(h, mask, tables, cache, 0, None)[1], c)
        return self.prefix_encoder() if c.pre_seq_len else None

    def head(self, h, return_hidden: bool = False):
        """[B, S, E] -> final norm -> logits [B, S, vocab_size] (or the normed hidden states)."""
        c = self.config
        if c.final_norm:
            h = self.final_layernorm(h)
        if return_hidden:
            return h
        logits = self.word_embeddings.attend(h) if c.tie_word_embeddings else self.output_layer(h)
        return logits[..., : c.vocab_size]

    def values(self, h):
        """[B, S, E] -> final norm -> the value head's scalar per position [B, S] in fp32 (config.value_head:
        reward models and PPO's critic)."""
        return self.value_head(self.head(h, return_hidden=True).astype(jnp.float32))[..., 0]


def init_params(config: GLMConfig, rng, batch_size: int = 1, seq_len: int = 8):
    """Random parameters (fp32 by default), unboxed: a plain nested dict of arrays."""
    init = jax.jit(lambda key: GLM(config).init(key, dummy_batch(batch_size, seq_len))["params"])
    return nn.meta.unbox(init(rng))


def abstract_params(config: GLMConfig):
    """Parameter shapes/dtypes with logical-axis boxes, nothing allocated (`jax.eval_shape`)."""
    return jax.eval_shape(lambda: GLM(config).init(jax.random.key(0), dummy_batch(1, 8)))["params"]


def dummy_batch(batch_size: int, seq_len: int) -> dict:
    """A valid batch of zeros: one segment, all part A (for init and shape checks)."""
    z = jnp.zeros((batch_size, seq_len), jnp.int32)
    ones = jnp.ones_like(z)
    return dict(
        tokens=z,
        targets=z,
        loss_mask=z,
        position_ids=jnp.broadcast_to(jnp.arange(seq_len), z.shape),
        block_position_ids=z,
        segment_ids=ones,
        prefix_mask=ones,
    )
