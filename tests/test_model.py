"""The GLM model: mask semantics end to end, embedding gradient shrink, dropout, remat, axes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward

from glm_jax.config import get_config
from glm_jax.model import GLM, init_params

S = 10
SMALL = dict(num_layers=2, vocab_size=512)  # glm-tiny, cut further so each test compiles in seconds
# one packed row: segment 1 = part A [0..3], part B [4..6]; segment 2 = part A [7, 8]; [9] padding
SEG = [1, 1, 1, 1, 1, 1, 1, 2, 2, 0]
PREFIX = [1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
PART_A1, PART_B1, SEG2, PAD = range(0, 4), range(4, 7), range(7, 9), 9


@pytest.fixture(scope="module")
def tiny():
    c = get_config("glm-tiny", dtype="float32", hidden_dropout=0.0, attention_dropout=0.0, **SMALL)
    params = init_params(c, jax.random.key(0))
    apply = jax.jit(lambda p, b: GLM(c).apply({"params": p}, b))
    return c, params, apply


def _batch(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    return dict(
        tokens=tokens,
        position_ids=jnp.arange(S, dtype=jnp.int32)[None],
        block_position_ids=jnp.zeros((1, S), jnp.int32),
        segment_ids=jnp.asarray([SEG], jnp.int32),
        prefix_mask=jnp.asarray([PREFIX], jnp.int32),
    )


def _changed(apply, params, pos):
    """Which positions' logits change when token `pos` changes."""
    base = np.arange(10, 10 + S)
    other = base.copy()
    other[pos] = 300
    a, b = apply(params, _batch(base)), apply(params, _batch(other))
    return np.abs(np.asarray(a - b)).max(-1)[0] > 1e-6


def test_part_b_does_not_see_later_tokens(tiny):
    _, params, apply = tiny
    for pos in PART_B1:
        changed = _changed(apply, params, pos)
        assert not changed[[q for q in PART_B1 if q < pos]].any(), pos
        assert not changed[list(PART_A1)].any()  # part A never sees part B
        assert changed[pos]


def test_part_a_is_bidirectional(tiny):
    _, params, apply = tiny
    for pos in PART_A1:
        changed = _changed(apply, params, pos)
        assert changed[list(PART_A1)].all(), pos  # every part-A position sees every part-A token
        assert changed[list(PART_B1)].all()  # and part B sees all of part A


def test_packed_segments_and_padding_are_isolated(tiny):
    _, params, apply = tiny
    for pos in list(PART_A1) + list(PART_B1):
        assert not _changed(apply, params, pos)[list(SEG2)].any()
    for pos in SEG2:
        assert not _changed(apply, params, pos)[: SEG2.start].any()
    assert not _changed(apply, params, PAD)[:PAD].any()


def test_logits_shape_and_bf16_default():
    c = get_config("glm-tiny", **SMALL)
    params = init_params(c, jax.random.key(0))
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    logits = forward(c, params, _batch(np.arange(S)))
    assert logits.shape == (1, S, c.vocab_size) and logits.dtype == jnp.bfloat16


def test_every_parameter_has_logical_axes():
    c = get_config("glm-tiny", **SMALL)
    boxed = GLM(c).init(jax.random.key(0), _batch(np.arange(S)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    names = {
        jax.tree_util.keystr(k): v.names
        for k, v in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    }
    assert names["['layers']['attention']['query']['kernel']"] == ("layers", "embed", "heads", "head_dim")
    assert names["['layers']['mlp']['dense_h_to_4h']['kernel']"] == ("layers", "embed", "glu", "mlp")
    assert names["['word_embeddings']['embedding']"] == ("vocab", "embed")


def test_deepnorm_init_scales_ffn_value_and_output_weights():
    c = get_config("glm-tiny", num_layers=8, hidden_size=256, num_attention_heads=4, vocab_size=512)
    layers = init_params(c, jax.random.key(0))["layers"]
    beta = (2 * 8) ** -0.5
    xavier = lambda fan_in, fan_out: np.sqrt(2.0 / (fan_in + fan_out))
    std = lambda x: float(np.std(np.asarray(x)))
    assert std(layers["attention"]["query"]["kernel"]) == pytest.approx(xavier(256, 256), rel=0.05)
    assert std(layers["attention"]["value"]["kernel"]) == pytest.approx(beta * xavier(256, 256), rel=0.05)
    assert std(layers["attention"]["dense"]["kernel"]) == pytest.approx(beta * xavier(256, 256), rel=0.05)
    f = c.inner_hidden_size
    assert std(layers["mlp"]["dense_h_to_4h"]["kernel"]) == pytest.approx(beta * xavier(256, 2 * f), rel=0.05)
    assert not np.asarray(layers["attention"]["query"]["bias"]).any()


# ---- embedding gradient shrink ------------------------------------------------------------------
@functools.cache
def _sum_sq_grad(c):
    """jitted d/dparams sum(logits^2), alpha traced so one compile serves every alpha."""

    def loss(p, batch, alpha):
        return jnp.sum(GLM(c).apply({"params": p}, batch, embedding_alpha=alpha) ** 2)

    return jax.jit(jax.grad(loss))


def _embedding_grad(c, params, alpha):
    grads = _sum_sq_grad(c)(params, _batch(np.arange(10, 10 + S)), jnp.float32(alpha))
    return np.asarray(grads["word_embeddings"]["embedding"], np.float64)


def test_embedding_shrink_scales_only_the_lookup_gradient():
    c = get_config("glm-tiny", dtype="float32", tie_word_embeddings=False, **SMALL)
    params = init_params(c, jax.random.key(0))
    whole, shrunk = _embedding_grad(c, params, 1.0), _embedding_grad(c, params, 0.1)
    assert np.abs(whole).max() > 0
    np.testing.assert_allclose(shrunk, 0.1 * whole, rtol=1e-6, atol=1e-12)
    batch = _batch(np.arange(10, 10 + S))
    np.testing.assert_array_equal(
        GLM(c).apply({"params": params}, batch, embedding_alpha=0.1),
        GLM(c).apply({"params": params}, batch, embedding_alpha=1.0),
    )


def test_tied_head_gradient_is_left_whole():
    c = get_config("glm-tiny", dtype="float32", **SMALL)
    params = init_params(c, jax.random.key(0))
    output_side = _embedding_grad(c, params, 0.0)  # the lookup contributes nothing at alpha 0
    lookup_side = _embedding_grad(c, params, 1.0) - output_side
    np.testing.assert_allclose(_embedding_grad(c, params, 0.1), output_side + 0.1 * lookup_side, rtol=1e-4, atol=1e-7)
    assert np.abs(output_side).max() > 0 and np.abs(lookup_side).max() > 0


# ---- dropout and remat --------------------------------------------------------------------------
def test_dropout_only_with_a_dropout_rng():
    c = get_config("glm-tiny", dtype="float32", hidden_dropout=0.1, attention_dropout=0.1, **SMALL)
    params = init_params(c, jax.random.key(0))
    batch = _batch(np.arange(S))
    evaluate = jax.jit(lambda p: GLM(c).apply({"params": p}, batch))
    train = jax.jit(lambda p, key: GLM(c).apply({"params": p}, batch, rngs={"dropout": key}))
    a = evaluate(params)
    np.testing.assert_array_equal(a, evaluate(params))
    b, b2 = train(params, jax.random.key(1)), train(params, jax.random.key(1))
    np.testing.assert_array_equal(b, b2)
    assert not np.allclose(a, b)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
    c = get_config("glm-tiny", dtype="float32", **SMALL)
    params = init_params(c, jax.random.key(0))
    batch = _batch(np.arange(S))
    plain = _sum_sq_grad(c)(params, batch, jnp.float32(1.0))
    for policy in ("full", "dots", "save_attention"):
        remat = _sum_sq_grad(c.override(remat_policy=policy))(params, batch, jnp.float32(1.0))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, remat)
