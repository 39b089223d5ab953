"""The decoding rules `generate.Generator` and the serving engine share: padded lengths, where a
decoded token sits and what it sees, and per-row sampling.

- `bucket_length`: the padded length of a prompt, a cache or a batch, so few shapes compile.
- `decode_layout`: the cache slot, position, block position and visibility of one decoded token per
  row (docs/reference.md section 3): 1D [gMASK] and causal rows continue the count (the start id
  at the context length), 1D [MASK] and all 2D rows put generated tokens at the mask position (2D:
  block positions 1, 2, ...). A token sees its row's context (and a P-tuning prefix) and the
  row's generated slots up to its own.
- `sample_rows`: temperature / top-p / top-k sampling with per-row settings and keys; temperature 0
  is the argmax. Top-k and top-p find per-row thresholds by bisection (`filter_logits`) instead of
  sorting the vocabulary. `sample` is the same sampler with one setting and one key for every row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm_jax.config import GLMConfig

BUCKET = 16  # the smallest padded length, and the default multiple lengths are rounded up to


def bucket_length(n: int, limit: int | None = None, *, multiple: int | None = None) -> int:
    """The padded length for n: the next power of two >= n and >= BUCKET, or with `multiple` the next
    multiple of it; at most `limit`. Prompt batches and generation caches use multiple=BUCKET, the
    engine's prefill the power of two (capped at the model's length), evaluation batches multiple=64."""
    if multiple is not None:
        padded = -(-n // multiple) * multiple
    else:
        padded = max(BUCKET, 1 << max(0, n - 1).bit_length())
    return padded if limit is None else min(padded, limit)


def decode_layout(config: GLMConfig, step, lengths, mask_pos, cont, first_slot, cache_len: int):
    """Where one decoded token per row goes and what it sees. step: the generated token number
    (0: the start id), a scalar or [B]; lengths / mask_pos / cont [B]: each row's context length,
    mask position and whether positions continue the count; first_slot: the cache slot of each
    row's start id (a scalar when every row's contexts are padded to one length, else [B]).
    -> (cache slot: first_slot + step, scalar or [B]; position [B, 1]; block position [B, 1];
    visibility mask [B, 1, 1, cache_len]: the row's prefix and context, slots P..P+length-1, and
    its generated slots first_slot..slot)."""
    prefix = config.prefix_slots
    slot = first_slot + step
    position = jnp.where(cont, lengths + step, mask_pos)[:, None]
    if config.position_encoding_2d:
        block = jnp.broadcast_to(step + 1, lengths.shape)[:, None].astype(position.dtype)
    else:
        block = jnp.zeros_like(position)
    keys = jnp.arange(cache_len)[None, :]
    generated = (keys >= jnp.reshape(first_slot, (-1, 1))) & (keys <= jnp.reshape(slot, (-1, 1)))
    visible = (keys < prefix + lengths[:, None]) | generated
    return slot, position, block, visible[:, None, None, :]


def _largest_passing(lo, hi, passes, iterations: int = 40):
    """Bisection per row: the largest t in [lo, hi] ([S]) with passes(t) [S] true (passes(lo) holds,
    and passes is monotone: true below some point, false above), to ~2^-40 of hi - lo."""

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = passes(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return jnp.where(passes(hi), hi, lo)


def filter_logits(scaled, top_p, top_k):
    """Top-k and top-p (nucleus) filtering of temperature-scaled logits [S, V] by per-row thresholds
    found by bisection: O(V) passes instead of a vocabulary sort, which dominates a CPU step.
    top_p [S] float (1: off), top_k [S] int (0: off). Filtered ids get -inf.

    The tie rule: a threshold keeps every id at it. Top-k keeps the ids whose logit is at least the
    k-th largest, so all ids tied with the k-th are kept (more than k when there are ties). Top-p
    then keeps the ids whose probability is at least the cut: the probability of the last id of the
    smallest set, taken in descending probability, that holds top_p of the mass; ids tied with the
    cut are all kept, so no id is kept while an equally likely one is dropped."""
    k = jnp.minimum(top_k, scaled.shape[-1])[:, None]
    hi, lo = scaled.max(-1), jnp.min(jnp.where(jnp.isfinite(scaled), scaled, jnp.inf), -1)
    kth = _largest_passing(lo, hi, lambda t: (scaled >= t[:, None]).sum(-1) >= k[:, 0])
    scaled = jnp.where((k > 0) & (scaled < kth[:, None]), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)

    def holds_top_p(t):
        return jnp.where(probs >= t[:, None], probs, 0.0).sum(-1) >= top_p

    cut = _largest_passing(jnp.zeros_like(top_p), probs.max(-1), holds_top_p)
    return jnp.where((top_p < 1)[:, None] & (probs < cut[:, None]), -jnp.inf, scaled)


@jax.jit
def sample_rows(logits, keys, steps, temperature, top_p, top_k):
    """Per-row sampling of logits [S, V] (fp32) -> [S] int32. keys: [S] JAX keys, row s draws with
    fold_in(keys[s], steps[s]) (steps [S] int); temperature / top_p [S] float, top_k [S] int (0:
    off); temperature 0: the argmax. Ties at a top-k / top-p threshold: `filter_logits`. Filtering
    runs only on a step where some sampled row filters (top-p < 1 or top-k); a row that does not
    filter is unchanged by it, so its tokens never depend on its neighbours."""
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sampling = temperature > 0
    filtered = jax.lax.cond(
        jnp.any(sampling & ((top_p < 1) | (top_k > 0))), lambda x: filter_logits(x, top_p, top_k), lambda x: x, scaled
    )
    draw = jax.vmap(lambda row, key, step: jax.random.categorical(jax.random.fold_in(key, step), row))
    sampled = jax.lax.cond(
        jnp.any(sampling),
        lambda x: draw(x, keys, steps).astype(jnp.int32),
        lambda x: jnp.zeros(x.shape[0], jnp.int32),
        filtered,
    )
    return jnp.where(sampling, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def row_keys(key, rows: int):
    """[rows] keys from one key: row i's is fold_in(key, i)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(rows))


def seed_keys(seeds):
    """[S] keys from [S] uint32 seeds: row s's is key(seeds[s])."""
    return jax.vmap(jax.random.key)(seeds)


@jax.jit
def sample(logits, key, temperature, top_k, top_p, step=0):
    """`sample_rows` with one setting and one key for every row of logits [B, V] -> [B] int32: row i
    draws with fold_in(fold_in(key, i), step). `Generator.generate` calls it once per step."""
    rows = logits.shape[0]
    return sample_rows(
        logits,
        row_keys(key, rows),
        jnp.full((rows,), step, jnp.int32),
        jnp.full((rows,), temperature, jnp.float32),
        jnp.full((rows,), top_p, jnp.float32),
        jnp.full((rows,), top_k, jnp.int32),
    )
