"""KV-cached generation for GLM's bidirectional prefix or a causal decoder: greedy, sampling, beam search.

Prompts are model-ready id lists (`families.py` builds them). The last id of a prompt is the first
decoded input and everything before it is the context: for a prefix LM the prompt holds one mask
token and ends with sop (appended when missing), and the context is bidirectional; for a causal
decoder (`causal=True`: ChatGLM2/3, GLM-4) the context is causal. Ragged contexts are right-padded
to T. Prefill writes the context's keys/values into cache slots 0..T-1; decoding feeds the start
id, then each chosen token, into slot T + step; a new token sees its row's context and the
generated slots so far. A prefix (`config.prefix_slots` = P: P-tuning v2's, or the virtual tokens
of prompt tuning / P-tuning v1, `prompts.serving_prefix`) takes cache slots 0..P-1, seen by every
token, and shifts the slots above by P (not the positions).
Positions and visibility are `decoding.decode_layout`'s (shared with the serving engine), sampling
is `decoding.sample` (the engine's per-row sampler), padded lengths `decoding.bucket_length`. One
compiled decode step serves every token. The dense layers are whatever the config selects, so
quantized layers plug in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import placement
from glm_jax.beam import BeamSearch
from glm_jax.config import GLMConfig
from glm_jax.decoding import BUCKET, bucket_length, decode_layout, sample
from glm_jax.families import default_stop_ids
from glm_jax.layers import GLMBlock, rotary_tables, write_cache
from glm_jax.model import GLM, attention_inputs
from glm_jax.prompts import serving_prefix
from glm_jax.tokenizer import GLM_IDS, SpecialIds


class GenerationError(ValueError):
    """A prompt the model cannot take (no mask token, too long); the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Right-padded contexts. tokens [B, T]; lengths, start, mask_pos, continue_positions: [B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    start: np.ndarray  # the first decoded input of each row (sop, or a causal prompt's last id)
    mask_pos: np.ndarray
    continue_positions: np.ndarray  # 1D [gMASK] and causal rows: generated positions continue the count
    causal: bool = False


def make_prompts(
    prompts: Sequence[Sequence[int]],
    config: GLMConfig,
    ids: SpecialIds = GLM_IDS,
    causal: bool = False,
    blank: int | None = None,
) -> PromptBatch:
    """Model-ready prompts -> a PromptBatch. Prefix LM: each must hold a mask token ([gMASK] to
    continue, [MASK]/[sMASK] to fill in; the first one, or the first `blank` id when given); a
    final sop is the start id (appended if absent)."""
    contexts, start, mask_pos, continue_positions = [], [], [], []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if causal:
            if not prompt:
                raise GenerationError(f"prompt {i} is empty")
            contexts.append(prompt[:-1])
            start.append(prompt[-1])
            mask_pos.append(0)
            continue_positions.append(True)
            continue
        if prompt and prompt[-1] == ids.sop:
            prompt = prompt[:-1]
        where = [j for j, tok in enumerate(prompt) if (tok == blank if blank is not None else tok in ids.mask_tokens)]
        if not where:
            raise GenerationError(
                f"prompt {i} holds no [MASK]/[sMASK]/[gMASK] token; append [gMASK] (id {ids.gmask}) to continue a text"
            )
        contexts.append(prompt)
        start.append(ids.sop)
        mask_pos.append(where[0])
        continue_positions.append(prompt[where[0]] == ids.gmask and not config.position_encoding_2d)
    width = bucket_length(max(1, max(len(context) for context in contexts)), multiple=BUCKET)
    tokens = np.full((len(prompts), width), ids.pad, np.int32)
    for i, context in enumerate(contexts):
        tokens[i, : len(context)] = context
    return PromptBatch(
        tokens,
        np.array([len(context) for context in contexts], np.int32),
        np.array(start, np.int32),
        np.array(mask_pos, np.int32),
        np.array(continue_positions),
        causal,
    )


def check_length(batch: PromptBatch, max_new_tokens: int, config: GLMConfig) -> None:
    """A clear error for a prompt that would run past the trained length."""
    longest = int(batch.lengths.max()) + 1
    if longest + max_new_tokens > config.max_sequence_length:
        raise GenerationError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds "
            f"max_sequence_length={config.max_sequence_length}: shorten the prompt to at most "
            f"{config.max_sequence_length - max_new_tokens} tokens or lower the generation budget"
        )


def serving_params(params: dict, num_layers: int, consume: bool = False) -> dict:
    """The generation layout: params["layers"] (stacked [L, ...]) -> a tuple of L per-layer
    trees, so each layer's weights are their own buffers. Decoding reads every weight once per
    token; a scan over stacked weights slices each layer's weights in the loop, a copy per
    layer unless XLA fuses the slice into the consumer (it cannot into a custom call).
    Returns params unchanged when already in this layout. Copies the layer weights once;
    consume: each stacked leaf is deleted as soon as it is split, so the model is held once
    (plus one leaf's stack) and the caller must not use `params` again."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params

    def split(leaf):
        slices = [leaf[i] for i in range(num_layers)]
        if consume and isinstance(leaf, jax.Array):
            leaf.delete()
        return slices

    per_leaf = jax.tree_util.tree_map(split, layers)
    treedef = jax.tree_util.tree_structure(layers)
    leaves = jax.tree_util.tree_leaves(per_leaf, is_leaf=lambda x: isinstance(x, list))
    return {
        **params,
        "layers": tuple(jax.tree_util.tree_unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(num_layers)),
    }


def inference_params(config: GLMConfig, params: dict, mesh: jax.sharding.Mesh | None = None, consume: bool = False):
    """The weights as `Generator`, `evaluate.ModelScorer` and the serving engine hold them: with a
    mesh, the mesh checked for inference and the weights placed on it (`placement`); then in the
    `serving_params` per-layer layout (consume: as there)."""
    if mesh is not None:
        placement.check_inference_mesh(config, mesh)
        params = placement.place(params, config, mesh)
    return serving_params(params, config.num_layers, consume)


def layered_forward(config: GLMConfig, params, batch):
    """GLM's forward (no cache, no dropout) with the layers in `serving_params` layout, unrolled:
    batch [B, S] arrays -> logits [B, S, vocab]. What `GLM.apply` computes with stacked layers."""
    outer = {k: v for k, v in params.items() if k != "layers"}
    return GLM(config).apply({"params": outer}, layered_hidden(config, params, batch), method=GLM.head)


def layered_hidden(config: GLMConfig, params, batch):
    """`layered_forward` up to the last layer's output (before the final norm): [B, S, E].
    Differentiable (PPO trains adapters through it, `ppo.py`)."""
    model, block = GLM(config), GLMBlock(config)
    outer = {k: v for k, v in params.items() if k != "layers"}
    h = model.apply({"params": outer}, batch, method=GLM.embed)
    mask, tables = attention_inputs(batch, config)
    prefix = serving_prefix(config, params)  # [L, P, 2, K, D] or None
    for i, layer in enumerate(params["layers"]):
        h = block.apply({"params": layer}, h, mask, tables, None, None, None if prefix is None else prefix[i])[0]
    return h


def init_cache(config: GLMConfig, batch: int, max_len: int, dtype=None, mesh: jax.sharding.Mesh | None = None):
    """One (k, v) pair per layer, each zeros [B, M, K, D] in the compute dtype (bf16 by default):
    separate buffers that a donating decode step updates in place. mesh: made sharded there
    (`placement.cache_sharding`: rows over `data`, KV heads over `tensor`)."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.compute_dtype
    make = lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=placement.cache_sharding(config, mesh))()


def cache_length(cache) -> int:
    return cache[0][0].shape[1]


def cached_forward(config: GLMConfig, params, tokens, position_ids, block_position_ids, mask, cache, cache_index):
    """tokens [B, S] at the given positions attend over the cache under mask [B, 1, S, M]; their
    keys/values are written at cache_index (a scalar, or [B]: one slot per row). Unrolled over layers
    (params in `serving_params` layout, cache from `init_cache`). -> (logits [B, S, vocab], new cache)."""
    model, block = GLM(config), GLMBlock(config)
    outer = {k: v for k, v in params.items() if k != "layers"}
    fields = {"tokens": tokens, "position_ids": position_ids, "block_position_ids": block_position_ids}
    h = model.apply({"params": outer}, fields, method=GLM.embed)
    tables = rotary_tables(position_ids, block_position_ids, config)
    new_cache = []
    for layer, (k, v) in zip(params["layers"], cache):
        h, (new_k, new_v) = block.apply({"params": layer}, h, mask, tables, (k, v), cache_index)
        new_cache.append((write_cache(k, new_k, cache_index), write_cache(v, new_v, cache_index)))
    return model.apply({"params": outer}, h, method=GLM.head), tuple(new_cache)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def write_prefix(config: GLMConfig, params, cache):
    """Put the prefix's keys/values (`prompts.serving_prefix`) in cache slots 0..P-1 of every row."""
    prefix = serving_prefix(config, params)  # [L, P, 2, K, D]
    return tuple(
        tuple(
            buffer.at[:, : config.prefix_slots].set(prefix[layer, None, :, kv].astype(buffer.dtype))
            for kv, buffer in enumerate(pair)  # kv: 0 keys, 1 values
        )
        for layer, pair in enumerate(cache)
    )


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def prefill(config: GLMConfig, params, cache, tokens, lengths, causal: bool = False):
    """Write the context [B, T] into cache slots P..P+T-1 (bidirectional over each row's context
    and the prefix, or causal)."""
    rows, width = tokens.shape
    prefix = config.prefix_slots
    keys = jnp.arange(cache_length(cache))
    mask = (keys[None, :] < prefix + lengths[:, None])[:, None, None, :] & jnp.ones((1, 1, width, 1), bool)
    if causal:
        mask = mask & (keys[None, None, None, :] <= prefix + jnp.arange(width)[None, None, :, None])
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width))
    return cached_forward(config, params, tokens, positions, jnp.zeros_like(positions), mask, cache, prefix)[1]


def decode_logits(config: GLMConfig, params, cache, token, step, lengths, mask_pos, cont, first_slot):
    """Feed token [B] as each row's generated token number `step` (the start id is step 0) at cache
    slot first_slot + step, positioned and masked by `decoding.decode_layout` (its arguments) ->
    (fp32 logits [B, V], cache). The decode step of `Generator` and of the serving engine."""
    slot, position, block, visible = decode_layout(
        config, step, lengths, mask_pos, cont, first_slot, cache_length(cache)
    )
    logits, cache = cached_forward(config, params, token[:, None], position, block, visible, cache, slot)
    return logits[:, 0].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def decode_step(config: GLMConfig, params, cache, token, step, lengths, mask_pos, cont, prompt_len):
    """Feed token [B] as generated token number `step` (sop is step 0) of contexts padded to
    prompt_len (every row's generated slots start at P + prompt_len) -> (fp32 logits [B, V], cache)."""
    return decode_logits(config, params, cache, token, step, lengths, mask_pos, cont, config.prefix_slots + prompt_len)


@jax.jit
def reorder_cache(cache, rows):
    """Gather batch rows of the cache (beam search's parent beams)."""
    return jax.tree_util.tree_map(lambda buffer: jnp.take(buffer, rows, axis=0), cache)


class Generator:
    """Prefill + cached decoding for one config and parameter tree (copied once into the
    `serving_params` layout unless already in it). ids: the tokenizer's special ids; causal: a
    causal family (`families.Family.causal`). mesh: a (data, 1, tensor) mesh to decode on
    (`placement`): the weights split by the training rules, the KV cache by rows over `data` and
    KV heads over `tensor`, rows padded to a multiple of `data`; the tokens are the one-device
    ones (to float rounding). consume: the stacked layer weights are deleted as they are split
    into the per-layer layout (`serving_params`), so the model is held once; pass it params the
    caller no longer uses (`LoadedModel.take_params()`)."""

    def __init__(
        self,
        config: GLMConfig,
        params,
        cache_dtype=None,
        ids: SpecialIds = GLM_IDS,
        causal: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        consume: bool = False,
    ):
        self.config, self.cache_dtype, self.ids, self.causal, self.mesh = config, cache_dtype, ids, causal, mesh
        self.params = inference_params(config, params, mesh, consume)

    def prompts(self, prompts: Sequence[Sequence[int]], blank: int | None = None) -> PromptBatch:
        return make_prompts(prompts, self.config, self.ids, self.causal, blank)

    def start(self, prompts: PromptBatch, max_new_tokens: int, repeat: int = 1):
        """Prefill; with repeat > 1 every prompt row is repeated (beams). Returns the decode state."""
        check_length(prompts, max_new_tokens, self.config)
        rows = len(prompts.tokens) * repeat
        padded = placement.padded_rows(rows, self.mesh)
        tokens, lengths, mask_pos, cont = (
            placement.pad_rows(np.repeat(array, repeat, axis=0), padded)
            for array in (prompts.tokens, prompts.lengths, prompts.mask_pos, prompts.continue_positions)
        )
        width = tokens.shape[1]
        cache_len = bucket_length(self.config.prefix_slots + width + max_new_tokens, multiple=BUCKET)
        cache = init_cache(self.config, padded, cache_len, self.cache_dtype, self.mesh)
        if self.config.prefix_slots:
            cache = write_prefix(self.config, self.params, cache)
        cache = prefill(self.config, self.params, cache, jnp.asarray(tokens), jnp.asarray(lengths), prompts.causal)
        return dict(
            cache=cache,
            lengths=jnp.asarray(lengths),
            mask_pos=jnp.asarray(mask_pos),
            cont=jnp.asarray(cont),
            prompt_len=width,
            rows=rows,
        )

    def step(self, state, token, step):
        """Feed token [rows] as generated token number `step` -> fp32 logits [rows, V]."""
        token = placement.pad_rows(np.asarray(token, np.int32), len(state["lengths"]))
        logits, state["cache"] = decode_step(
            self.config,
            self.params,
            state["cache"],
            jnp.asarray(token),
            jnp.int32(step),
            state["lengths"],
            state["mask_pos"],
            state["cont"],
            jnp.int32(state["prompt_len"]),
        )
        return logits[: state["rows"]]

    # ---- strategies -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        key=None,
        on_token=None,
        stop_tokens: Sequence[int] | None = None,
        blank: int | None = None,
    ) -> list[list[int]]:
        """Greedy (temperature 0) or sampled continuations, each up to its first stop token.

        Sampling is `decoding.sample`: row i of the batch draws its token of step s with
        fold_in(fold_in(key, i), s) (key defaults to key(0)), the serving engine's rule with
        fold_in(key, i) in place of a request's key(seed). on_token(step, tokens [B]) is called as
        tokens are produced (streaming; finished rows get pad). stop_tokens default to
        `families.default_stop_ids` (eop and eos)."""
        stop_tokens = default_stop_ids(self.ids) if stop_tokens is None else tuple(stop_tokens)
        batch = self.prompts(prompts, blank)
        state = self.start(batch, max_new_tokens)
        rows = len(prompts)
        token = batch.start.copy()
        out = [[] for _ in range(rows)]
        done = np.zeros(rows, bool)
        key = jax.random.key(0) if key is None else key
        for step in range(max_new_tokens):
            logits = self.step(state, token, step)
            token = np.asarray(sample(logits, key, temperature, top_k, top_p, step))
            if on_token is not None:
                on_token(step, np.where(done, self.ids.pad, token))
            for i in range(rows):
                if not done[i]:
                    if token[i] in stop_tokens:
                        done[i] = True
                    else:
                        out[i].append(int(token[i]))
            if done.all():
                break
        return out

    def beam_search(
        self,
        prompt: Sequence[int],
        num_beams: int,
        max_new_tokens: int,
        *,
        length_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
        stop_tokens: Sequence[int] | None = None,
        banned_ids: Sequence[int] = (),
        banned_prefixes: Sequence[Sequence[int]] = (),
        consider_end: bool = True,
        min_new_tokens: int = 0,
        length_norm: str = "opennmt",
    ) -> list[tuple[list[int], float]]:
        """GLM-130B's beam search (`beam.BeamSearch`) for one prompt on the KV cache: the beams
        are cache rows, reordered on device after each step. -> the final beams in the
        reference's order: (generated ids after the start id, ending with the stop id when the
        beam ended; penalized score). stop_tokens default to `families.default_stop_ids`."""
        stop_tokens = default_stop_ids(self.ids) if stop_tokens is None else tuple(stop_tokens)
        batch = self.prompts([prompt])
        state = self.start(batch, max_new_tokens, repeat=num_beams)
        context = list(batch.tokens[0, : batch.lengths[0]]) + [int(batch.start[0])]
        vocab = self.config.vocab_size

        def next_logits(parents, tokens, step):
            rows = list(parents) + [parents[0]] * (num_beams - len(parents))  # dead rows copy beam 0
            if step:  # step 0: every row is the prompt already
                rows = placement.pad_rows(np.asarray(rows, np.int32), len(state["lengths"]))
                state["cache"] = reorder_cache(state["cache"], jnp.asarray(rows))
            token = np.asarray(list(tokens) + [tokens[0]] * (num_beams - len(tokens)), np.int32)
            return np.asarray(self.step(state, token, step))[: len(parents), :vocab]

        search = BeamSearch(
            num_beams,
            stop_tokens,
            length_penalty,
            no_repeat_ngram,
            banned_ids,
            banned_prefixes,
            min_new_tokens,
            consider_end,
            length_norm,
        )
        return search.run(context, next_logits, max_new_tokens)


def fill_blanks(
    gen: Generator, prompt: Sequence[int], max_new_tokens: int, **sampling
) -> tuple[list[int], list[list[int]]]:
    """GLM-130B's generate.py on a prefix LM: the blanks of the prompt's mask kind ([MASK] if it
    has one, else [sMASK], else [gMASK]) are filled first to last, each answer written back in
    place of its mask token before the next blank is generated. A causal model continues the
    prompt once. prompt: model-ready ids (a final sop is optional); sampling: `generate`'s
    keywords. -> (the sequence with every blank filled, without sop; each blank's ids)."""
    ids, seq = gen.ids, [int(t) for t in prompt]
    if gen.causal:
        out = gen.generate([seq], max_new_tokens, **sampling)[0]
        return seq + out, [out]
    if seq and seq[-1] == ids.sop:
        seq = seq[:-1]
    kind = next((mask for mask in (ids.mask, ids.smask, ids.gmask) if mask in seq), None)
    if kind is None:
        raise GenerationError(f"the prompt holds no [MASK]/[sMASK]/[gMASK] token; append [gMASK] (id {ids.gmask})")
    blanks = []
    while kind in seq:
        at = seq.index(kind)
        out = gen.generate([seq], max_new_tokens, blank=kind, **sampling)[0]
        blanks.append(out)
        seq = seq[:at] + out + seq[at + 1 :]
    return seq, blanks
