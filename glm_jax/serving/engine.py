"""Continuous batching over one shared KV cache: a fixed number of decode slots, one compiled step.

    engine = Engine(config, params, ids=tok.specials, causal=fam.causal, slots=8, max_queue=32)
    engine.start()                                     # the decode loop, on its own thread
    handle = engine.submit(Request(prompt_ids, max_tokens=64, sampling=Sampling(0.8, seed=1),
                                   stop_ids=fam.stop_ids(tok), on_token=..., on_done=...))
    engine.cancel(handle)                              # frees its slot at the next step
    engine.stop()                                      # cancels what is left, joins the thread

The cache is `generate.init_cache(config, slots, M)` with M the padded length limit (plus a
P-tuning prefix, written once into slots 0..P-1 of every row). A request is prefilled alone, its
context right-padded to a power-of-two bucket (>= 16, so few shapes compile), into its row's
cache slots P..; its first decoded input is the prompt's start id (sop, or a causal prompt's last
id). ONE compiled step then feeds every slot's current token at its own cache slot P + length +
step and position (`generate.decode_step`'s rules, per row), and samples the next token on device
with per-slot temperature / top-p / top-k arrays: temperature 0 is the argmax, otherwise the
randomness of step s comes from fold_in(key(seed), s) alone. A row sees only its own context and
generated slots, so a request's tokens depend only on its prompt and settings, never on what
shares the batch. A slot is freed the step its request ends (a stop id, max_tokens, the length
limit, `on_token` asking to stop, or cancellation) and the next queued request takes it.
No HTTP in here (`serving/api.py` is the server).
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

from glm_jax.config import GLMConfig
from glm_jax.generate import (
    GenerationError,
    _round_up,
    cache_length,
    cached_forward,
    check_length,
    init_cache,
    make_prompts,
    prefill,
    serving_params,
    write_prefix,
)
from glm_jax.tokenizer import GLM_IDS, SpecialIds

MIN_BUCKET = 16


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at max_queue: retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's decoding: temperature 0 is greedy; seed None draws one from the engine."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclasses.dataclass
class Request:
    """prompt: model-ready ids (`families.py`); blank: the mask id to fill (prefix LMs; default the
    first mask token). on_token(id) is called on the engine thread for every generated id (the
    stop id included) and returns True to end the request there ("stop"); on_done(finish_reason,
    n_generated) once, finish_reason in stop / length / cancelled / error."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_ids: Sequence[int] = ()
    blank: int | None = None
    on_token: Callable[[int], bool] | None = None
    on_done: Callable[[str, int], None] | None = None
    # filled in by the engine
    id: int = -1
    generated: int = 0
    finish_reason: str | None = None
    submitted: float = 0.0


def bucket(n: int, limit: int) -> int:
    """The padded context length: the next power of two >= n (at least MIN_BUCKET, at most limit)."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), limit)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def prefill_row(config: GLMConfig, params, cache, row, tokens, length, causal: bool):
    """Write one context tokens [1, T] (length [1] real ids) into cache row `row`, slots P..P+T-1."""
    mine = tuple(tuple(jax.lax.dynamic_slice_in_dim(c, row, 1, axis=0) for c in pair) for pair in cache)
    mine = prefill(config, params, mine, tokens, length, causal)
    return tuple(
        tuple(jax.lax.dynamic_update_slice_in_dim(c, m, row, axis=0) for c, m in zip(pair, new))
        for pair, new in zip(cache, mine)
    )


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
    found by bisection: O(V) passes instead of a vocabulary sort, which dominates a CPU step. Keeps
    the ids whose logit is at least the k-th largest and whose probability is at least that of the
    last id of the smallest set holding top_p of the mass (ids tied with it stay together)."""
    k = jnp.minimum(top_k, scaled.shape[-1])[:, None]
    hi, lo = scaled.max(-1), jnp.min(jnp.where(jnp.isfinite(scaled), scaled, jnp.inf), -1)
    kth = _largest_passing(lo, hi, lambda t: (scaled >= t[:, None]).sum(-1) >= k[:, 0])
    scaled = jnp.where((k > 0) & (scaled < kth[:, None]), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    mass = lambda t: jnp.where(probs >= t[:, None], probs, 0.0).sum(-1) >= top_p  # noqa: E731
    cut = _largest_passing(jnp.zeros_like(top_p), probs.max(-1), mass)
    return jnp.where((top_p < 1)[:, None] & (probs < cut[:, None]), -jnp.inf, scaled)


def sample_rows(logits, seeds, steps, temperature, top_p, top_k):
    """Per-row sampling of logits [S, V] (fp32) -> [S] int32. temperature / top_p [S] float,
    top_k [S] int (0: off), the key of row s fold_in(key(seeds[s]), steps[s]); temperature 0: argmax.
    Filtering runs only on a step where some sampled row filters (top-p < 1 or top-k); a row that
    does not filter is unchanged by it, so its tokens never depend on its neighbours."""
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sampling = temperature > 0
    filtered = jax.lax.cond(
        jnp.any(sampling & ((top_p < 1) | (top_k > 0))), lambda x: filter_logits(x, top_p, top_k), lambda x: x, scaled
    )
    draw = jax.vmap(lambda lg, seed, step: jax.random.categorical(jax.random.fold_in(jax.random.key(seed), step), lg))
    sampled = jax.lax.cond(
        jnp.any(sampling),
        lambda x: draw(x, seeds, steps).astype(jnp.int32),
        lambda x: jnp.zeros(x.shape[0], jnp.int32),
        filtered,
    )
    return jnp.where(sampling, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def decode_slots(
    config: GLMConfig, params, cache, token, step, lengths, mask_pos, cont, seeds, temperature, top_p, top_k
):
    """Feed token [S] as each slot's generated token number step [S] (0: the start id) at cache
    slot P + lengths + step; positions as `generate.decode_step`. -> (next tokens [S], cache)."""
    p = config.pre_seq_len
    slot = p + lengths + step
    position = jnp.where(cont, lengths + step, mask_pos)[:, None]
    block = (step + 1)[:, None] if config.position_encoding_2d else jnp.zeros_like(position)
    visible = jnp.arange(cache_length(cache))[None, :] <= slot[:, None]  # prefix, context, generated so far
    logits, cache = cached_forward(
        config, params, token[:, None], position, block, visible[:, None, None, :], cache, slot
    )
    logits = logits[:, 0, : config.vocab_size].astype(jnp.float32)
    return sample_rows(logits, seeds, step, temperature, top_p, top_k), cache


class Engine:
    """The slots, their cache and the decode loop. params: float, INT8/INT4 or with adapters
    (whatever `loading.load_model` gives); copied once into `generate.serving_params` layout."""

    def __init__(
        self,
        config: GLMConfig,
        params,
        ids: SpecialIds = GLM_IDS,
        causal: bool = False,
        slots: int = 8,
        max_queue: int | None = None,
        cache_dtype=None,
    ):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.config, self.ids, self.causal, self.slots = config, ids, causal, slots
        self.max_queue = 4 * slots if max_queue is None else max_queue
        self.params = serving_params(params, config.num_layers)
        self.max_len = config.max_sequence_length
        cache = init_cache(config, slots, _round_up(config.pre_seq_len + self.max_len), cache_dtype)
        if config.pre_seq_len:
            cache = write_prefix(config, self.params, cache)
        self.cache = cache
        z = lambda dt=np.int32: np.zeros(slots, dt)  # noqa: E731
        self.token, self.step, self.lengths, self.mask_pos = z(), z(), z(), z()
        self.cont, self.seeds = z(bool), z(np.uint32)
        self.temperature, self.top_p, self.top_k = z(np.float32), np.ones(slots, np.float32), z()
        self.active: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.cancelled: set[int] = set()
        self.lock = threading.Condition()
        self.ids_counter = itertools.count()
        self.seed_rng = np.random.default_rng()
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: Exception | None = None
        self.steps_run = 0

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, req: Request):
        """The prompt as a one-row PromptBatch; GenerationError if it has no blank or does not fit."""
        if req.max_tokens < 1:
            raise GenerationError("max_tokens must be at least 1")
        batch = make_prompts([req.prompt], self.config, self.ids, self.causal, req.blank)
        check_length(batch, req.max_tokens, self.config)
        return batch

    def submit(self, req: Request) -> Request:
        """Queue a request (GenerationError if it cannot run, QueueFull past max_queue)."""
        req._batch = self.validate(req)
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
        with self.lock:
            return dict(
                slots=self.slots,
                active=sum(r is not None for r in self.active),
                waiting=len(self.waiting),
                max_queue=self.max_queue,
                steps=self.steps_run,
            )

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
        for req in [r for r in self.active if r is not None] + list(self.waiting):
            self._finish(req, "cancelled")
        self.waiting.clear()
        self.active = [None] * self.slots

    def warmup(self) -> None:
        """Compile the decode step and the smallest prefill bucket before serving (no thread yet)."""
        done = threading.Event()
        req = Request([self.ids.gmask, self.ids.sop], 2, on_done=lambda *a: done.set())
        self.submit(req)
        while not done.is_set():
            self._tick(block=False)

    def _loop(self):
        try:
            while self._tick(block=True):
                pass
        except Exception as e:  # a device error: end everything in flight instead of hanging clients
            for req in [r for r in self.active if r is not None] + list(self.waiting):
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
            cancelled, self.cancelled = self.cancelled, set()
            admit = []
            for i in range(self.slots):
                if self.active[i] is not None and self.active[i].id in cancelled:
                    self._finish(self.active[i], "cancelled")
                    self.active[i] = None
            kept = collections.deque()
            for req in self.waiting:
                (self._finish(req, "cancelled") if req.id in cancelled else kept.append(req))
            self.waiting = kept
            for i in range(self.slots):
                if self.active[i] is None and self.waiting:
                    req = self.waiting.popleft()
                    self.active[i] = req
                    admit.append((i, req))
        for i, req in admit:
            self._prefill(i, req)
        if not any(self.active):
            return True
        next_token, self.cache = decode_slots(
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
        )
        next_token = np.asarray(next_token)
        self.steps_run += 1
        with self.lock:
            for i, req in enumerate(self.active):
                if req is None:
                    continue
                t = int(next_token[i])
                req.generated += 1
                stop = t in req.stop_ids
                try:
                    if req.on_token is not None and req.on_token(t):
                        stop = True
                except Exception:  # a broken consumer ends its own request, not the engine
                    self._finish(req, "error")
                    self.active[i] = None
                    continue
                if stop or req.generated >= req.max_tokens:
                    self._finish(req, "stop" if stop else "length")
                    self.active[i] = None
                else:
                    self.token[i], self.step[i] = t, self.step[i] + 1
        return True

    def _prefill(self, i: int, req: Request):
        b = req._batch
        n = int(b.lengths[0])
        t = bucket(n, self.max_len)
        tokens = np.full((1, t), self.ids.pad, np.int32)
        tokens[0, :n] = b.tokens[0, :n]
        self.cache = prefill_row(self.config, self.params, self.cache, jnp.int32(i), tokens, b.lengths, self.causal)
        s = req.sampling
        seed = s.seed if s.seed is not None else int(self.seed_rng.integers(2**32))
        self.token[i], self.step[i], self.lengths[i] = b.start[0], 0, n
        self.mask_pos[i], self.cont[i], self.seeds[i] = b.mask_pos[0], b.continue_positions[0], seed % 2**32
        self.temperature[i], self.top_p[i], self.top_k[i] = s.temperature, s.top_p, s.top_k

    def _finish(self, req: Request, reason: str):
        if req.finish_reason is None:
            req.finish_reason = reason
            if req.on_done is not None:
                req.on_done(reason, req.generated)


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
        stop = tuple(stop_tokens) if stop_tokens is not None else (self.ids.eop, self.ids.eos)
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

    def on_token(t):
        if t not in stop:
            out.append(t)
        return bool(user(t)) if user is not None else False

    req.on_token, req.on_done = on_token, lambda reason, n: done.set()
    engine.submit(req)
    if not done.wait(timeout):
        engine.cancel(req)
        done.wait()
    return out, req.finish_reason
