"""INT4/INT8 weight-only quantization: byte layout, round trips, error bounds, the XLA dequant-matmul."""

import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward

from glm_jax.quant import dequantize, from_glm130b_int4, matmul, pack_int4, quantize, to_glm130b_int4, unpack_int4


def test_pack_unpack_round_trips_every_pair():
    vals = np.arange(-8, 8, dtype=np.int8)
    hi, lo = np.meshgrid(vals, vals, indexing="ij")
    q = np.stack([hi.ravel(), lo.ravel()], axis=0)  # [2, 256]: all 256 (even, odd) pairs
    packed = np.asarray(pack_int4(q))
    assert packed.shape == (1, 256) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), q)
    assert sorted(set(packed[0].tolist())) == list(range(256))  # every byte value is used exactly once


@pytest.mark.parametrize("even,odd,byte", [(-1, 2, 0xF2), (7, -7, 0x79), (-8, 0, 0x80), (0, -1, 0x0F), (3, 5, 0x35)])
def test_byte_vectors_fix_nibble_order_and_sign(even, odd, byte):
    packed = np.asarray(pack_int4(np.array([[even], [odd]], np.int8)))
    assert int(packed[0, 0]) == byte  # even-index element in the high nibble
    np.testing.assert_array_equal(np.asarray(unpack_int4(np.array([[byte]], np.uint8)))[:, 0], [even, odd])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_quantization_error_is_at_most_half_a_step(bits, group):
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    qw = quantize(w, bits, group)
    g = 64 // (group or 64)
    assert qw.scale.shape == (g, 24) and qw.scale.dtype == jnp.float16
    step = np.repeat(np.asarray(qw.scale, np.float32), 64 // g, axis=0)
    deq = np.asarray(dequantize(qw))
    # rounding is to half a step of the fp32 scale; the fp16-stored scale adds its own relative error
    assert np.all(np.abs(deq - w) <= step / 2 + np.abs(w) * 2e-3 + 1e-7)
    ints = np.asarray(unpack_int4(qw.q) if bits == 4 else qw.q)
    assert ints.min() >= -(7 if bits == 4 else 127) and ints.max() <= (7 if bits == 4 else 127)


def test_groups_cut_the_error():
    w = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)
    w[:8] *= 20  # outliers in a few input rows
    err = lambda qw: float(np.abs(np.asarray(dequantize(qw)) - w).mean())
    assert err(quantize(w, 4, 32)) < 0.5 * err(quantize(w, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32])
def test_xla_matmul_equals_dequantize_then_matmul_and_stays_near_float(bits, group):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    qw = quantize(w, bits, group)
    got = np.asarray(matmul(x, qw, dtype=jnp.float32))
    np.testing.assert_allclose(got, x @ np.asarray(dequantize(qw)), rtol=1e-5, atol=1e-4)
    step = np.repeat(np.asarray(qw.scale, np.float32), 96 // qw.scale.shape[0], axis=0)
    bound = np.abs(x) @ (step / 2 + np.abs(w) * 2e-3)
    assert np.all(np.abs(got - x @ w) <= bound + 1e-4)


def test_glm130b_int4_format_round_trips():
    w_torch = np.random.default_rng(3).standard_normal((48, 64)).astype(np.float32)  # [out, in]
    packed, scale = to_glm130b_int4(w_torch)
    assert packed.shape == (48, 32) and packed.dtype == np.int8 and scale.shape == (48,) and scale.dtype == np.float16
    # the reference's own unpack: high nibble first, sign-extended
    ref = np.stack([packed >> 4, (packed << 4).astype(np.int8) >> 4], axis=-1).reshape(48, 64)
    np.testing.assert_allclose(
        ref * scale.astype(np.float32)[:, None], np.asarray(dequantize(quantize(w_torch.T))).T, rtol=0, atol=0
    )
    loaded = from_glm130b_int4(packed, scale)
    np.testing.assert_array_equal(np.asarray(dequantize(loaded)), np.asarray(dequantize(quantize(w_torch.T))))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="must be even"):
        quantize(np.ones((3, 4)), 4)
    with pytest.raises(ValueError, match="group size"):
        quantize(np.ones((8, 4)), 8, group=3)
    with pytest.raises(ValueError, match="choose 4 or 8"):
        quantize(np.ones((8, 4)), 2)


# ---- quantized models ----------------------------------------------------------------------------------------
import jax  # noqa: E402

from glm_jax.config import get_config  # noqa: E402
from glm_jax.model import abstract_params, init_params  # noqa: E402
from glm_jax.quant import quantize_params, tree_bytes  # noqa: E402


@pytest.fixture(scope="module")
def small_model():
    c = get_config("glm-tiny", dtype="float32", num_layers=2, vocab_size=512)
    return c, init_params(c, jax.random.key(0))


def _batch():
    rng = np.random.default_rng(0)
    s = 16
    return {
        "tokens": jnp.asarray(rng.integers(10, 500, (2, s)), jnp.int32),
        "position_ids": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s)),
        "segment_ids": jnp.ones((2, s), jnp.int32),
        "prefix_mask": jnp.asarray([[1] * 10 + [0] * 6] * 2, jnp.int32),
    }


@pytest.mark.parametrize("mode,tol", [("int8", 0.01), ("int4", 0.05)])
def test_quantized_model_logits_stay_close(small_model, mode, tol):
    c, params = small_model
    cq = c.override(quantization=mode)
    pq = quantize_params(params, cq)
    same = jax.tree_util.tree_map(lambda b: b.value.shape, abstract_params(cq), is_leaf=lambda x: hasattr(x, "value"))
    assert jax.tree_util.tree_map(lambda x: x.shape, pq) == same
    assert pq["layers"]["attention"]["query"]["q"].dtype == (jnp.uint8 if mode == "int4" else jnp.int8)
    assert pq["word_embeddings"]["embedding"].dtype == jnp.bfloat16  # embeddings, norms, biases stay 16-bit
    ref = np.asarray(forward(c, params, _batch()))
    got = np.asarray(forward(cq, pq, _batch()))
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert tree_bytes(pq) < tree_bytes(params) / (3 if mode == "int8" else 5)


def test_quantized_checkpoint_saves_and_loads_identical_arrays(small_model, tmp_path):
    import orbax.checkpoint as ocp

    c, params = small_model
    pq = quantize_params(params, c.override(quantization="int4"))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "q", pq)
    with ocp.StandardCheckpointer() as ckptr:
        back = ckptr.restore(
            tmp_path / "q", jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pq)
        )
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(pq)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "m,k,n,group,block_k",
    [(1, 96, 48, None, 32), (5, 300, 160, None, 64), (16, 512, 256, None, 128), (7, 512, 192, 128, 64)],
)
def test_pallas_kernel_in_interpret_mode_equals_dequantize_then_matmul(m, k, n, group, block_k):
    from glm_jax.quant import KernelBlocks, pallas_matmul

    rng = np.random.default_rng(4)
    x = rng.standard_normal((m, k)).astype(np.float32)
    qw = quantize(rng.standard_normal((k, n)).astype(np.float32), 4, group)
    want = x @ np.asarray(dequantize(qw))
    for split in (0, 1):  # automatic split-K (2 here) and none; ragged K leaves a tail for XLA
        got = np.asarray(
            pallas_matmul(x, qw, dtype=jnp.float32, blocks=KernelBlocks(block_k=block_k, split_k=split), interpret=True)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(matmul(x, qw, dtype=jnp.float32)), got, rtol=1e-5, atol=1e-4)


def test_pallas_kernel_refuses_untileable_weights_and_auto_falls_back_to_xla():
    from glm_jax.quant import choose_matmul, dense, pallas_matmul, pallas_supports

    qw = quantize(np.random.default_rng(0).standard_normal((64, 130)).astype(np.float32), 4)
    assert "no power-of-two tile" in pallas_supports(1, 64, 130, 1)
    with pytest.raises(ValueError, match="cannot tile"):
        pallas_matmul(np.ones((1, 64), np.float32), qw, interpret=True)
    x = np.ones((2, 3, 64), np.float32)
    assert choose_matmul("auto", 6, qw) == "xla"  # CPU, and N=130 does not tile either
    np.testing.assert_array_equal(
        np.asarray(dense(x, qw, "auto", jnp.float32)), np.asarray(matmul(x, qw, dtype=jnp.float32))
    )


@pytest.mark.parametrize("m", [1, 16, 64])
def test_pallas_kernel_lowers_through_triton_for_glm130b_shapes(m):
    """The real GPU path up to Triton IR, on CPU: jax.export for CUDA runs the Pallas Triton
    lowering (power-of-two tiles, supported ops) for the decode shapes of the INT4 bench."""
    from jax import export

    from glm_jax.quant import QuantizedWeight, pallas_matmul

    for k, n in [(12288, 36864), (12288, 12288), (12288, 65536), (32768, 12288)]:
        f = jax.jit(lambda x, q, s: pallas_matmul(x, QuantizedWeight(q, s, 4), interpret=False))
        args = (
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((1, n), jnp.float16),
        )
        exported = export.export(
            f, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        )(*args)
        assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_quantized_model_with_the_pallas_kernel_equals_the_xla_path(small_model):
    c, params = small_model
    cq = c.override(quantization="int4")
    pq = quantize_params(params, cq)
    xla = np.asarray(forward(cq.override(quantized_matmul="xla"), pq, _batch()))
    from glm_jax import quant

    quant._warn_interpret.cache_clear()
    with pytest.warns(UserWarning, match="interpret mode"):  # no GPU here: said once, then it runs
        pallas = np.asarray(forward(cq.override(quantized_matmul="pallas"), pq, _batch()))
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_quantized_model_equals_one_device(small_model):
    """Packed weights and scales placed by the same logical rules as the float kernels: column-
    parallel layers split N, row-parallel ones split the packed K (whole heads / FFN columns per
    shard); the 4-way tensor-sharded INT4 model gives one device's logits and generations."""
    from glm_jax import sharding as sh
    from glm_jax.generate import Generator
    from glm_jax.tokenizer import GMASK

    c, params = small_model
    cq = c.override(quantization="int4", quantization_group=64)
    pq = quantize_params(params, cq)
    mesh = sh.make_mesh("1x4", jax.devices()[:4])
    placed = jax.device_put(pq, sh.named_shardings(abstract_params(cq), mesh, sh.rules_for(cq, mesh)))
    layers = placed["layers"]
    assert layers["attention"]["query"]["q"].sharding.spec[2] == "tensor"  # [L, E/2, heads, D]: N split
    assert layers["attention"]["dense"]["q"].sharding.spec[1] == "tensor"  # [L, H*D/2, E]: packed K split
    assert layers["mlp"]["dense_4h_to_h"]["q"].sharding.spec[1] == "tensor"
    assert layers["mlp"]["dense_h_to_4h"]["scale"].sharding.spec[-1] == "tensor"  # scales follow N
    want = np.asarray(forward(cq, pq, _batch()))
    got = np.asarray(forward(cq, placed, _batch()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    prompts = [[11, 12, 13, GMASK], [21, 22, 23, 24, 25, GMASK]]
    assert Generator(cq, placed).generate(prompts, 3, stop_tokens=()) == Generator(cq, pq).generate(
        prompts, 3, stop_tokens=()
    )


# ---- the kernel per shard on a mesh -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "split,k,n,group",
    [
        (("n", 1, 16), 128, 128, None),  # column-parallel, a query's [heads, head_dim] N
        (("n", 2, 1), 128, 128, 32),  # column-parallel, a GLU's [2, F] N, grouped scales
        (("k", 1, 1), 384, 64, None),  # row-parallel, one scale per column after the sum; a K tail per shard
        (("k", 1, 1), 256, 64, 32),  # row-parallel, 8 groups: 2 per shard, scaled per shard before the sum
        (("k", 1, 1), 256, 64, 128),  # row-parallel, 2 groups: every shard inside one
    ],
)
@pytest.mark.filterwarnings("ignore:the Pallas INT4 kernel runs in interpret mode")
def test_pallas_kernel_per_shard_on_a_mesh_equals_one_device(split, k, n, group):
    """On a 1x4 mesh the kernel runs per shard in shard_map: column-parallel weights split along N
    (x whole), row-parallel ones along the packed K (x split along K, fp32 partials summed over
    `tensor`); equal to the XLA path on one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from glm_jax import quant
    from glm_jax import sharding as sh

    mesh = sh.make_mesh("1x4", jax.devices()[:4])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, k)).astype(np.float32)
    qw = quantize(rng.standard_normal((k, n)).astype(np.float32), 4, group)
    want = np.asarray(matmul(x, qw, dtype=jnp.float32))
    split = quant.Split(*split)
    o, i = split.outer, split.inner
    if split.dim == "n":  # placed as the rules place it: the split feature axis over `tensor`
        q = jax.device_put(qw.q.reshape(-1, o, n // (o * i), i), NamedSharding(mesh, P(None, None, "tensor", None)))
        scale = jax.device_put(qw.scale.reshape(-1, o, n // (o * i), i), NamedSharding(mesh, P(None, None, "tensor")))
    else:
        q = jax.device_put(qw.q, NamedSharding(mesh, P("tensor", None)))
        scale = jax.device_put(qw.scale, NamedSharding(mesh, P()))

    @jax.jit
    def f(x, q, scale):
        w = quant.QuantizedWeight(q.reshape(q.shape[0], n), scale.reshape(scale.shape[0], n), 4)
        plan = quant.plan_shards(x.shape[0], w, split, quant.mesh_of(w))  # the mesh from the weight's type
        assert plan.split == split and plan.gathered is None
        return quant.dense(x, w, "pallas", jnp.float32, split=split)

    got = np.asarray(f(x, q, scale))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_pallas_kernel_per_shard_lowers_through_triton():
    """The GPU path on a 4-way tensor mesh, on CPU: jax.export for CUDA lowers the kernel inside
    shard_map through Triton, column-parallel without a collective, row-parallel with one all-reduce."""
    from jax import export
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from glm_jax import quant
    from glm_jax import sharding as sh

    mesh = sh.make_mesh("1x4", jax.devices()[:4])
    k, n = 4096, 4096
    for split, x_spec, q_spec, s_spec in [
        (quant.Split("n"), P(), P(None, "tensor"), P(None, "tensor")),
        (quant.Split("k"), P(None, "tensor"), P("tensor", None), P()),
    ]:

        def f(x, q, s):
            w = quant.QuantizedWeight(q, s, 4)
            return quant.sharded_pallas_matmul(x, w, quant.plan_shards(16, w, split, mesh), interpret=False)

        args = (
            jax.ShapeDtypeStruct((16, k), jnp.bfloat16, sharding=NamedSharding(mesh, x_spec)),
            jax.ShapeDtypeStruct((k // 2, n), jnp.uint8, sharding=NamedSharding(mesh, q_spec)),
            jax.ShapeDtypeStruct((1, n), jnp.float16, sharding=NamedSharding(mesh, s_spec)),
        )
        triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()
        assert "__gpu$xla.gpu.triton" in text and ("all_reduce" in text) == (split.dim == "k")


def test_auto_takes_the_kernel_per_shard_on_a_gpu_mesh(monkeypatch):
    """`auto` on NVIDIA GPUs: the kernel for decode-sized M per shard on one device or a (data,
    tensor) mesh whose split the weight's logical axes give; XLA where the weight would be gathered."""
    from glm_jax import quant
    from glm_jax import sharding as sh

    monkeypatch.setattr(quant, "target_platform", lambda: "gpu")
    qw = quant.QuantizedWeight(np.zeros((128, 128), np.uint8), np.ones((8, 128), np.float16), 4)  # K 256
    tensor, data, stage = (sh.make_mesh(s, jax.devices()[:4]) for s in ("1x4", "4x1x1", "2x2"))
    col, row = quant.Split("n"), quant.Split("k")
    assert quant.choose_matmul("auto", 1, qw) == "pallas"  # one device, as before
    assert quant.choose_matmul("auto", 8, qw, col, tensor) == "pallas"
    assert quant.choose_matmul("auto", 8, qw, row, tensor) == "pallas"
    assert quant.choose_matmul("auto", 8, qw, None, tensor) == "xla"  # split unknown: it would gather
    assert quant.choose_matmul("auto", 256, qw, None, data) == "pallas"  # 64 rows per data shard
    assert quant.choose_matmul("auto", 260, qw, None, data) == "xla"
    assert quant.choose_matmul("auto", 8, qw, col, stage) == "xla"  # a stage axis: the pipeline's
    three = quant.QuantizedWeight(np.zeros((96, 128), np.uint8), np.ones((3, 128), np.float16), 4)
    assert quant.choose_matmul("auto", 8, three, row, tensor) == "xla"  # 3 groups do not cut in 4
    # the splits of the model's linear layers, from their logical axes
    assert quant.tensor_split(("embed", "heads", "head_dim"), 1, (8, 16)) == quant.Split("n", 1, 16)
    assert quant.tensor_split(("embed", "kv_heads", "head_dim"), 1, (2, 16)) == quant.Split("n", 1, 16)
    assert quant.tensor_split(("embed", "glu", "mlp"), 1, (2, 64)) == quant.Split("n", 2, 1)
    assert quant.tensor_split(("heads", "head_dim", "embed"), 2, (128,)) == quant.Split("k")
    assert quant.tensor_split(("mlp", "embed"), 1, (128,)) == quant.Split("k")
    assert quant.tensor_split(("embed", "embed"), 1, (128,)) is None
