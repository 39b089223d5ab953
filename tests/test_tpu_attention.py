"""The TPU flash attention for GLM's mask (tpu_attention.py): Pallas interpret mode on CPU against
the XLA reference (values and gradients), inside the sharded pipelined model, and compiled ahead
of time for TPU v5e and v5p (libtpu)."""

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
from glm_jax.tpu_attention import glm_flash_attention

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


@pytest.mark.parametrize("blocks", [(16, 32), (64, 64)])
def test_values_and_gradients_equal_the_reference(blocks):
    """Several blocks per row (so key blocks after the queries with no part-A key are skipped)
    and one block; grouped KV (4 query heads on 2 KV heads). Rows that see no key are not read."""
    rng = np.random.default_rng(0)
    b, s, h, kv, d = 3, 64, 4, 2, 16
    q, k, v, w = (
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d))
    )
    seg, pre = packed_rows(b, s)
    valid = (seg != 0)[:, :, None, None]
    mask = glm_attention_mask(seg, pre)
    flash = lambda q, k, v: glm_flash_attention(q, k, v, seg, pre, block_q=blocks[0], block_k=blocks[1])  # noqa: E731
    ref = lambda q, k, v: xla_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(np.where(valid, jax.jit(flash)(q, k, v), 0), np.where(valid, ref(q, k, v), 0), atol=2e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(valid, f(*a), 0.0) * w)  # noqa: E731
    # jitted: op by op, the interpreted kernels' loops would compile each of their steps apart
    got = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", got, want):
        np.testing.assert_allclose(a, r, atol=5e-6, err_msg=f"d{name}")


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
    assert "not a multiple of the blocks" in unsupported((2, 600, 4, 32), (2, 600, 4, 32), False, False)
    assert unsupported((2, 60, 4, 32), (2, 60, 4, 32), False, False) is None  # one block of 60
    assert "dropout" in unsupported((8, 64, 4, 32), (8, 64, 4, 32), False, True)
    ref = forward(c, params, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (once per reason)
        out = forward(c.override(attention_impl="pallas_tpu"), params, rows)
    np.testing.assert_allclose(out, ref, atol=1e-6)  # the XLA path, traced apart


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
        out = glm_flash_attention(q, k, v, seg, pre, block_q=128, block_k=256, interpret=False)
        return out.astype(jnp.float32).sum()

    step = jax.shard_map(
        jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=(P(),) * 5, out_specs=P(), check_vma=False
    )
    compiled = jax.jit(step).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
