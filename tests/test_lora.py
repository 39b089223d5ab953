"""LoRA as peft builds it: the default A init, the fused query_key_value target, rsLoRA and DoRA,
each against the plain model or an equivalent adapter (fp32)."""

import jax
import numpy as np
import pytest
from test_peft import base_config, batch_of, logits, with_adapter

from glm_jax.config import ConfigError
from glm_jax.model import init_params
from glm_jax.peft import PeftConfig, combine, merge_lora, split, unmerge_lora
from glm_jax.quant import dequantize_params, quantize_params


@pytest.fixture(scope="module")
def base():
    c = base_config()
    return c, init_params(c, jax.random.key(0))


def nonzero(adapter, leaf: str, key: int, size: float = 0.05):
    """The adapter with its `leaf` leaves moved away from their init (B, DoRA's magnitude delta)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + size * jax.random.normal(jax.random.key(key), x.shape) if leaf in str(p) else x, adapter
    )


def test_the_default_a_init_is_peft_kaiming_uniform_and_gaussian_is_one_over_r(base):
    c, params = base
    e = c.hidden_size
    a = with_adapter(PeftConfig("lora", lora_rank=8), c, params)[1]["layers"]["attention"]["query_key_value"]["lora_a"]
    bound = 1.0 / np.sqrt(e)  # kaiming_uniform_(a=sqrt(5)) on [r, E]
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    np.testing.assert_allclose(np.std(a), bound / np.sqrt(3), rtol=0.15)
    g = with_adapter(PeftConfig("lora", lora_rank=8, lora_init="gaussian"), c, params)[1]
    np.testing.assert_allclose(np.std(g["layers"]["attention"]["query_key_value"]["lora_a"]), 1 / 8, rtol=0.15)


def test_fused_qkv_shares_one_a_and_equals_three_adapters_with_that_a(base):
    c, params = base
    fused = PeftConfig("lora", lora_rank=4, lora_targets="query_key_value,dense_4h_to_h")
    config, adapter, _ = with_adapter(fused, c, params)
    att = adapter["layers"]["attention"]
    assert set(att) == {"query_key_value", "query", "key", "value"} and set(att["query"]) == {"lora_b"}
    assert att["query_key_value"]["lora_a"].shape == (c.num_layers, c.hidden_size, 4)
    adapter = nonzero(adapter, "lora_b", 3)
    b = batch_of()
    got = logits(config, combine(adapter, params, fused), b)

    separate = PeftConfig("lora", lora_rank=4, lora_targets="query,key,value,dense_4h_to_h")
    sep_config = separate.model_config(c)
    att = adapter["layers"]["attention"]
    shared_a = att["query_key_value"]["lora_a"]
    sep = {"layers": {"mlp": adapter["layers"]["mlp"], "attention": {}}}
    for name in ("query", "key", "value"):
        sep["layers"]["attention"][name] = {
            "lora_a": shared_a,
            "lora_b": adapter["layers"]["attention"][name]["lora_b"],
        }
    want = logits(sep_config, combine(sep, params, separate), b)
    assert np.abs(want - logits(c, params, b)).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    merged, plain = merge_lora(combine(adapter, params, fused), config)
    np.testing.assert_allclose(logits(plain, merged, b), got, atol=2e-5, rtol=1e-5)
    restored = unmerge_lora(merged, adapter, config)
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_rslora_is_lora_with_alpha_times_sqrt_r(base):
    c, params = base
    rs = PeftConfig("lora", lora_rank=4, lora_alpha=8.0, lora_rslora=True)
    config, adapter, _ = with_adapter(rs, c, params)
    adapter = nonzero(adapter, "lora_b", 4)
    plain = PeftConfig("lora", lora_rank=4, lora_alpha=16.0)  # 8 / sqrt(4) = 16 / 4
    b = batch_of()
    np.testing.assert_allclose(
        logits(config, combine(adapter, params, rs), b),
        logits(plain.model_config(c), combine(adapter, params, plain), b),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "targets", [pytest.param("query,value,dense,dense_h_to_4h", marks=pytest.mark.slow), "query_key_value"]
)
def test_dora_starts_as_the_base_and_merged_equals_unmerged(base, targets):
    c, params = base
    dora = PeftConfig("lora", lora_rank=4, lora_dora=True, lora_targets=targets)
    config, adapter, full = with_adapter(dora, c, params)
    assert adapter["layers"]["attention"]["value"]["lora_magnitude_delta"].shape == (
        c.num_layers,
        c.num_attention_heads,
        c.head_dim,
    )
    b = batch_of()
    base_logits = logits(c, params, b)
    np.testing.assert_allclose(logits(config, full, b), base_logits, atol=1e-6)  # m / ||W|| = 1 to rounding
    adapter = nonzero(nonzero(adapter, "lora_b", 5), "lora_magnitude_delta", 6, 0.2)
    full = combine(adapter, params, dora)
    unmerged = logits(config, full, b)
    assert np.abs(unmerged - base_logits).max() > 1e-3
    merged, plain = merge_lora(full, config)
    assert not plain.lora_dora and plain.lora_rank == 0
    np.testing.assert_allclose(logits(plain, merged, b), unmerged, atol=2e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="reload the base"):
        unmerge_lora(merged, adapter, config)
    # on an int8 base the magnitude's norms come from the dequantized kernels: as the float model
    # holding exactly those weights
    q_config = config.override(quantization="int8")
    q_params = quantize_params(split(full, dora, config)[1], q_config)
    float_again = dequantize_params(q_params, q_config)
    np.testing.assert_allclose(
        logits(q_config, combine(adapter, q_params, dora), b),
        logits(config, combine(adapter, float_again, dora), b),
        atol=1e-4,
        rtol=1e-4,
    )


def test_fused_and_separate_qkv_targets_do_not_mix():
    with pytest.raises(ConfigError, match="not both"):
        PeftConfig("lora", lora_targets="query_key_value,query")
    with pytest.raises(ConfigError, match="lora_init"):
        PeftConfig("lora", lora_init="orthogonal")
