"""The LLaMA family end to end: tiny random transformers LlamaForCausalLM folders (a LLaMA-2-like
one with grouped KV heads, a Llama-3.2-like one with tied embeddings and llama3 rope scaling, one
with attention and MLP biases and linear scaling) converted by `released.convert_folder`, compared
with transformers (logits, greedy generate), exported back, decoded cached, LoRA-trained, INT4."""

import json

import numpy as np
import pytest
import torch
from hf_checks import (
    assert_cached_equals_full,
    assert_greedy_matches,
    convert,
    export_reload,
    int4_greedy,
    lora_step,
    our_logits,
    save_tiny,
    torch_logits,
)
from tokenizers import Tokenizer

from glm_jax import layout_llama
from glm_jax.config import get_config
from glm_jax.convert import ConversionError
from glm_jax.export import ExportError, export_tensors
from glm_jax.families import get_family
from glm_jax.released import convert_folder

SIZES = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
)
# llama3 scaling with original_max_position_embeddings 32 over head_dim 16 and theta 1e4: the
# wavelengths 6.3 / 19.8 / 63+ fall below, between and above 32/4 .. 32/1, so all three of its
# regimes (kept, blended, divided by the factor) are in play
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
MODELS = {  # name -> (LlamaConfig fields, tokenizer style)
    "llama2": (dict(SIZES, vocab_size=400, num_key_value_heads=2), "llama2"),
    "llama3.2": (
        dict(SIZES, vocab_size=420, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
        "llama3",
    ),
    "biased": (
        dict(
            SIZES,
            vocab_size=400,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
        "llama2",
    ),
}
TEXTS = ("Hello world! The quick", "Below is an instruction that describes a task.")
STEPS = 5  # greedy, cached and INT4 decoding share their prompts and lengths: one compile each per config


def _random_model(fields):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: move them so a swapped leaf shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (torch model, its saved folder with a tokenizer)."""
    out = {}
    for name, (fields, style) in MODELS.items():
        model = _random_model(fields)
        out[name] = model, save_tiny(model, tmp_path_factory.mktemp(name), style)
    return out


@pytest.fixture(scope="module")
def converted(folders):
    """name -> (config, params) from released.convert_folder in float32."""
    return {name: convert(folder) for name, (_, folder) in folders.items()}


def _tokenizer(folder):
    return get_family("llama").load_tokenizer(f"{folder}/tokenizer.json")


def _prompts(folder):
    """The texts as `generate.py --prompt T` gives them: the folder's tokenizer, post-processor
    included (<s> / <|begin_of_text|> prepended)."""
    tok = _tokenizer(folder)
    return [get_family("llama").generation_prompt(tok, t) for t in TEXTS]


def _ids(n=12):
    return np.random.default_rng(0).integers(0, 400, (2, n))


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_logits_match_transformers(folders, converted, name):
    model, folder = folders[name]
    config, params = converted[name]
    result = convert_folder(folder, dtype="float32")
    assert (result.layout, result.family) == ("llama", "llama")
    assert result.tokenizer_file.endswith("tokenizer.json")
    fields = MODELS[name][0]
    assert config.num_kv_heads == fields.get("num_key_value_heads", 4)
    assert config.tie_word_embeddings == fields.get("tie_word_embeddings", False)
    assert "output_layer" not in params if config.tie_word_embeddings else "output_layer" in params
    np.testing.assert_allclose(our_logits(config, params, _ids()), torch_logits(model, _ids()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["biased", "llama3.2"])
def test_greedy_continuation_matches_generate(folders, converted, name):
    model, folder = folders[name]
    prompts = _prompts(folder)
    lead = Tokenizer.from_file(f"{folder}/tokenizer.json").encode(TEXTS[0]).ids  # transformers' tokenizer(text)
    assert prompts[0] == lead and lead[0] == _tokenizer(folder).bos_id
    assert_greedy_matches(*converted[name], model, prompts, steps=STEPS)


@pytest.mark.parametrize("name", ["llama2", "llama3.2"])
def test_export_loads_in_transformers(folders, converted, tmp_path_factory, name):
    from transformers import LlamaForCausalLM

    model, folder = folders[name]
    config, params = converted[name]
    tok = _tokenizer(folder)
    out = tmp_path_factory.mktemp(f"{name}-out")
    reloaded = export_reload(config, params, "llama", LlamaForCausalLM, out, tok.specials)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    np.testing.assert_allclose(torch_logits(reloaded, _ids()), torch_logits(model, _ids()), atol=1e-5)


def test_cached_decoding_equals_full_recomputation(folders, converted):
    assert_cached_equals_full(*converted["llama3.2"], _prompts(folders["llama3.2"][1]), steps=STEPS)


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_lora_step(converted):
    losses = lora_step(*converted["llama2"])
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0]


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_int4_decoding_with_biases(folders, converted):
    config, params = converted["biased"]
    q_tokens, f_tokens, q_first, f_first = int4_greedy(config, params, _prompts(folders["biased"][1]), steps=STEPS)
    assert [len(t) for t in q_tokens] == [STEPS, STEPS]
    assert np.all(np.isfinite(q_first))
    np.testing.assert_array_equal(q_first.argmax(-1), f_first.argmax(-1))


def test_bare_llama_model_converts(folders, converted, tmp_path_factory):
    """LlamaModel.save_pretrained names tensors without `model.`; tied, it is the whole model."""
    model, _ = folders["llama3.2"]
    folder = tmp_path_factory.mktemp("bare")
    model.model.save_pretrained(folder)
    names = json.load(open(folder / "config.json"))["architectures"]
    assert names == ["LlamaModel"]
    config, params = convert(folder)
    assert config == converted["llama3.2"][0]
    np.testing.assert_allclose(our_logits(config, params, _ids()), torch_logits(model, _ids()), atol=1e-4, rtol=1e-4)


def test_old_style_rope_fields_read_as_new():
    """A LLaMA-3.1-style file (rope_theta beside rope_scaling) and a Code-Llama-style one (`type`)."""
    base = {**SIZES, "model_type": "llama", "vocab_size": 400}
    old = {**base, "rope_theta": 10000.0, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    assert layout_llama.config_from(old) == layout_llama.config_from({**base, "rope_parameters": LLAMA3_ROPE})
    linear = layout_llama.config_from({**base, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (linear.rotary_scaling, linear.rotary_scaling_factor, linear.rotary_base) == ("linear", 4.0, 1e6)


def test_instruction_recipes_detected_by_name():
    assert layout_llama.family_of({"_name_or_path": "tloen/alpaca-lora-7b"}) == "alpaca"
    assert layout_llama.family_of({"_name_or_path": "BelleGroup/BELLE-LLaMA-EXT-13B"}) == "belle"
    assert layout_llama.family_of({"_name_or_path": "meta-llama/Llama-2-7b-hf"}) == "llama"


@pytest.mark.parametrize(
    "change,named",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
    ],
)
def test_unsupported_configs_are_conversion_errors(change, named):
    with pytest.raises(ConversionError, match=named):
        layout_llama.config_from({**SIZES, "model_type": "llama", "vocab_size": 400, **change})


def test_export_refuses_a_block_llama_cannot_hold(converted):
    config, params = converted["llama2"]
    with pytest.raises(ExportError, match="rotary_interleaved"):
        export_tensors(params, config.override(rotary_interleaved=True), "llama", "float32")
    glm = get_config("glm-130b", num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=128)
    with pytest.raises(ExportError, match="norm_kind.*norm_placement.*ffn_kind"):
        export_tensors({}, glm, "llama", "float32")
    for field in ("pre_seq_len", "adapter_size"):  # no released layout holds a prefix or adapters
        with pytest.raises(ExportError, match=f"{field}=4"):
            export_tensors({}, config.override(**{field: 4}), "llama", "float32")
