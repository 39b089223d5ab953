"""The original GLM (THUDM/GLM's GLMModel, GLM-10B / GLM-Large) as the `thudm-glm` layout.

It has no transformers class and its remote code is not available offline: a tiny random state
dict under THUDM's names, saved as the Hub ships it (bare names, pytorch_model.bin) and as
`GLMForConditionalGeneration.save_pretrained` would (`glm.` names, safetensors), is converted by
`released.convert_folder` and compared with a float64 numpy GLMModel written from the paper and
THUDM's code (tests/reference_glm_numpy.py)."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from hf_checks import PADDED, assert_cached_equals_full, convert, int4_greedy, lora_step
from jit_forward import forward
from reference_glm_numpy import blank_infilling, glm_logits

from glm_jax import layout_thudm_glm, layouts, released
from glm_jax.convert import ConversionError
from glm_jax.tokenizer import SpecialIds

LAYERS, HIDDEN, HEADS, VOCAB, MAX_LEN = 2, 32, 4, 300, 64
# ids of the blank tokens in the tiny vocabulary (GLM's tokenizers put them after the text pieces)
IDS = SpecialIds(mask=290, smask=291, gmask=292, sop=293, eop=294, eos=1, pad=0)
# a [MASK] blank to fill and a [gMASK] continuation (ragged: one batch)
PROMPTS = [[5, 6, 7, IDS.mask, 8, 9], [10, 11, 12, 13, 14, 15, 16, IDS.gmask]]
CONFIG_JSON = {  # the fields THUDM/glm-10b's config.json has, at tiny sizes
    "architectures": ["GLMModel"],
    "model_type": "glm",
    "num_layers": LAYERS,
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "vocab_size": VOCAB,
    "max_sequence_length": MAX_LEN,
    "block_position_encoding": True,
    "relative_encoding": False,
    "output_predict": True,
    "attention_scale": 1.0,
    "embedding_dropout_prob": 0.1,
    "attention_dropout_prob": 0.1,
    "output_dropout_prob": 0.1,
    "checkpoint_activations": False,
    "parallel_output": True,
    "spell_length": None,
    "torch_dtype": "float32",
}


def thudm_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random GLMModel state dict under the Hub's bare names, float32: [out, in] linears,
    position tables of max_sequence_length + 1 rows (block_position_encoding)."""
    rng = np.random.default_rng(seed)
    e, f = HIDDEN, 4 * HIDDEN

    def normal(*shape, std=0.2, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    state = {
        "word_embeddings.weight": normal(VOCAB, e, std=0.5),
        "transformer.position_embeddings.weight": normal(MAX_LEN + 1, e, std=0.5),
        "transformer.block_position_embeddings.weight": normal(MAX_LEN + 1, e, std=0.5),
        "transformer.final_layernorm.weight": normal(e, mean=1.0, std=0.1),
        "transformer.final_layernorm.bias": normal(e, std=0.1),
    }
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        state.update(
            {
                p + "input_layernorm.weight": normal(e, mean=1.0, std=0.1),
                p + "input_layernorm.bias": normal(e, std=0.1),
                p + "attention.query_key_value.weight": normal(3 * e, e),
                p + "attention.query_key_value.bias": normal(3 * e, std=0.1),
                p + "attention.dense.weight": normal(e, e),
                p + "attention.dense.bias": normal(e, std=0.1),
                p + "post_attention_layernorm.weight": normal(e, mean=1.0, std=0.1),
                p + "post_attention_layernorm.bias": normal(e, std=0.1),
                p + "mlp.dense_h_to_4h.weight": normal(f, e),
                p + "mlp.dense_h_to_4h.bias": normal(f, std=0.1),
                p + "mlp.dense_4h_to_h.weight": normal(e, f, std=0.1),
                p + "mlp.dense_4h_to_h.bias": normal(e, std=0.1),
            }
        )
    return state


def write_folder(folder, state: dict, cfg: dict, prefixed: bool = False) -> str:
    """config.json plus the weights: bare names in pytorch_model.bin (torch.save, as the Hub's
    files are) or `glm.` names in model.safetensors."""
    import torch

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    if prefixed:
        from safetensors.numpy import save_file

        save_file({"glm." + k: v for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


@pytest.fixture(scope="module")
def state():
    return thudm_state_dict()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, state):
    return write_folder(tmp_path_factory.mktemp("glm10b_bare"), state, CONFIG_JSON)


@pytest.fixture(scope="module")
def model(folder):
    return convert(folder)


def our_batch(rows, width: int | None = None) -> dict:
    """(tokens [S], position_ids [2, S], sep) rows -> our batch, right-padded to `width` (default:
    the longest): part A (positions < sep) is prefix_mask 1, padding is segment 0."""
    width = width or max(len(tokens) for tokens, _, _ in rows)
    batch = {k: np.zeros((len(rows), width), np.int32) for k in ("tokens", "position_ids", "block_position_ids")}
    batch["segment_ids"] = np.zeros((len(rows), width), np.int32)
    batch["prefix_mask"] = np.zeros((len(rows), width), np.int32)
    for b, (tokens, positions, sep) in enumerate(rows):
        n = len(tokens)
        batch["tokens"][b, :n] = tokens
        batch["position_ids"][b, :n], batch["block_position_ids"][b, :n] = positions
        batch["segment_ids"][b, :n] = 1
        batch["prefix_mask"][b, :sep] = 1
    return {k: jnp.asarray(v) for k, v in batch.items()}


def blank_rows():
    """Two blank-infilling samples: two [MASK] spans; one [sMASK] span (shorter: padded)."""
    m, s = IDS.mask, IDS.smask
    return [
        blank_infilling([5, 6, m, 7, 8, 9, m, 10, 11, 12], [(2, [20, 21, 22]), (6, [23, 24])], IDS.sop),
        blank_infilling([30, 31, 32, s, 33, 34, 35], [(3, [40, 41, 42])], IDS.sop),
    ]


def test_layout_is_detected_apart_from_transformers_glm(folder):
    assert released.detect(folder)[:2] == ("thudm-glm", "glm-10b")
    from transformers import GlmConfig

    hf_glm = GlmConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300).to_dict()
    assert not layout_thudm_glm.matches(hf_glm) and layouts.detect(hf_glm) is None
    config = layout_thudm_glm.config_from(CONFIG_JSON, dtype="float32")
    assert (config.learned_position_rows, config.ffn_kind, config.norm_placement) == (MAX_LEN + 1, "gelu_tanh", "pre")
    # THUDM's attention_scale rescaling only shifts each softmax row: the same model
    assert layout_thudm_glm.config_from({**CONFIG_JSON, "attention_scale": 8.0}) == layout_thudm_glm.config_from(
        CONFIG_JSON
    )


def reference(state, row, **kw) -> np.ndarray:
    """The numpy GLMModel's logits [S, V] for one (tokens, position_ids, sep) row."""
    tokens, positions, sep = row
    return glm_logits(state, tokens[None], positions[None], np.array([sep]), HEADS, **kw)[0]


def test_blank_infilling_logits_equal_the_numpy_glm(tmp_path_factory, state, folder, model):
    config, params = model
    rows = blank_rows()
    ours = np.asarray(forward(config, params, our_batch(rows)), np.float64)
    for b, row in enumerate(rows):
        np.testing.assert_allclose(ours[b, : len(row[0])], reference(state, row), atol=1e-4, rtol=1e-4)
    # THUDM's attention_scale form of the scores is the same softmax
    np.testing.assert_allclose(reference(state, rows[0], attention_scale=8.0), reference(state, rows[0]), atol=1e-9)
    # the `glm.` names (GLMForConditionalGeneration.save_pretrained) convert to the same tree
    prefixed = write_folder(tmp_path_factory.mktemp("glm10b_prefixed"), state, CONFIG_JSON, prefixed=True)
    mine, theirs = dict(_flatten(params)), dict(_flatten(convert(prefixed)[1]))
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    # the Hub's remote modeling_glm.py uses transformers' erf gelu (THUDM's training code the tanh
    # one, our default): --set ffn_kind=gelu gives the remote code's logits
    erf_config, erf_params = convert(folder, overrides={"ffn_kind": "gelu"})
    erf = np.asarray(forward(erf_config, erf_params, our_batch(rows[:1])), np.float64)[0]
    want = reference(state, rows[0], approximate="erf")
    np.testing.assert_allclose(erf, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - reference(state, rows[0])).max() > 1e-3  # the two GeLUs are told apart


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield "/".join(prefix + (key,)), np.asarray(value)


def test_cached_mask_decoding_equals_full_recomputation(state, model):
    config, params = model
    assert_cached_equals_full(config, params, PROMPTS, steps=3, ids=IDS, causal=False)
    # the first decoded step is GLM's generation layout: context + sop at the mask's position, block 1
    for prompt in PROMPTS:
        n, where = len(prompt), prompt.index(IDS.mask if IDS.mask in prompt else IDS.gmask)
        tokens = np.array([prompt + [IDS.sop]])
        positions = np.array([[list(range(n)) + [where], [0] * n + [1]]])
        want = glm_logits(state, tokens, positions, np.array([n]), HEADS)[0, -1]
        batch = our_batch([(tokens[0], positions[0], n)], width=PADDED)  # the full recomputation's shape
        got = np.asarray(forward(config, params, batch), np.float64)[0, n]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_lora_step(model):
    losses = lora_step(*model)
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


@pytest.mark.slow  # a Trainer / INT4 compile: the full suite runs it
def test_int4_decoding(model):
    q_tokens, f_tokens, q_first, f_first = int4_greedy(*model, PROMPTS, 3, ids=IDS, causal=False)
    assert [t[0] for t in q_tokens] == [t[0] for t in f_tokens]
    assert not np.array_equal(q_first, f_first) and np.corrcoef(q_first.ravel(), f_first.ravel())[0, 1] > 0.95


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("relative_encoding", True, "relative_encoding true"),
        ("block_position_encoding", False, "block_position_encoding false"),
    ],
)
def test_unsupported_variants_are_refused(tmp_path, folder, field, value, message):
    shutil.copy(os.path.join(folder, "pytorch_model.bin"), tmp_path / "pytorch_model.bin")
    with open(tmp_path / "config.json", "w") as fh:
        json.dump({**CONFIG_JSON, field: value}, fh)
    with pytest.raises(ConversionError, match=message):
        released.convert_folder(str(tmp_path), dtype="float32")


def test_one_dimensional_position_tables_are_named_in_the_error(tmp_path, state):
    short = {**state, "transformer.position_embeddings.weight": state["transformer.position_embeddings.weight"][:-1]}
    write_folder(tmp_path, short, CONFIG_JSON)
    with pytest.raises(ConversionError, match=r"glm.transformer.position_embeddings.weight.*\(64, 32\)"):
        released.convert_folder(str(tmp_path), dtype="float32")
