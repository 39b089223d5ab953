"""Generation: cached decoding equals full recomputation; greedy, beam and sampling behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward

from glm_jax.config import get_config
from glm_jax.decoding import sample
from glm_jax.generate import Generator, make_prompts
from glm_jax.model import init_params
from glm_jax.tokenizer import EOP, EOS, GMASK, MASK, SOP

PROMPTS = [
    [11, 12, 13, 14, 15, 16, GMASK],  # continue a text
    [21, 22, GMASK],  # a short one: ragged batch
    [31, 32, MASK, 33, 34, 35],
]  # fill a blank in the middle


@pytest.fixture(scope="module", params=[False, True], ids=["1d", "2d"])
def model(request):
    c = get_config("glm-tiny", dtype="float32", num_layers=2, vocab_size=256, position_encoding_2d=request.param)
    return c, init_params(c, jax.random.key(3))


def full_logits(c, params, prompt, generated):
    """The last position's logits from a full forward over prompt + sop + generated (no cache)."""
    batch = make_prompts([prompt], c)
    n, mp, cont = len(prompt), int(batch.mask_pos[0]), bool(batch.continue_positions[0])
    k = len(generated) + 1
    tokens = list(prompt) + [SOP] + list(generated)
    pos = list(range(n)) + (list(range(n, n + k)) if cont else [mp] * k)
    block = [0] * n + (list(range(1, k + 1)) if c.position_encoding_2d else [0] * k)
    pad = [0] * (PADDED - n - k)  # one shape for every call: one compile
    b = dict(
        tokens=[tokens + pad],
        position_ids=[pos + pad],
        block_position_ids=[block + pad],
        segment_ids=[[1] * (n + k) + pad],
        prefix_mask=[[1] * n + [0] * k + pad],
    )
    b = {key: jnp.asarray(v, jnp.int32) for key, v in b.items()}
    return np.asarray(forward(c, params, b)[0, n + k - 1], np.float64)


PADDED = 16


def assert_cached_decoding_is_full_recomputation(c, params, prompts, steps):
    """Greedy cached decoding of `prompts`: at every step each row's logits equal a full forward's."""
    gen = Generator(c, params)
    state = gen.start(make_prompts(prompts, c), max_new_tokens=steps)
    token = np.full(len(prompts), SOP, np.int32)
    generated = [[] for _ in prompts]
    for step in range(steps):
        logits = np.asarray(gen.step(state, token, step))
        for i, prompt in enumerate(prompts):
            np.testing.assert_allclose(logits[i], full_logits(c, params, prompt, generated[i]), atol=1e-5, rtol=1e-5)
        token = logits.argmax(-1).astype(np.int32)
        for i in range(len(prompts)):
            generated[i].append(int(token[i]))


def test_cached_decoding_equals_full_recomputation(model):
    assert_cached_decoding_is_full_recomputation(*model, PROMPTS, 5)


def test_greedy_is_repeated_argmax_and_beam_1_is_greedy(model):
    c, params = model
    gen = Generator(c, params)
    outs = gen.generate(PROMPTS, 4, stop_tokens=())
    for prompt, out in zip(PROMPTS, outs):
        want = []
        for _ in range(4):
            want.append(int(full_logits(c, params, prompt, want).argmax()))
        assert out == want
        ((beam, _),) = gen.beam_search(prompt, 1, 4, stop_tokens=())
        assert beam == want


def test_beam_search_finds_the_best_sequence_of_a_small_space(model):
    c, params = model
    gen = Generator(c, params)
    prompt = PROMPTS[0]
    (tokens, score), *rest = gen.beam_search(prompt, 4, 2, stop_tokens=())  # no stop: every open beam joins
    assert len(rest) == 3 and all(s <= score for _, s in rest)
    # brute force over the top candidates of the first token: no 2-token sequence beats it
    first = jax.nn.log_softmax(full_logits(c, params, prompt, []))
    best, best_seq = -np.inf, None
    for t in np.argsort(-np.asarray(first))[:8]:
        second = jax.nn.log_softmax(full_logits(c, params, prompt, [int(t)]))
        if float(first[t]) + float(np.max(second)) > best:
            best, best_seq = float(first[t]) + float(np.max(second)), [int(t), int(np.argmax(second))]
    length = len(prompt) + 1 + 2  # context, sop and the two new tokens: the reference's penalty
    assert tokens == best_seq and score == pytest.approx(best / ((5 + length) / 6), abs=1e-4)


def test_banned_ids_are_never_chosen(model):
    c, params = model
    gen = Generator(c, params)
    greedy_first = gen.generate([PROMPTS[0]], 1, stop_tokens=())[0][0]
    for tokens, _ in gen.beam_search(PROMPTS[0], 3, 2, banned_ids=[greedy_first], stop_tokens=()):
        assert greedy_first not in tokens


def test_sampling_is_reproducible_and_respects_top_k():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    a = sample(logits, jax.random.key(1), 1.0, 5, 1.0)
    b = sample(logits, jax.random.key(1), 1.0, 5, 1.0)
    np.testing.assert_array_equal(a, b)
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for _ in range(20):
        s = np.asarray(sample(logits, jax.random.key(_), 1.0, 5, 1.0))
        assert all(s[i] in top5[i] for i in range(4))
    top_p = np.asarray(sample(logits, jax.random.key(2), 1.0, 0, 1e-6))  # nucleus of one: argmax
    np.testing.assert_array_equal(top_p, np.asarray(logits).argmax(-1))


def test_generation_stops_at_eop_or_eos(model):
    c, params = model
    gen = Generator(c, params)
    free = gen.generate([PROMPTS[1]], 6, stop_tokens=())[0]
    stop = free[2]
    cut = gen.generate([PROMPTS[1]], 6, stop_tokens=(stop,))[0]
    assert cut == free[: free.index(stop)]
    assert EOP in (EOP, EOS)


def test_prompt_without_a_mask_token_is_a_clear_error(model):
    c, _ = model
    with pytest.raises(ValueError, match="holds no"):
        make_prompts([[10, 11, 12]], c)


def test_generation_on_a_tensor_sharded_model(model):
    """Parameters placed by the sharding rules on a 1x4 (tensor) mesh generate what one device does."""
    from glm_jax import sharding as sh
    from glm_jax.model import abstract_params

    c, params = model
    mesh = sh.make_mesh("1x4", jax.devices()[:4])
    shardings = sh.named_shardings(abstract_params(c), mesh, sh.rules_for(c, mesh))
    placed = jax.device_put(params, shardings)
    assert placed["layers"]["attention"]["query"]["kernel"].sharding.spec[2] == "tensor"
    want = Generator(c, params).generate(PROMPTS, 4, stop_tokens=())
    assert Generator(c, placed).generate(PROMPTS, 4, stop_tokens=()) == want


def test_decode_step_updates_the_cache_in_place_on_per_layer_weights(model):
    """The serving layout: one weight tree and one (k, v) pair per layer, and a decode step whose
    donated cache is aliased to its output (updated in place, not copied)."""
    from glm_jax.generate import decode_step, init_cache, serving_params

    c, params = model
    served = serving_params(params, c.num_layers)
    assert serving_params(served, c.num_layers) is served
    np.testing.assert_array_equal(
        served["layers"][1]["attention"]["query"]["kernel"], params["layers"]["attention"]["query"]["kernel"][1]
    )
    cache = init_cache(c, 2, 32)
    assert len(cache) == c.num_layers and cache[0][0].shape == (2, 32, c.num_kv_heads, c.head_dim)
    b = jnp.zeros((2,), jnp.int32)
    compiled = decode_step.lower(c, served, cache, b, jnp.int32(0), b + 3, b, b > 0, jnp.int32(16)).compile()
    cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert compiled.memory_analysis().alias_size_in_bytes == cache_bytes


def test_prompt_past_the_trained_length_is_a_clear_error(model):
    from glm_jax.generate import GenerationError

    c, params = model
    short = c.override(max_sequence_length=12)
    gen = Generator(short, params)
    gen.generate([PROMPTS[0]], 4)  # 7 + sop + 4 = 12 fits exactly
    with pytest.raises(GenerationError, match=r"prompt of 8 tokens plus 5 new tokens exceeds max_sequence_length=12"):
        gen.generate([PROMPTS[0]], 5)


def test_prompt_ending_with_sop_is_the_same_prompt(model):
    c, params = model
    gen = Generator(c, params)
    assert gen.generate([PROMPTS[0] + [SOP]], 4, stop_tokens=()) == gen.generate([PROMPTS[0]], 4, stop_tokens=())


def test_fill_blanks_in_order_writes_each_answer_back(model):
    from glm_jax.generate import fill_blanks

    c, params = model
    gen = Generator(c, params)
    prompt = [31, MASK, 33, GMASK, 34, MASK, 35]  # [MASK] is the kind: the [gMASK] stays
    filled, blanks = fill_blanks(gen, prompt + [SOP], 3, stop_tokens=())
    assert len(blanks) == 2 and all(len(b) == 3 for b in blanks)
    first = gen.generate([prompt], 3, stop_tokens=())[0]  # the first [MASK] of the prompt
    assert blanks[0] == first
    after_first = [31] + first + [33, GMASK, 34, MASK, 35]
    assert blanks[1] == gen.generate([after_first], 3, stop_tokens=(), blank=MASK)[0]
    assert filled == [31] + blanks[0] + [33, GMASK, 34] + blanks[1] + [35]
