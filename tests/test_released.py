"""Released folders in and out: tiny checkpoints written in each released layout (.bin shards with
their index, safetensors shards), converted and compared with float64 numpy forwards from docs/reference.md;
causal decoding; chat through the library and generate.py; convert -> quantize -> evaluate; export
round trips; bad folders."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward
from reference_numpy import chatglm2_forward, glm_forward, random_chatglm2_state_dict, random_glm130b_state_dict

from glm_jax.convert import ConversionError
from glm_jax.families import get_family
from glm_jax.generate import Generator
from glm_jax.released import ShardedTensors, convert_folder, detect
from glm_jax.tokenizer import SHARED_TOKENIZERS

ROOT = pathlib.Path(__file__).parents[1]
C2_TOKENIZER = pathlib.Path(SHARED_TOKENIZERS) / "chatglm2-6b" / "tokenizer.model"
needs_tokenizer = pytest.mark.skipif(not C2_TOKENIZER.is_file(), reason="../shared tokenizers absent")


def write_folder(folder, sd, config_json, fmt="bin", shards=2, dtype=np.float16, tokenizer=None, extra=()):
    """A released Hugging Face folder: tensors dealt round-robin over the shards (so one layer's
    tensors sit in different files, as the index allows), the index, config.json, tokenizer."""
    import torch

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    names = sorted(sd) + [n for n, _ in extra]
    tensors = {**{n: np.asarray(sd[n], dtype) for n in sd}, **dict(extra)}
    weight_map = {}
    for k in range(shards):
        file = (
            f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            if fmt == "bin"
            else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        )
        part = {n: tensors[n] for n in names[k::shards]}
        if fmt == "bin":
            torch.save({n: torch.from_numpy(np.ascontiguousarray(x)) for n, x in part.items()}, folder / file)
        else:
            from safetensors.numpy import save_file

            save_file({n: np.ascontiguousarray(x) for n, x in part.items()}, str(folder / file))
        weight_map.update({n: file for n in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config_json))
    if tokenizer:
        shutil.copyfile(tokenizer, folder / pathlib.Path(tokenizer).name)
    return folder


def chatglm6b_json(**kw):
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "vocab_size": 300,
        "inner_hidden_size": 128,
        "layernorm_epsilon": 1e-5,
        "max_sequence_length": 2048,
        "position_encoding_2d": True,
        **kw,
    }


def chatglm2_json(**kw):
    return {
        "model_type": "chatglm",
        "_name_or_path": "THUDM/chatglm2-6b",
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "kv_channels": 8,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "ffn_hidden_size": 48,
        "padded_vocab_size": 300,
        "layernorm_epsilon": 1e-5,
        "seq_length": 512,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "torch_dtype": "float16",
        **kw,
    }


def _f64(sd):
    return {k: np.asarray(v, np.float16).astype(np.float64) for k, v in sd.items()}  # what the files hold


def _batch(**arrays):
    return {k: jnp.asarray(np.asarray(v)[None], jnp.int32) for k, v in arrays.items()}


def test_chatglm6b_bin_shards_match_the_numpy_forward(tmp_path):
    """2D rotary with fp16-rounded inverse frequencies on a row of 300 positions, DeepNorm alpha
    fixed at sqrt(2 x 28) on a 2-layer model, separate lm_head; `inv_freq` buffers ignored."""
    from glm_jax.convert import config_from_chatglm

    c = config_from_chatglm(chatglm6b_json(), dtype="float32")
    sd = random_glm130b_state_dict(c, np.random.default_rng(0), scale=0.5)  # sharp attention: rotary matters
    folder = write_folder(
        tmp_path / "c6",
        sd,
        chatglm6b_json(),
        extra=[("transformer.layers.0.attention.rotary_emb.inv_freq", np.ones(8, np.float16))],
    )
    assert detect(str(folder))[:2] == ("chatglm", "chatglm-6b")
    kept = convert_folder(str(folder))  # as it ships: fp16 weights, fp16 compute
    assert (
        kept.config.param_dtype == kept.config.dtype == "float16"
        and kept.params["layers"]["mlp"]["dense_4h_to_h"]["kernel"].dtype == np.float16
    )
    r = convert_folder(str(folder), dtype="float32")  # --dtype sets the compute dtype too
    assert r.config.param_dtype == r.config.dtype == "float32"
    assert r.family == "chatglm-6b" and r.config.deepnorm_alpha == pytest.approx(56**0.5)
    n = 290  # context (gMASK last), then sop and 9 generated tokens at the gMASK position, block 1..10
    s = n + 10
    tokens = np.random.default_rng(1).integers(0, 300, s)
    pos = np.concatenate([np.arange(n), np.full(10, n - 1)])
    block = np.concatenate([np.zeros(n, int), np.arange(1, 11)])
    seg, prefix = np.ones(s, int), (np.arange(s) < n).astype(int)
    logits = np.asarray(
        forward(
            r.config,
            r.params,
            _batch(tokens=tokens, position_ids=pos, block_position_ids=block, segment_ids=seg, prefix_mask=prefix),
        )
    )[0]
    ref = glm_forward(_f64(sd), r.config, tokens, pos, block, seg, prefix)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(logits, ref, atol=1e-5 * scale, rtol=1e-5)
    exact_freq = glm_forward(_f64(sd), r.config.override(rotary_fp16_inv_freq=False), tokens, pos, block, seg, prefix)
    assert np.abs(exact_freq - ref).max() > 100 * 1e-5 * scale  # the fp16 rounding matters at these positions


@pytest.mark.parametrize(
    "fmt,name,family",
    [("safetensors", "THUDM/chatglm2-6b", "chatglm2-6b"), ("bin", "THUDM/chatglm3-6b", "chatglm3-6b")],
)
def test_chatglm2_shards_match_the_numpy_forward(tmp_path, fmt, name, family):
    """MQA with 2 KV groups, QKV bias, the [q | k | v] split, interleaved half rotary, causal."""
    from glm_jax.convert import config_from_chatglm2

    cfg = chatglm2_json(_name_or_path=name)
    c = config_from_chatglm2(cfg)
    sd = random_chatglm2_state_dict(c, np.random.default_rng(0))
    folder = write_folder(
        tmp_path / "c2",
        sd,
        cfg,
        fmt=fmt,
        shards=3,
        extra=[("transformer.rotary_pos_emb.inv_freq", np.ones(4, np.float16))],
    )
    r = convert_folder(str(folder), dtype="float32")
    assert r.family == family and r.layout == "chatglm2" and get_family(r.family).causal
    s = 40
    tokens = np.random.default_rng(2).integers(0, 300, s)
    z = np.zeros(s, int)
    logits = np.asarray(
        forward(
            r.config,
            r.params,
            _batch(tokens=tokens, position_ids=np.arange(s), block_position_ids=z, segment_ids=z + 1, prefix_mask=z),
        )
    )[0]
    np.testing.assert_allclose(logits, chatglm2_forward(_f64(sd), r.config, tokens), atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def chatglm2_tiny(tmp_path_factory):
    """A tiny ChatGLM2 with the real tokenizer's vocabulary (65,024 rows), as .bin shards."""
    from glm_jax.convert import config_from_chatglm2

    cfg = chatglm2_json(padded_vocab_size=65024)
    c = config_from_chatglm2(cfg)
    sd = random_chatglm2_state_dict(c, np.random.default_rng(3), scale=0.2)
    folder = write_folder(tmp_path_factory.mktemp("c2") / "chatglm2-tiny", sd, cfg, tokenizer=C2_TOKENIZER)
    return folder, sd


def _causal_logits(config, params, tokens):
    s = len(tokens)
    z = np.zeros(s, int)
    return np.asarray(
        forward(
            config,
            params,
            _batch(tokens=tokens, position_ids=np.arange(s), block_position_ids=z, segment_ids=z + 1, prefix_mask=z),
        )
    )[0]


def test_causal_cached_decoding_equals_full_recomputation():
    from glm_jax.convert import config_from_chatglm2, from_chatglm2_state_dict
    from glm_jax.tokenizer import SpecialIds

    c = config_from_chatglm2(chatglm2_json(), param_dtype="float32", dtype="float32")
    params = from_chatglm2_state_dict(random_chatglm2_state_dict(c, np.random.default_rng(8), scale=0.3), c)
    ids = SpecialIds(mask=290, gmask=291, smask=292, sop=293, eop=294, eos=2, pad=0)
    gen = Generator(c, params, ids=ids, causal=True)
    prompts = [[291, 293, 30, 101, 102, 103, 104], [291, 293, 7, 8]]  # ragged
    out = gen.generate(prompts, 8, stop_tokens=())
    for prompt, generated in zip(prompts, out):
        assert len(generated) == 8
        full = list(prompt) + generated
        logits = _causal_logits(c, params, np.array(full))
        assert list(np.argmax(logits[len(prompt) - 1 : -1], -1)) == generated


@needs_tokenizer
def test_a_chatglm2_chat_turn_through_the_library(chatglm2_tiny):
    r = convert_folder(str(chatglm2_tiny[0]), dtype="float32")
    fam = get_family(r.family)
    tok = fam.load_tokenizer(r.tokenizer_file)
    ids = fam.chat_prompt(tok, [("你好", "你好！")], "今天天气怎么样")
    assert ids[:2] == [64790, 64792] and tok.decode(ids).startswith("[Round 1]\n\n问：你好")
    gen = Generator(r.config, r.params, ids=tok.specials, causal=fam.causal)
    out = gen.generate([ids], 6, stop_tokens=fam.stop_ids(tok))[0]
    ref = _causal_logits(r.config, r.params, np.array(ids + out))
    assert list(np.argmax(ref[len(ids) - 1 : -1], -1)) == out[: len(out)]
    assert isinstance(fam.postprocess(tok.decode(out)), str)


def _run(script, *args, stdin=None):
    """A script's main() in this process (no new JAX start-up) -> (returncode, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"script_{script}", ROOT / "experiments" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@needs_tokenizer
@pytest.mark.slow
def test_convert_chat_quantize_evaluate_export_end_to_end(chatglm2_tiny, tmp_path):
    folder, sd = chatglm2_tiny
    p = _run("convert", "--input", folder, "--out", tmp_path / "conv")
    assert p.returncode == 0, p.stderr
    conv = json.loads(p.stdout.strip().splitlines()[-1])
    assert (conv["layout"], conv["family"], conv["param_dtype"]) == ("chatglm2", "chatglm2-6b", "float16")
    assert (tmp_path / "conv" / "tokenizer" / "tokenizer.model").is_file()
    # chat with no family or tokenizer flag: both come from the checkpoint
    p = _run(
        "generate", "--checkpoint", tmp_path / "conv", "--chat", "--json", "--max-new", "5", stdin="你好\n\n再说一遍\n"
    )
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert [t["query"] for t in turns] == ["你好", "再说一遍"]
    tok = get_family("chatglm2-6b").load_tokenizer()
    for t in turns:
        assert t["reply"] == get_family("chatglm2-6b").postprocess(tok.decode(t["ids"])) and len(t["ids"]) <= 5
    p = _run("quantize", "--checkpoint", tmp_path / "conv", "--out", tmp_path / "int4")
    assert p.returncode == 0, p.stderr
    p = _run("lambada_eval", "--checkpoint", tmp_path / "int4", "--limit", "4", "--batch", "4")
    assert p.returncode == 0, p.stderr
    lam = json.loads(p.stdout.strip().splitlines()[-1])
    assert lam["family"] == "chatglm2-6b" and lam["n"] == 4 and 0 <= lam["accuracy"] <= 1
    p = _run("export", "--checkpoint", tmp_path / "conv", "--out", tmp_path / "exp", "--format", "chatglm2")
    assert p.returncode == 0, p.stderr
    back = convert_folder(str(tmp_path / "exp"))
    first = convert_folder(str(folder))
    for a, b in zip(_leaves(back.params), _leaves(first.params)):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_export_hf_glm_round_trips_through_transformers(tmp_path):
    import torch
    from transformers import GlmForCausalLM

    from glm_jax.convert import config_from_chatglm2
    from glm_jax.export import export_tensors
    from glm_jax.export import write_folder as export_folder

    c = config_from_chatglm2(chatglm2_json(), param_dtype="float32", dtype="float32")
    sd = random_chatglm2_state_dict(c, np.random.default_rng(4))
    from glm_jax.convert import from_chatglm2_state_dict

    params = from_chatglm2_state_dict(sd, c)
    tensors, cfg = export_tensors(params, c, "hf-glm", "float32")
    export_folder(str(tmp_path / "hf"), tensors, cfg)
    model = GlmForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(5).integers(0, 300, 24)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens[None])).logits[0].numpy()
    np.testing.assert_allclose(_causal_logits(c, params, tokens), want, atol=1e-4, rtol=1e-4)
    back = convert_folder(str(tmp_path / "hf"), family="chatglm2-6b", dtype="float32")
    for a, b in zip(_leaves(back.params), _leaves(params)):
        np.testing.assert_allclose(a, b, atol=0)


def test_export_refuses_another_block():
    from glm_jax.config import get_config
    from glm_jax.export import ExportError, export_tensors

    with pytest.raises(ExportError, match="norm_kind='layernorm'"):
        export_tensors({}, get_config("glm-tiny"), "hf-glm")
    with pytest.raises(ExportError, match="unknown export format"):
        export_tensors({}, get_config("chatglm2-6b"), "onnx")


def test_bad_folders_are_clear_errors(tmp_path):
    from glm_jax.convert import config_from_chatglm2

    cfg = chatglm2_json()
    sd = random_chatglm2_state_dict(config_from_chatglm2(cfg), np.random.default_rng(6))
    good = write_folder(tmp_path / "good", sd, cfg, fmt="safetensors")

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    missing = broken("missing", lambda f: (f / "model-00002-of-00002.safetensors").unlink())
    with pytest.raises(ConversionError, match="missing shard file.*model-00002-of-00002.safetensors"):
        convert_folder(str(missing))
    unknown = broken("unknown", lambda f: (f / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"})))
    with pytest.raises(ConversionError, match="unknown model_type 'gpt2'"):
        convert_folder(str(unknown))
    bad = {
        **sd,
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight": np.zeros((32, 47)),
        "extra.weight": np.zeros(3),
    }
    odd = write_folder(tmp_path / "odd", bad, cfg, fmt="safetensors")
    with pytest.raises(ConversionError) as e:
        convert_folder(str(odd))
    assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight (in model-0000" in str(e.value)
    assert "has shape (32, 47), expected (32, 48)" in str(e.value) and "unexpected tensor extra.weight" in str(e.value)
    # the script: exit 2, the error on stderr, no output folder left behind
    for folder, words in ((missing, "missing shard"), (odd, "expected (32, 48)")):
        p = _run("convert", "--input", folder, "--out", tmp_path / "never")
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never.partial*"))


@needs_tokenizer
def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    cfg = chatglm2_json()  # 300 rows: the real tokenizer's ids do not fit
    from glm_jax.convert import config_from_chatglm2

    sd = random_chatglm2_state_dict(config_from_chatglm2(cfg), np.random.default_rng(7))
    folder = write_folder(tmp_path / "small", sd, cfg, fmt="safetensors", tokenizer=C2_TOKENIZER)
    p = _run("convert", "--input", folder, "--out", tmp_path / "never")
    assert p.returncode == 2 and "only 300 embedding rows" in p.stderr and not (tmp_path / "never").exists()


def test_sharded_tensors_follow_the_index(tmp_path):
    sd = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(4), "c": np.zeros((1, 1))}
    folder = write_folder(tmp_path / "f", sd, {"model_type": "chatglm"}, fmt="safetensors", shards=2)
    t = ShardedTensors.open(str(folder))
    assert sorted(t) == ["a", "b", "c"] and t.shape_of("a") == (2, 3) and t.dtype_of("b") == "float16"
    assert t.where("b") == " (in model-00002-of-00002.safetensors)"
    np.testing.assert_array_equal(t["a"], sd["a"].astype(np.float16))
