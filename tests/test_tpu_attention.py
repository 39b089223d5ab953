"""The TPU flash attention for GLM's mask (tpu_attention.py): Pallas interpret mode on CPU against
the XLA reference (values and gradients, with and without attention dropout), per shard under a
mesh, inside the sharded pipelined model, and compiled ahead of time for TPU v5e and v5p (libtpu)."""

import functools
import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_case as case
from jit_forward import forward

from glm_jax import sharding as sh
from glm_jax.layers import glm_attention_mask, xla_attention
from glm_jax.tpu_attention import dropout_keep, dropout_seed, glm_flash_attention, on_mesh

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu absent")


def packed_rows(b=2, s=64):
    """Row 0: two packed [MASK] samples (part A 10 and 5 ids) and padding; row 1: one [gMASK]
    sample with a 20-id prefix; a third row (b=3) all padding but one sample of one id."""
    seg, pre = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    seg[0, :40], seg[0, 40:60], pre[0, :10], pre[0, 40:45] = 1, 2, 1, 1
    seg[1, :], pre[1, :20] = 1, 1
    if b > 2:
        seg[2, 7], pre[2, 7] = 3, 1
    return jnp.asarray(seg), jnp.asarray(pre)


def qkv_rows(b=3, s=64, h=4, kv=2, d=16):
    """Random q [B,S,H,D], k / v [B,S,K,D], a cotangent weight like q, and `packed_rows`."""
    rng = np.random.default_rng(0)
    q, k, v, w = (
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d))
    )
    return q, k, v, w, *packed_rows(b, s)


@pytest.mark.parametrize("blocks,rate", [((16, 32), 0.25), ((64, 64), 0.0)])
def test_values_and_gradients_equal_the_reference(blocks, rate):
    """Several blocks per row (so key blocks after the queries with no part-A key are skipped),
    with attention dropout (the reference's entries for the same key), and one block; grouped KV
    (4 query heads on 2 KV heads). Rows that see no key are not read."""
    q, k, v, w, seg, pre = qkv_rows()
    valid = (seg != 0)[:, :, None, None]
    mask = glm_attention_mask(seg, pre)
    drop = dict(dropout_rate=rate, dropout_rng=jax.random.key(3))
    flash = lambda q, k, v: glm_flash_attention(q, k, v, seg, pre, block_q=blocks[0], block_k=blocks[1], **drop)  # noqa: E731
    ref = lambda q, k, v: xla_attention(q, k, v, mask, **drop)  # noqa: E731
    want = np.where(valid, jax.jit(ref)(q, k, v), 0)
    np.testing.assert_allclose(np.where(valid, jax.jit(flash)(q, k, v), 0), want, atol=2e-6)
    undropped = np.where(valid, jax.jit(xla_attention)(q, k, v, mask), 0)
    assert np.allclose(want, undropped) == (rate == 0.0)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(valid, f(*a), 0.0) * w)  # noqa: E731
    # jitted: op by op, the interpreted kernels' loops would compile each of their steps apart
    got = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", got, want):
        np.testing.assert_allclose(a, r, atol=5e-6, err_msg=f"d{name}")


def test_per_shard_kernels_drop_what_one_device_drops():
    """On a data 2 x tensor 2 mesh the kernel runs on a quarter of the batch rows and heads, and
    inside a shard_map already manual over `data` and `stage` (a pipeline's) over `tensor` only:
    the mask takes global rows and heads, so values and gradients are one device's (the XLA
    reference's, itself under that manual shard_map too)."""
    from jax.sharding import PartitionSpec as P

    q, k, v, w, seg, pre = qkv_rows(b=2)
    valid = (seg != 0)[:, :, None, None]
    mask = glm_attention_mask(seg, pre)
    drop = dict(dropout_rate=0.25, dropout_rng=jax.random.key(3))
    ref = lambda q, k, v: xla_attention(q, k, v, mask, **drop)  # noqa: E731
    flat = lambda q, k, v: on_mesh(q, k, v, seg, pre, block=32, **drop)  # noqa: E731

    def manual(attend):
        run = jax.shard_map(
            attend, in_specs=P("data"), out_specs=P("data"), axis_names={"data", "stage"}, check_vma=False
        )
        return lambda q, k, v: run(q, k, v, seg, pre, mask)

    nested = manual(lambda q, k, v, seg, pre, _: on_mesh(q, k, v, seg, pre, block=32, **drop))
    nested_ref = manual(lambda q, k, v, _, __, mask: xla_attention(q, k, v, mask, **drop))
    loss = lambda f: lambda *a: jnp.sum(jnp.where(valid, f(*a), 0.0) * w)  # noqa: E731
    want, want_grads = jax.jit(ref)(q, k, v), jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    with jax.set_mesh(sh.make_mesh("2x1x2", jax.devices()[:4])):
        for f in (flat, nested, nested_ref):
            np.testing.assert_allclose(np.where(valid, jax.jit(f)(q, k, v) - want, 0), 0, atol=2e-6)
        got = jax.jit(jax.grad(loss(flat), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", got, want_grads):
        np.testing.assert_allclose(a, r, atol=5e-6, err_msg=f"d{name}")


def test_the_dropout_mask_keeps_the_configured_fraction_independently():
    """Over 4 rows x 8 heads x 256 x 256 entries: the kept fraction is 1 - rate within 4 sigma,
    neighbouring entries are uncorrelated, and other keys, heads and batch rows draw other masks
    (agreeing only as often as independent draws do)."""
    rate, p = 0.1, 0.9
    b, h, i, j = np.ix_(range(4), range(8), range(256), range(256))  # [4,1,1,1], [1,8,1,1], ...
    keep = np.asarray(jax.jit(lambda key: dropout_keep(dropout_seed(key), b, h, i, j, rate))(jax.random.key(7)))
    n, var = keep.size, p * (1 - p)
    assert abs(keep.mean() - p) < 4 * np.sqrt(var / n)
    z = (keep - p) / np.sqrt(var)
    for a, c in ((z[..., 1:, :], z[..., :-1, :]), (z[..., 1:], z[..., :-1])):  # next query, next key
        assert abs((a * c).mean()) < 4 / np.sqrt(a.size)
    other_key = np.asarray(dropout_keep(dropout_seed(jax.random.key(8)), b, h, i, j, rate))
    agree = p**2 + (1 - p) ** 2
    for x, y in ((keep, other_key), (keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1])):
        assert abs((x == y).mean() - agree) < 4 * np.sqrt(agree * (1 - agree) / x.size)


@pytest.mark.slow  # the 2x2x2 pipelined model, compiled twice
def test_the_sharded_pipelined_model_with_the_kernel_equals_one_device():
    """attention_impl=pallas_tpu on a 2 x 2 x 2 mesh (the kernel per shard in shard_map, inside the
    pipeline's vmap over stages): the plain model's loss and gradients."""
    c = case.config(num_layers=2)
    loss_ref, grads_ref = case.single_device(c)[:2]
    mesh = sh.make_mesh("2x2x2", jax.devices()[:8])
    batch = {k: jnp.asarray(v) for k, v in case.local_rows().items()}
    loss, grads = case.sharded_loss_and_grads(mesh, batch, c=c.override(attention_impl="pallas_tpu"))[:2]
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_unsupported_lengths_fall_back_to_the_dense_mask():
    from glm_jax.model import dummy_batch, init_params
    from glm_jax.tpu_attention import unsupported

    c = case.config(num_layers=1)
    params = init_params(c, jax.random.key(0))
    rows = dummy_batch(1, 520)  # longer than a block (512) and not a multiple of it
    assert "not a multiple of the blocks" in unsupported((2, 600, 4, 32), (2, 600, 4, 32), False)
    assert unsupported((2, 60, 4, 32), (2, 60, 4, 32), False) is None  # one block of 60
    assert "prefix" in unsupported((2, 64, 4, 32), (2, 64, 4, 32), True)
    ref = forward(c, params, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (once per reason)
        out = forward(c.override(attention_impl="pallas_tpu"), params, rows)
    np.testing.assert_allclose(out, ref, atol=1e-6)  # the XLA path, traced apart


def test_the_layers_run_the_kernel_with_dropout_and_record_it():
    """A layer with attention_impl=pallas_tpu and a dropout rng runs the kernel (the recorder says
    so) and equals the XLA path with that rng (at rate 0 the rng changes nothing: the reference
    test's second case). The model under `auto`, traced for a TPU with dropout on, picks the
    kernel; with a P-tuning prefix it falls back to XLA with a warning."""
    from types import SimpleNamespace

    from glm_jax import layers
    from glm_jax.model import GLM, abstract_params, dummy_batch
    from glm_jax.target import targeting

    c = case.config(num_layers=1, attention_dropout=0.25)
    seg, pre = packed_rows(2, 64)
    valid = np.asarray(seg != 0)[:, :, None]
    x = np.random.default_rng(0).normal(size=(2, 64, c.hidden_size)).astype(np.float32)
    rngs = {"dropout": jax.random.key(1)}

    tables = lambda: layers.rotary_tables(jnp.broadcast_to(jnp.arange(64), (2, 64)), jnp.zeros((2, 64), int), c)  # noqa: E731
    # jitted, as one program each: op by op, the layer's set-up compiles each op apart
    params = jax.jit(
        lambda: layers.SelfAttention(c).init(jax.random.key(0), x, glm_attention_mask(seg, pre), tables())
    )()

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def attend(c, kernel, rngs):
        mask = layers.GLMMask(seg, pre) if kernel else glm_attention_mask(seg, pre)
        return layers.SelfAttention(c).apply(params, x, mask, tables(), rngs=rngs)[0]

    with layers.recording_attention() as used:
        dropped = attend(c.override(attention_impl="pallas_tpu"), True, rngs)
    assert used == {"self": "pallas_tpu"}
    np.testing.assert_allclose(np.where(valid, dropped - attend(c, False, rngs), 0), 0, atol=2e-6)
    undropped = attend(c, False, {})
    assert not np.allclose(np.where(valid, dropped - undropped, 0), 0, atol=1e-3)

    layers._warn_fallback.cache_clear()  # warnings are once per process and reason
    for extra, want in (({}, {"self": "pallas_tpu"}), (dict(pre_seq_len=4), {"prefix": "xla"})):
        tpu = c.override(attention_impl="auto", **extra)
        with targeting([SimpleNamespace(platform="tpu")]), layers.recording_attention() as used:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                apply = lambda p: GLM(tpu).apply({"params": p}, dummy_batch(2, 64), rngs=rngs)  # noqa: E731
                jax.eval_shape(apply, abstract_params(tpu))
        assert used == want
        fallback = "attention_impl='auto' falls back to the XLA reference: a KV cache or a P-tuning prefix"
        assert [str(w.message)[: len(fallback)] for w in caught] == ([fallback] if extra else [])


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-16", "v5p-8"])
def test_forward_and_backward_compile_for_tpu(topology):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from glm_jax.topology import topology_devices

    mesh = Mesh(np.array(topology_devices(topology)[:1]), ("x",))
    b, s, h, kv, d = 1, 512, 4, 2, 128
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((b, s, h, d), (b, s, kv, d), (b, s, kv, d))]
    args += [jax.ShapeDtypeStruct((b, s), jnp.int32)] * 2

    def loss(q, k, v, seg, pre):
        drop = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))  # the dropout hash lowers to Mosaic too
        out = glm_flash_attention(q, k, v, seg, pre, block_q=128, block_k=256, interpret=False, **drop)
        return out.astype(jnp.float32).sum()

    step = jax.shard_map(
        jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=(P(),) * 5, out_specs=P(), check_vma=False
    )
    compiled = jax.jit(step).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
