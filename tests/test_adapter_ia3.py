"""Bottleneck adapters (Houlsby et al.) and IA3 (peft's): a new one is the base exactly, cached
decoding, IA3's merge and its INT4 base, shardings on a mesh, and finetune.py --method adapter."""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from jit_forward import forward
from test_generate import assert_cached_decoding_is_full_recomputation
from test_peft import ALL_TARGETS, base_config, batch_of, logits, with_adapter

from glm_jax import placement
from glm_jax import sharding as sh
from glm_jax.checkpoints import move_to_device, save_serving
from glm_jax.config import ConfigError, get_config
from glm_jax.export import ExportError, export_tensors
from glm_jax.loading import load_model
from glm_jax.model import abstract_params, init_params
from glm_jax.peft import PeftConfig, combine, merge_adapters, merge_ia3
from glm_jax.quant import dequantize_params, quantize_params
from glm_jax.tokenizer import GMASK, MASK

METHODS = {
    "adapter": PeftConfig("adapter", adapter_size=8),
    "ia3": PeftConfig("ia3", ia3_targets=ALL_TARGETS),  # input and output scales on every linear shape
}


def perturbed(adapter, scale=0.05, seed=7):
    """The adapter moved away from its identity start (IA3: scales 1 + noise; up away from 0)."""
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


@pytest.fixture(scope="module")
def base():
    c = base_config()  # test_peft's: its compiled forward is shared
    return c, init_params(c, jax.random.key(0))


@pytest.fixture(scope="module")
def fresh(base):
    """method -> (model config, a new adapter's leaves, the base with them), made once."""
    return {method: with_adapter(peft, *base) for method, peft in METHODS.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_new_adapter_is_the_base_exactly_and_a_trained_one_is_not(base, fresh, method):
    c, params = base
    peft = METHODS[method]
    config, adapter, full = fresh[method]
    b = batch_of()
    plain = logits(c, params, b)
    np.testing.assert_array_equal(logits(config, full, b), plain)
    moved = logits(config, combine(perturbed(adapter), params, peft), b)
    assert np.abs(moved - plain).max() > 1e-3


def test_parameter_layout(base):
    c, _ = base
    shapes = unboxed_shapes(METHODS["adapter"].model_config(c))
    e, layers = c.hidden_size, c.num_layers
    for name in ("attention_adapter", "mlp_adapter"):  # Houlsby: after attention and after the MLP
        assert shapes["layers"][name] == {
            "down": {"kernel": (layers, e, 8), "bias": (layers, 8)},
            "up": {"kernel": (layers, 8, e), "bias": (layers, e)},
        }
    shapes = unboxed_shapes(PeftConfig("ia3").model_config(c))  # peft's default targets
    kv, d, f = c.num_kv_heads, c.head_dim, c.inner_hidden_size
    att, mlp = shapes["layers"]["attention"], shapes["layers"]["mlp"]
    assert att["key"]["ia3_scale"] == att["value"]["ia3_scale"] == (layers, kv, d)  # their outputs
    assert mlp["dense_4h_to_h"]["ia3_scale"] == (layers, f)  # the MLP's inner activation: its input
    assert "ia3_scale" not in att["query"] and "ia3_scale" not in mlp["dense_h_to_4h"]


def unboxed_shapes(config):
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.meta.unbox(abstract_params(config)))


@pytest.mark.slow
def test_cached_generation_equals_full_recomputation():
    """Both at once (one compile), moved away from their start, on a pre-norm base (ChatGLM2's
    block; the others use GLM-130B's DeepNorm): bottlenecks in both placements."""
    c = base_config(norm_placement="pre", norm_kind="rmsnorm")
    params = init_params(c, jax.random.key(5))
    config = both(c)
    fresh, base_paths = flatten_dict(init_params(config, jax.random.key(1))), flatten_dict(params)
    new = perturbed({path: leaf for path, leaf in fresh.items() if path not in base_paths})
    full = unflatten_dict({**base_paths, **new})
    assert_cached_decoding_is_full_recomputation(config, full, [[11, 12, 13, 14, GMASK], [31, 32, MASK, 33]], 3)


def test_ia3_merged_equals_unmerged_and_adapters_are_carried(base, fresh):
    c, params = base
    peft = METHODS["ia3"]
    config, adapter, _ = fresh["ia3"]
    full = combine(perturbed(adapter, 0.3), params, peft)
    b = batch_of()
    unmerged = logits(config, full, b)
    merged, plain = merge_adapters(full, config)
    assert not plain.ia3 and plain.override(ia3_targets=c.ia3_targets) == c
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(logits(c, merged, b), unmerged, atol=1e-5, rtol=1e-5)
    # a bottleneck adapter cannot merge: it stays, with its config field
    a_config, _, a_full = fresh["adapter"]
    kept, kept_config = merge_adapters(a_full, a_config)
    assert kept_config == a_config and kept is a_full


@pytest.mark.slow
def test_ia3_on_an_int4_base_equals_its_dequantized_float_base(base, fresh):
    c, params = base
    peft = METHODS["ia3"]
    config, adapter, _ = fresh["ia3"]
    scales = perturbed(adapter, 0.3)
    q = config.override(quantization="int4")
    qparams = quantize_params(params, c.override(quantization="int4"))
    b = batch_of()
    got = logits(q, combine(scales, qparams, peft), b)
    want = logits(config, combine(scales, dequantize_params(qparams, q), peft), b)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)  # 16-bit embeddings and norms on the INT4 base
    assert np.abs(got - logits(q, combine(adapter, qparams, peft), b)).max() > 1e-3
    with pytest.raises(ConfigError, match="float checkpoint"):
        merge_ia3(combine(scales, qparams, peft), q)


def both(c):
    return METHODS["ia3"].model_config(METHODS["adapter"].model_config(c))


def test_both_take_their_kernels_shardings_on_a_mesh(base):
    """E on `embed` (replicated; FSDP: over data), the bottleneck replicated; IA3's vectors on
    their kernel's axes (heads / kv_heads / mlp over tensor)."""
    config = both(base[0])
    mesh = sh.make_mesh("2x1x2", jax.devices()[:4])
    plain = placement.param_shardings(config, mesh)
    fsdp = sh.named_shardings(abstract_params(config), mesh, sh.rules_for(config, mesh, fsdp=True))
    spec = lambda tree, *path: tuple(functools.reduce(lambda t, k: t[k], path, tree).spec)  # noqa: E731
    att, mlp = ("layers", "attention_adapter"), ("layers", "mlp_adapter")
    assert spec(plain, *att, "down", "kernel") == spec(plain, *mlp, "up", "kernel") == ("stage", None, None)
    assert spec(fsdp, *att, "down", "kernel") == ("stage", "data", None)
    assert spec(fsdp, *mlp, "up", "kernel") == ("stage", None, "data")
    ia3 = {
        ("attention", "query"): ("stage", "tensor", None),
        ("attention", "key"): ("stage", "tensor", None),
        ("attention", "dense"): ("stage", None),
        ("mlp", "dense_h_to_4h"): ("stage", None, "tensor"),
        ("mlp", "dense_4h_to_h"): ("stage", "tensor"),
    }
    for (block, name), want in ia3.items():
        assert spec(plain, "layers", block, name, "ia3_scale") == want, name


@pytest.mark.slow
def test_both_on_a_data_and_tensor_mesh_equal_one_device(base):
    c, _ = base
    config = both(c)
    full = perturbed(init_params(config, jax.random.key(2)), 0.02)
    mesh = sh.make_mesh("2x1x2", jax.devices()[:4])
    b = batch_of(rows=4)
    with jax.set_mesh(mesh):
        got = np.asarray(forward(config, jax.device_put(full, placement.param_shardings(config, mesh)), b))
    np.testing.assert_allclose(got, logits(config, full, b), atol=2e-5, rtol=1e-5)


def test_export_folds_ia3_and_refuses_bottlenecks():
    """A released layout has no bottleneck adapters; IA3 folds into the exported weights."""
    c = get_config("chatglm2-6b", num_layers=1, hidden_size=64, num_attention_heads=4, inner_hidden_size=96)
    c = METHODS["ia3"].model_config(c.override(vocab_size=128, vocab_pad_multiple=64))
    rng = np.random.default_rng(0)
    shapes = nn.meta.unbox(abstract_params(c))
    params = jax.tree_util.tree_map(lambda x: rng.normal(1.0, 0.2, x.shape).astype(np.float32), shapes)
    got, _ = export_tensors(params, c, "chatglm2", "float32")
    want, _ = export_tensors(*merge_ia3(params, c), "chatglm2", "float32")
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with pytest.raises(ExportError, match="adapter_size=8"):
        export_tensors({}, METHODS["adapter"].model_config(c), "chatglm2")
    with pytest.raises(ExportError, match="num_virtual_tokens=20"):  # virtual tokens would be dropped silently
        export_tensors({}, PeftConfig("prompt").model_config(c), "chatglm2")


def test_bad_fields_are_clear_errors():
    with pytest.raises(ConfigError, match="ia3_targets"):
        PeftConfig("ia3", ia3_targets="key,gate")
    with pytest.raises(ConfigError, match="ia3_targets"):
        PeftConfig("ia3", ia3_targets=" , ")
    with pytest.raises(ConfigError, match="adapter_size"):
        PeftConfig("adapter", adapter_size=-1)
    assert PeftConfig("adapter").adapter_size == 64 and PeftConfig("ia3").ia3
    assert PeftConfig("ia3", ia3_targets="query_key_value").ia3_target_names == ("query", "key", "value")


@pytest.mark.slow
def test_finetune_adapter_and_ia3_end_to_end_with_merge(tmp_path):
    """finetune.py --merge: the adapter's merged checkpoint carries its bottlenecks (as P-tuning
    its prefix); IA3's is folded into the kernels; each equals its adapter on the base."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import finetune
    from test_finetune import ROWS, probe_logits

    c = get_config("glm-tiny", num_layers=2)  # the tokenizer's vocabulary, bf16 compute, as test_finetune
    base_dir = str(tmp_path / "base")
    save_serving(base_dir, c, move_to_device(init_params(c, jax.random.key(0))), 5, "test")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    args = ["--checkpoint", base_dir, "--data", str(data), "--steps", "2", "--batch", "4", "--max-source", "16"]
    args += ["--max-target", "16", "--mesh", "1x1x1", "--no-progress", "--merge"]
    runs = (("adapter", "adapter_size=4", 1e-5), ("ia3", "ia3_targets=key,value,dense_4h_to_h", 4e-3))
    for method, knobs, tol in runs:
        out = tmp_path / method
        summary = finetune.main(["--method", method, "--out", str(out), "--set", knobs, *args])
        assert summary["steps"] == 2 and summary["trainable_dtype"] == "float32"
        adapted = load_model(base_dir, adapter=str(out))
        merged = load_model(str(out / "merged"))
        if method == "adapter":
            assert summary["trainable_params"] == 2 * 2 * (2 * 128 * 4 + 4 + 128)  # layers x 2 x (down, up)
            assert merged.config.adapter_size == 4 and "attention_adapter" in merged.params["layers"]
        else:
            assert summary["trainable_params"] == 2 * (128 + 128 + 384)  # layers x (key, value, FFN width)
            assert not merged.config.ia3 and "ia3_scale" not in merged.params["layers"]["attention"]["key"]
        # bf16 compute: the merged kernel rounds W * l once, the unmerged path rounds x W, then * l
        np.testing.assert_allclose(probe_logits(merged), probe_logits(adapted), atol=tol, rtol=0)
        assert np.abs(probe_logits(adapted) - probe_logits(load_model(base_dir))).max() > 0  # it trained
