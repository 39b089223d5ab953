"""GLMConfig: presets, parameter counts from abstract init, derived sizes, overrides, validation."""

import json

import pytest

from glm_jax.config import PRESETS, ConfigError, GLMConfig, get_config, parse_overrides
from glm_jax.summary import parameter_summary


def expected_params(c: GLMConfig) -> int:
    """The parameter count written out from the architecture, independent of the module code."""
    e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim, c.inner_hidden_size
    qkv = e * (h + 2 * kv) * d + (h + 2 * kv) * d * c.qkv_bias
    dense = h * d * e + e * c.attention_dense_bias
    ffn_out = 2 * f if c.gated_ffn else f
    ffn = e * ffn_out + ffn_out * c.ffn_bias + f * e + e * c.ffn_bias
    norm = (2 if c.norm_kind == "layernorm" else 1) * e
    per_layer = qkv + dense + ffn + 2 * norm
    head = 0 if c.tie_word_embeddings else c.padded_vocab_size * e
    positions = (1 + c.position_encoding_2d) * c.learned_position_rows * e if c.position_encoding == "learned" else 0
    embedding_norm = norm * c.embedding_norm
    return c.num_layers * per_layer + c.padded_vocab_size * e + head + norm * c.final_norm + positions + embedding_norm


@pytest.mark.parametrize(
    "name, published",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("bloom-560m", 559_214_592),
        ("opt-125m", 125_239_296 + (50304 - 50272) * 768),  # the preset pads the vocab to a multiple of 128
    ],
)
def test_other_families_match_their_published_counts(name, published):
    assert parameter_summary(get_config(name))["params"] == published


def test_glm130b_count_is_exact():
    # docs/reference.md section 1: 70 x (QKV 12288x36864+b, dense 12288^2+b, h_to_4h 12288x65536+b,
    # 4h_to_h 32768x12288+b, 2 LayerNorms) + tied 150528x12288 embedding + final LayerNorm
    h = 12288
    layer = (h * 36864 + 36864) + (h * h + h) + (h * 65536 + 65536) + (32768 * h + h) + 2 * 2 * h
    want = 70 * layer + 150528 * h + 2 * h
    assert want == 128_697_794_560
    assert parameter_summary(get_config("glm-130b"))["params"] == want


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_from_abstract_init(name):
    c = get_config(name)
    assert parameter_summary(c)["params"] == expected_params(c)


def test_preset_shapes():
    c = get_config("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size) == (
        70,
        12288,
        96,
        128,
        32768,
    )
    assert c.padded_vocab_size == 150528 and c.tie_word_embeddings and c.deepnorm_alpha == pytest.approx(140**0.5)
    c6 = get_config("chatglm-6b")
    assert c6.inner_hidden_size == 16384 and c6.position_encoding_2d and c6.rotary_dim == 64
    c2 = get_config("chatglm2-6b")
    assert (c2.num_kv_heads, c2.inner_hidden_size, c2.rotary_dim, c2.norm_kind) == (2, 13696, 64, "rmsnorm")
    assert 1.2e9 < parameter_summary(get_config("glm-1b"))["params"] < 1.4e9
    t = get_config("glm-tiny")
    assert t.num_layers % 8 == 0
    assert t.num_attention_heads % 4 == 0 and t.inner_hidden_size % 4 == 0 and t.padded_vocab_size % 4 == 0


def test_derived_sizes_follow_overrides():
    c = get_config("glm-130b", hidden_size=1536, num_attention_heads=12)
    assert c.head_dim == 128 and c.inner_hidden_size == 4096
    c2 = c.override(hidden_size=768)
    assert c2.head_dim == 64 and c2.inner_hidden_size == 2048
    c3 = c.override(head_dim=32, inner_hidden_size=1000)
    assert c3.override(hidden_size=3072).head_dim == 32 and c3.override(hidden_size=3072).inner_hidden_size == 1000
    assert get_config("chatglm-6b", hidden_size=1024).inner_hidden_size == 4096  # plain GeLU: 4h


def test_round_trip_through_dict():
    c = get_config("chatglm2-6b", num_layers=2)
    assert GLMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_set_parsing():
    o = parse_overrides(
        ["num_layers=4", "dtype=float32", "tie_word_embeddings=false", "rotary_fraction=0.5", "num_kv_heads=none"]
    )
    assert o == dict(num_layers=4, dtype="float32", tie_word_embeddings=False, rotary_fraction=0.5, num_kv_heads=None)
    with pytest.raises(ConfigError, match="unknown config field"):
        parse_overrides(["num_layer=4"])
    with pytest.raises(ConfigError, match="expected int"):
        parse_overrides(["num_layers=four"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["num_layers"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_kv_heads=3), "num_attention_heads=4 is not divisible by num_kv_heads=3"),
        (dict(rotary_fraction=0.3), "rotary_fraction=0.3 of head_dim=32"),
        (dict(hidden_size=130), "hidden_size=130 is not divisible by num_attention_heads=4"),
        (dict(ffn_kind="swish"), "ffn_kind='swish'"),
        (dict(position_encoding_2d=True, rotary_fraction=0.5), "set rotary_fraction=1.0"),
        (dict(hidden_dropout=1.5), "hidden_dropout=1.5"),
        (dict(dtype="float8"), "dtype='float8'"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(quantized_matmul="triton"), "quantized_matmul='triton'"),
        (dict(quantization="int8", quantized_matmul="pallas"), "quantized_matmul=pallas is the INT4 kernel"),
        (dict(quantization_group=64, quantization_groups=2), "not both"),
        (dict(position_encoding="sinusoidal"), "position_encoding='sinusoidal'"),
        (dict(position_encoding="alibi", position_encoding_2d=True), "alibi has no 2D form"),
        (dict(position_encoding="learned", position_embedding_rows=100), "cannot hold max_sequence_length=1024"),
        (dict(position_encoding="learned", num_virtual_tokens=4), "learned position table has no row"),
        (dict(rotary_scaling="yarn"), "rotary_scaling='yarn'"),
        (dict(rotary_scaling="llama3", rotary_low_freq_factor=4.0), "rotary_scaling=llama3 needs"),
    ],
)
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_config("glm-tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("glm-7b")
    with pytest.raises(ConfigError, match="unknown config field"):
        get_config("glm-tiny").override(layers=3)


def test_model_summary_script(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "experiments" / "model_summary.py"
    spec = importlib.util.spec_from_file_location("model_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--preset", "glm-130b"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["preset"] == "glm-130b" and last["params"] == 128_697_794_560
    assert last["bytes"]["int4"] < last["bytes"]["int8"] < last["bytes"]["bf16"] < last["bytes"]["fp32"]
