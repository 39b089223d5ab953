"""Continuous batching over one shared KV cache: a fixed number of decode slots, one compiled step.

    engine = Engine(config, params, ids=tok.specials, causal=fam.causal, slots=8, max_queue=32)
    engine.start()                                     # the decode loop, on its own thread
    handle = engine.submit(Request(prompt_ids, max_tokens=64, sampling=Sampling(0.8, seed=1),
                                   stop_ids=fam.stop_ids(tok), on_token=..., on_done=...))
    engine.cancel(handle)                              # frees its slot at the next step
    engine.set_adapter(trainable)                      # new adapter leaves, between requests
    engine.stop()                                      # cancels what is left, joins the thread

The cache is `generate.init_cache(config, slots, M)` with M the padded length limit (plus a
P-tuning prefix, written once into slots 0..P-1 of every row). A request is prefilled alone, its
context right-padded to a power-of-two bucket (`decoding.bucket_length`: >= 16, so few shapes
compile), into its row's cache slots P..; its first decoded input is the prompt's start id (sop,
or a causal prompt's last id). ONE compiled step (`generate.decode_logits`, the generator's decode
step) then feeds every slot's current token at its own cache slot P + length + step, positioned
and masked by `decoding.decode_layout`, and samples the next token on device with per-slot
temperature / top-p / top-k arrays (`decoding.sample_rows`): temperature 0 is the argmax,
otherwise the randomness of step s comes from fold_in(key(seed), s) alone. A row sees only its
own context and generated slots, so a request's tokens depend only on its prompt and settings,
never on what shares the batch. A slot is freed the step its request ends (a stop id, max_tokens, the length
limit, `on_token` asking to stop, or cancellation) and the next queued request takes it.
The step also gives each sampled id's log-probability under the raw fp32 logits (temperature 1,
before top-k / top-p: OpenAI's `logprobs`, PPO's behaviour policy); a request whose `logprobs`
is a list gets them appended, one per generated id, the stop id's included.
`set_adapter` swaps new adapter leaves (LoRA pairs, a value head, ...: the plain stacked layout
training holds) into the serving-layout weights while no request is in flight: only those small
leaves are split per layer and replaced, the base's arrays stay the same objects (PPO's rounds).
No HTTP in here (`serving/api.py` is the server).

On a mesh (`Engine(..., mesh=)`, a (data, 1, tensor) mesh, `placement`): the weights are placed
by the training rules (`placement.place`: heads / MLP / vocabulary over `tensor`), the cache is
made sharded (`placement.cache_sharding`: slots over `data`, KV heads over `tensor`), and the slot
count is rounded up to a multiple of `data` (the extra slots serve requests like the others;
`load()`, so /health, reports the rounded count and the mesh). The decode step is still ONE
compiled program: the per-slot inputs are host arrays, the cache keeps its sharding from step to
step (so requests coming and going never recompile it), the logits are gathered (replicated)
before `decoding.sample_rows`, and the sampled ids come back replicated, readable in every
process. A prefill (one program per bucket, as on one device) computes its one row, split over
`tensor` and the same on every `data` shard, in a fresh row cache (zeros and the P-tuning prefix:
a prefill sees nothing else of its row), then writes it into its slot in place: no step gathers
the cache. The tokens are the one-device engine's (to float rounding in the logits). With several
processes, each must submit the same requests in the same order (every process runs the loop's
programs); requests without a seed then draw it from a generator seeded alike in every process.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax import placement
from glm_jax.alignment import token_logprobs
from glm_jax.config import GLMConfig
from glm_jax.decoding import BUCKET, bucket_length, sample_rows, seed_keys
from glm_jax.families import default_stop_ids
from glm_jax.generate import (
    GenerationError,
    PromptBatch,
    check_length,
    decode_logits,
    inference_params,
    init_cache,
    make_prompts,
    prefill,
    write_prefix,
)
from glm_jax.peft import METHOD_FIELDS, SIZE_SWITCHES, VALUE_HEAD, PeftConfig, trainable_path
from glm_jax.tokenizer import GLM_IDS, SpecialIds


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at max_queue: retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's decoding: temperature 0 is greedy; seed None draws one from the engine."""

    temperature: float = 0.0  # 0: the argmax
    top_p: float = 1.0  # nucleus mass kept (1: off)
    top_k: int = 0  # the most likely ids kept (0: off)
    seed: int | None = None  # the key of step s is fold_in(key(seed), s)


@dataclasses.dataclass
class Request:
    """One generation request. The callbacks run on the engine thread (on_token sees the stop id
    too); the fields after them are the engine's to fill in."""

    prompt: Sequence[int]  # model-ready ids (`families.py`)
    max_tokens: int  # the most ids to generate, the stop id included
    sampling: Sampling = Sampling()  # temperature / top-p / top-k and the seed
    stop_ids: Sequence[int] = ()  # generation ends at the first of these (`Family.stop_ids`)
    blank: int | None = None  # the mask id to fill (prefix LMs; default the first mask token)
    on_token: Callable[[int], bool] | None = None  # called with each generated id; True ends the request ("stop")
    on_done: Callable[[str, int], None] | None = None  # called once, with (finish_reason, generated)
    logprobs: list[float] | None = None  # a list: each generated id's log-probability is appended (the stop id's too)
    id: int = -1  # the engine's number for it, set by `Engine.submit`
    prompt_batch: PromptBatch | None = None  # the prompt as a one-row PromptBatch, set by `Engine.submit`
    generated: int = 0  # ids generated so far, the stop id included
    finish_reason: str | None = None  # stop / length / cancelled / error, set once when it ends
    submitted: float = 0.0  # time.perf_counter() at `Engine.submit`


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def prefill_row(config: GLMConfig, params, cache, row, tokens, length, causal: bool, mesh=None):
    """Write one context tokens [1, T] (length [1] real ids) into cache row `row`, slots P..P+T-1
    (`generate.prefill` on that row alone). mesh: the cache is sharded there; the row is computed
    in a fresh row cache (zeros and the prefix: prefill sees no other slot of its row), since
    reading a row of a cache split over `data` would gather all of it, and written back in place."""
    if mesh is None:
        row_cache = tuple(
            tuple(jax.lax.dynamic_slice_in_dim(buffer, row, 1, axis=0) for buffer in pair) for pair in cache
        )
    else:
        spec = placement.cache_sharding(config, mesh).spec
        row_sharding = NamedSharding(mesh, P(None, *spec[1:]))  # one row: on every data shard
        row_cache = tuple(tuple(jnp.zeros((1, *buffer.shape[1:]), buffer.dtype) for buffer in pair) for pair in cache)
        row_cache = jax.lax.with_sharding_constraint(row_cache, row_sharding)
        if config.prefix_slots:
            row_cache = write_prefix(config, params, row_cache)
    row_cache = prefill(config, params, row_cache, tokens, length, causal)
    cache = tuple(
        tuple(jax.lax.dynamic_update_slice_in_dim(buffer, written, row, axis=0) for buffer, written in zip(pair, new))
        for pair, new in zip(cache, row_cache)
    )
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, placement.cache_sharding(config, mesh))
    return cache


@functools.partial(jax.jit, static_argnums=(0, 12), donate_argnums=(2,))
def decode_slots(
    config: GLMConfig, params, cache, token, step, lengths, mask_pos, cont, seeds, temperature, top_p, top_k, mesh=None
):
    """Feed token [S] as each slot's generated token number step [S] (0: the start id) at cache
    slot P + lengths + step (`generate.decode_logits`: each row's generated slots follow its own
    context), then sample each slot's next token (`decoding.sample_rows`, slot s drawing with
    fold_in(key(seeds[s]), step[s])). mesh: the cache keeps its sharding, the logits are
    replicated before sampling and so are the sampled ids. -> (next tokens [S], their
    log-probabilities under the raw logits [S] fp32 (temperature 1, unfiltered), cache)."""
    logits, cache = decode_logits(
        config, params, cache, token, step, lengths, mask_pos, cont, config.prefix_slots + lengths
    )
    if mesh is not None:
        logits = jax.lax.with_sharding_constraint(logits, placement.replicated(mesh))
        cache = jax.lax.with_sharding_constraint(cache, placement.cache_sharding(config, mesh))
    next_token = sample_rows(logits, seed_keys(seeds), step, temperature, top_p, top_k)
    if mesh is not None:
        next_token = jax.lax.with_sharding_constraint(next_token, placement.replicated(mesh))
    logprob = token_logprobs(logits[:, None], next_token[:, None])[:, 0]
    return next_token, logprob, cache


class Engine:
    """The slots, their cache and the decode loop. params: float, INT8/INT4 or with adapters
    (whatever `loading.load_model` gives); copied once into `generate.serving_params` layout.
    mesh: a (data, 1, tensor) mesh to serve on (the module docstring: weights placed by
    `placement.place`, slots over `data` and rounded up to a multiple of it, KV heads over
    `tensor`); None: the default device, as without a mesh. consume: the stacked layer weights
    are freed as they are split (`generate.serving_params`), so the model is held once; pass
    params nothing else uses (`LoadedModel.take_params()`)."""

    def __init__(
        self,
        config: GLMConfig,
        params,
        ids: SpecialIds = GLM_IDS,
        causal: bool = False,
        slots: int = 8,
        max_queue: int | None = None,
        cache_dtype=None,
        mesh: jax.sharding.Mesh | None = None,
        consume: bool = False,
    ):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        slots = placement.padded_rows(slots, mesh)
        self.config, self.ids, self.causal, self.slots, self.mesh = config, ids, causal, slots, mesh
        self.max_queue = 4 * slots if max_queue is None else max_queue
        self.params = inference_params(config, params, mesh, consume)
        self.max_len = config.max_sequence_length
        cache_len = bucket_length(config.prefix_slots + self.max_len, multiple=BUCKET)
        cache = init_cache(config, slots, cache_len, cache_dtype, mesh)
        if config.prefix_slots:
            cache = write_prefix(config, self.params, cache)
            if mesh is not None:  # the sharding every later step keeps (a no-op when it is already)
                cache = jax.device_put(cache, placement.cache_sharding(config, mesh))
        self.cache = cache
        # the decode step's inputs, one entry per slot (`decode_slots`), set by `_prefill`
        self.token = np.zeros(slots, np.int32)  # the slot's next input id
        self.step = np.zeros(slots, np.int32)  # its generated token number (0: the start id)
        self.lengths = np.zeros(slots, np.int32)  # the context length
        self.mask_pos = np.zeros(slots, np.int32)  # the mask position (prefix LMs)
        self.cont = np.zeros(slots, bool)  # generated positions continue the count
        self.seeds = np.zeros(slots, np.uint32)  # the request's seed (drawn when it gives none)
        self.temperature = np.zeros(slots, np.float32)  # the request's `Sampling`
        self.top_p = np.ones(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.active: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.cancelled: set[int] = set()
        self.lock = threading.Condition()
        self.ids_counter = itertools.count()
        # several processes run one loop in lockstep: their drawn seeds must agree
        self.seed_rng = np.random.default_rng(0 if jax.process_count() > 1 else None)
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: Exception | None = None
        self.steps_run = 0

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, req: Request) -> PromptBatch:
        """The prompt as a one-row PromptBatch; GenerationError if it has no blank or does not fit."""
        if req.max_tokens < 1:
            raise GenerationError("max_tokens must be at least 1")
        batch = make_prompts([req.prompt], self.config, self.ids, self.causal, req.blank)
        check_length(batch, req.max_tokens, self.config)
        return batch

    def submit(self, req: Request) -> Request:
        """Queue a request (GenerationError if it cannot run, QueueFull past max_queue)."""
        req.prompt_batch = self.validate(req)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(
                    f"the server is at capacity ({self.slots} slots busy, {len(self.waiting)} requests "
                    "waiting); retry later"
                )
            req.id, req.submitted = next(self.ids_counter), time.perf_counter()
            self.waiting.append(req)
            self.lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End a request at the next step (or drop it from the queue); its slot is freed."""
        with self.lock:
            self.cancelled.add(req.id)
            self.lock.notify()

    def load(self) -> dict:
        """slots, active, waiting, max_queue, steps, and the mesh's axis sizes (all 1 without a mesh)."""
        axes = dict(self.mesh.shape) if self.mesh is not None else {"data": 1, "stage": 1, "tensor": 1}
        with self.lock:
            return dict(
                slots=self.slots,
                active=sum(r is not None for r in self.active),
                waiting=len(self.waiting),
                max_queue=self.max_queue,
                steps=self.steps_run,
                mesh={name: int(size) for name, size in axes.items()},
            )

    def set_adapter(self, trainable: dict) -> None:
        """Put new adapter leaves in place of the engine's: `trainable` in the plain stacked layout
        training holds (`peft.split`: LoRA's [L, ...] pairs, a value head, ...), cast to the
        engine's dtypes and, on a mesh, placed by the rules; only these leaves are split per layer
        (a P-tuning prefix is written into the cache again), the base's arrays stay the same
        objects. Only while no request is in flight (RuntimeError otherwise); a tree whose paths
        or shapes are not the engine's adapter's is a GenerationError."""
        new = _matching_adapter(self.config, self.params, trainable)
        if self.mesh is not None:
            new = placement.place(new, self.config, self.mesh)
        with self.lock:
            if any(self.active) or self.waiting:
                raise RuntimeError("set_adapter while requests are in flight: let them finish (or cancel them) first")
            self.params = with_adapter(self.params, new)
            if self.config.prefix_slots:
                self.cache = write_prefix(self.config, self.params, self.cache)
                if self.mesh is not None:
                    self.cache = jax.device_put(self.cache, placement.cache_sharding(self.config, self.mesh))

    # ---- the loop ----------------------------------------------------------------------------
    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="glm-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop: let requests in flight finish for up to drain_s seconds, cancel the rest, join."""
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and (any(self.active) or self.waiting):
            time.sleep(0.02)
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        for req in [active for active in self.active if active is not None] + list(self.waiting):
            self._finish(req, "cancelled")
        self.waiting.clear()
        self.active = [None] * self.slots

    def warmup(self) -> None:
        """Compile the decode step and the smallest prefill bucket before serving (no thread yet)."""
        done = threading.Event()
        req = Request([self.ids.gmask, self.ids.sop], 2, on_done=lambda *_: done.set())
        self.submit(req)
        while not done.is_set():
            self._tick(block=False)

    def _loop(self):
        try:
            while self._tick(block=True):
                pass
        except Exception as e:  # a device error: end everything in flight instead of hanging clients
            for req in [active for active in self.active if active is not None] + list(self.waiting):
                self._finish(req, "error")
            self.error = e
            raise

    def _tick(self, block: bool) -> bool:
        """Admit queued requests into free slots, run one decode step. False when stopped."""
        with self.lock:
            while block and self.running and not self.waiting and not any(self.active):
                self.lock.wait()
            if block and not self.running:
                return False
            admitted = self._admit()
        for row, req in admitted:
            self._prefill(row, req)
        if not any(self.active):
            return True
        next_token, logprob, self.cache = decode_slots(
            self.config,
            self.params,
            self.cache,
            self.token,
            self.step,
            self.lengths,
            self.mask_pos,
            self.cont,
            self.seeds,
            self.temperature,
            self.top_p,
            self.top_k,
            self.mesh,
        )
        next_token, logprob = np.asarray(next_token), np.asarray(logprob)
        self.steps_run += 1
        with self.lock:
            self._advance(next_token, logprob)
        return True

    def _admit(self) -> list[tuple[int, Request]]:
        """(Under the lock.) End the cancelled requests, then move queued ones into free slots.
        -> (slot, request) pairs to prefill."""
        cancelled, self.cancelled = self.cancelled, set()
        for row, req in enumerate(self.active):
            if req is not None and req.id in cancelled:
                self._finish(req, "cancelled")
                self.active[row] = None
        kept = collections.deque()
        for req in self.waiting:
            (self._finish(req, "cancelled") if req.id in cancelled else kept.append(req))
        self.waiting = kept
        admitted = []
        for row in range(self.slots):
            if self.active[row] is None and self.waiting:
                self.active[row] = self.waiting.popleft()
                admitted.append((row, self.active[row]))
        return admitted

    def _advance(self, next_token: np.ndarray, logprob: np.ndarray) -> None:
        """(Under the lock.) Hand each active request its next id [slots] (and its log-probability
        [slots], to a request that keeps them); end those that stop or reach max_tokens (freeing
        their slots), feed the rest their id at the next step."""
        for row, req in enumerate(self.active):
            if req is None:
                continue
            token = int(next_token[row])
            req.generated += 1
            if req.logprobs is not None:
                req.logprobs.append(float(logprob[row]))
            stop = token in req.stop_ids
            try:
                if req.on_token is not None and req.on_token(token):
                    stop = True
            except Exception:  # a broken consumer ends its own request, not the engine
                self._finish(req, "error")
                self.active[row] = None
                continue
            if stop or req.generated >= req.max_tokens:
                self._finish(req, "stop" if stop else "length")
                self.active[row] = None
            else:
                self.token[row], self.step[row] = token, self.step[row] + 1

    def _prefill(self, row: int, req: Request):
        """Write the request's context into its slot's cache row, padded to `bucket_length`, and set
        the slot's decode inputs."""
        batch, sampling = req.prompt_batch, req.sampling
        length = int(batch.lengths[0])
        tokens = np.full((1, bucket_length(length, self.max_len)), self.ids.pad, np.int32)
        tokens[0, :length] = batch.tokens[0, :length]
        self.cache = prefill_row(
            self.config, self.params, self.cache, np.int32(row), tokens, batch.lengths, self.causal, self.mesh
        )
        seed = sampling.seed if sampling.seed is not None else int(self.seed_rng.integers(2**32))
        self.token[row], self.step[row], self.lengths[row] = batch.start[0], 0, length
        self.mask_pos[row], self.cont[row] = batch.mask_pos[0], batch.continue_positions[0]
        self.seeds[row] = seed % 2**32
        self.temperature[row], self.top_p[row], self.top_k[row] = sampling.temperature, sampling.top_p, sampling.top_k

    def _finish(self, req: Request, reason: str):
        if req.finish_reason is None:
            req.finish_reason = reason
            if req.on_done is not None:
                req.on_done(reason, req.generated)


def _flat_serving(params: dict) -> dict:
    """Serving-layout params -> {plain stacked path: leaf}, a layer leaf by its layer 0's array."""
    flat = traverse_util.flatten_dict({key: value for key, value in params.items() if key != "layers"})
    flat.update({("layers", *path): leaf for path, leaf in traverse_util.flatten_dict(params["layers"][0]).items()})
    return flat


def adapter_paths(config: GLMConfig, params: dict) -> set[tuple]:
    """The paths (plain stacked form) of the adapter leaves of serving-layout params: the leaves
    the adapter methods switched on in `config` train (`peft.trainable_path`), and a value head."""
    on = [
        PeftConfig(method)
        for method, fields in METHOD_FIELDS.items()
        if any(getattr(config, name) for name in set(fields) & set(SIZE_SWITCHES))
    ]
    return {
        path
        for path in _flat_serving(params)
        if path[0] == VALUE_HEAD or any(trainable_path(path, peft) for peft in on)
    }


def _matching_adapter(config: GLMConfig, params: dict, trainable: dict) -> dict:
    """`trainable` cast to the dtypes of the adapter leaves it replaces in serving-layout params;
    GenerationError when its paths or shapes are not theirs."""
    current, flat = _flat_serving(params), traverse_util.flatten_dict(trainable)
    want = adapter_paths(config, params)
    if set(flat) != want:
        name = lambda paths: sorted("/".join(map(str, p)) for p in paths)  # noqa: E731
        raise GenerationError(
            f"the adapter's leaves {name(flat)} are not the engine's {name(want)}: pass the tree of the "
            "adapter the engine was built with (plain stacked layout, `peft.split`)"
        )
    out = {}
    for path, leaf in flat.items():
        shape = current[path].shape if path[0] != "layers" else (config.num_layers, *current[path].shape)
        if tuple(leaf.shape) != tuple(shape):
            raise GenerationError(
                f"adapter leaf {'/'.join(path)} has shape {tuple(leaf.shape)}; the engine's is {tuple(shape)}"
            )
        out[path] = jnp.asarray(leaf, current[path].dtype)
    return traverse_util.unflatten_dict(out)


def with_adapter(params: dict, adapter: dict) -> dict:
    """Weights in the `generate.serving_params` layout with an adapter's leaves put in (added or
    replaced), every other leaf params' own array (nothing copied). adapter: the plain stacked
    layout (`peft.split`'s trainable tree): a leaf under "layers" [L, ...] is split into its L
    layers, any other goes to its path. Traceable: under jit the split is part of the program."""
    outer = traverse_util.flatten_dict({key: value for key, value in params.items() if key != "layers"})
    layers = [traverse_util.flatten_dict(layer) for layer in params["layers"]]
    for path, leaf in traverse_util.flatten_dict(adapter).items():
        if path[0] == "layers":
            for i, layer in enumerate(layers):
                layer[path[1:]] = leaf[i]
        else:
            outer[path] = leaf
    unflat = lambda flat: traverse_util.unflatten_dict(flat) if flat else {}  # noqa: E731
    return {**unflat(outer), "layers": tuple(unflat(layer) for layer in layers)}


class EngineGenerator:
    """`generate.Generator.generate` on the engine (blocking; many threads may call it at once),
    so `generate.fill_blanks` fills a completion's blanks through the shared slots. A key's
    place is taken by `seed` (each blank its own: seed + blank number)."""

    def __init__(self, engine: Engine, seed: int | None = None):
        self.engine, self.ids, self.causal, self.seed = engine, engine.ids, engine.causal, seed
        self.generated, self.reasons = 0, []  # tokens generated (stop ids included), each call's finish_reason

    def generate(
        self,
        prompts,
        max_new_tokens,
        *,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        key=None,
        stop_tokens=None,
        blank=None,
        on_token=None,
    ):
        del key, on_token
        stop = tuple(stop_tokens) if stop_tokens is not None else default_stop_ids(self.ids)
        out = []
        for prompt in prompts:
            seed = None if self.seed is None else self.seed + len(self.reasons)
            req = Request(prompt, max_new_tokens, Sampling(temperature, top_p, top_k, seed), stop, blank)
            ids, reason = run(self.engine, req)
            self.generated += req.generated
            self.reasons.append(reason)
            out.append(ids)
        return out


def run(engine: Engine, req: Request, timeout: float | None = None) -> tuple[list[int], str]:
    """Submit and wait -> (generated ids without the stop id, finish_reason)."""
    out, done = [], threading.Event()
    stop = set(req.stop_ids)
    user = req.on_token

    def on_token(token):
        if token not in stop:
            out.append(token)
        return bool(user(token)) if user is not None else False

    req.on_token, req.on_done = on_token, lambda reason, n: done.set()
    engine.submit(req)
    if not done.wait(timeout):
        engine.cancel(req)
        done.wait()
    return out, req.finish_reason
