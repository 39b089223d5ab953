"""The Hugging Face tokenizers (kind "hf") and the families on them (llama, alpaca, belle, bloom,
opt, glm-10b): ids against transformers' own tokenizer of the same folder, chat prompts against
the released chat templates and reference texts, stop ids from the sidecar files, the training
masks, and generate.py's plain continuation against transformers' `generate`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
from hf_tokenizers import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, write_tokenizer
from script_runs import ROOT

from glm_jax.families import ALPACA, ALPACA_INPUT, FamilyError, get_family
from glm_jax.sft import conversation
from glm_jax.tokenizer import HFTokenizer, TokenizerError, check_blanks, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world! 你好，世界。", "Below is an instruction.\n\n### Response:\n", "The fox, 1 2 3."]
SYSTEM = "You are a helpful assistant."
HISTORY = [("Hi there", "Hello! How can I help?"), ("你好", "你好，今天天气很好。")]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """style -> a folder with that style's tokenizer.json and sidecars."""
    root = tmp_path_factory.mktemp("hf_tok")
    out = {}
    for style in ("llama2", "llama3", "bloom", "opt", "glm"):
        write_tokenizer(str(root / style), style)
        out[style] = str(root / style)
    return out


def ours(folder) -> HFTokenizer:
    return load_tokenizer("hf", os.path.join(folder, "tokenizer.json"))


def theirs(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---- the tokenizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["llama2", "llama3", "bloom", "opt", "glm"])
def test_ids_and_text_match_transformers(folders, style):
    tok, hf = ours(folders[style]), theirs(folders[style])
    assert tok.vocab_size == len(hf)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode_with_specials(text) == hf(text)["input_ids"]  # the post-processor's specials
        assert tok.decode(ids) == text
        with_specials = tok.encode_with_specials(text)
        assert tok.decode(with_specials) == hf.decode(with_specials, skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.id_to_piece(tok.eos_id) == hf.eos_token


def test_post_processors_add_each_models_specials(folders):
    first = {style: ours(folders[style]).encode_with_specials("Hello")[0] for style in folders}
    glm = ours(folders["glm"])
    assert first["llama2"] == ours(folders["llama2"]).bos_id == 1  # <s>
    assert first["llama3"] == ours(folders["llama3"]).token_id("<|begin_of_text|>")
    assert first["opt"] == 2  # OPT prepends </s>
    assert ours(folders["bloom"]).encode_with_specials("Hello") == ours(folders["bloom"]).encode("Hello")
    assert glm.encode_with_specials("Hello") == [glm.cls_id] + glm.encode("Hello") + [glm.eos_id]


def test_special_ids_and_stop_ids_from_sidecars(folders):
    llama2, llama3, bloom, opt, glm = (ours(folders[s]) for s in ("llama2", "llama3", "bloom", "opt", "glm"))
    assert (llama2.bos_id, llama2.eos_id, llama2.stop_ids) == (1, 2, (2,))
    assert llama2.pad_id == 0  # generation_config.json pad_token_id (LLaMA's tokenizer has no pad)
    eot, end = llama3.token_id("<|eot_id|>"), llama3.token_id("<|end_of_text|>")
    assert llama3.eos_id == eot and llama3.stop_ids == (end, eot)  # eos_token_id as a list
    assert (bloom.bos_id, bloom.eos_id, bloom.pad_id) == (1, 2, 3)
    assert (opt.bos_id, opt.eos_id, opt.pad_id) == (2, 2, 1)
    for tok in (llama2, llama3, bloom, opt):  # no GLM blanks: they are the bos, eop the eos
        assert not tok.has_blanks
        assert tok.specials.gmask == tok.specials.sop == tok.bos_id and tok.specials.eop == tok.eos_id
    assert glm.has_blanks and glm.bos_id is None
    names = dict(mask="[MASK]", gmask="[gMASK]", smask="[sMASK]", sop="<|startofpiece|>", eop="<|endofpiece|>")
    assert {k: getattr(glm.specials, k) for k in names} == {k: glm.token_id(v) for k, v in names.items()}
    assert glm.cls_id == glm.token_id("[CLS]") and glm.eos_id == glm.pad_id == glm.token_id("<|endoftext|>")


def test_sidecar_fallbacks_and_errors(folders, tmp_path):
    folder = tmp_path / "llama3"
    shutil.copytree(folders["llama3"], folder)
    path = str(folder / "tokenizer.json")
    eot = ours(str(folder)).token_id("<|eot_id|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # an AddedToken dict, and stop ids from config.json when generation_config.json is absent
    config["eos_token"] = {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    os.remove(folder / "generation_config.json")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": eot, "bos_token_id": 400}))
    tok = HFTokenizer(path)
    assert tok.eos_id == tok.token_id("<|end_of_text|>") and tok.stop_ids == (eot,)
    os.remove(folder / "config.json")
    assert HFTokenizer(path).stop_ids == (tok.eos_id,)  # nothing else: the eos
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="<|nope|>"):
        HFTokenizer(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        os.remove(folder / name)
    with pytest.raises(TokenizerError, match="no eos token"):
        HFTokenizer(path)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer("hf")


def test_spelled_specials_are_text_except_in_encode_with_specials(folders):
    tok = ours(folders["llama2"])
    assert tok.bos_id not in tok.encode("a <s> b")
    assert tok.encode_with_specials("a <s> b").count(tok.bos_id) == 2  # as transformers' tokenizer(text)
    assert tok.decode([tok.bos_id, *tok.encode("Hello"), tok.eos_id, tok.pad_id]) == "Hello"


def test_converted_checkpoints_keep_the_sidecars(folders, tmp_path):
    from glm_jax.checkpoints import copy_tokenizer

    rel = copy_tokenizer(os.path.join(folders["llama3"], "tokenizer.json"), str(tmp_path))
    copied = ours(os.path.dirname(str(tmp_path / rel)))
    assert copied.stop_ids == ours(folders["llama3"]).stop_ids and copied.eos_id == copied.token_id("<|eot_id|>")


def test_glm_objective_refuses_a_tokenizer_without_blanks(folders, tmp_path):
    check_blanks(ours(folders["glm"]))
    with pytest.raises(TokenizerError, match="--family glm"):
        check_blanks(ours(folders["opt"]))
    code, _, err = run_script(
        "pretrain",
        "--family",
        "llama",
        "--tokenizer",
        f"{folders['llama2']}/tokenizer.json",
        "--ckpt-dir",
        tmp_path / "ck",
        "--log-dir",
        tmp_path / "log",
        "--steps",
        "1",
    )
    assert code == 2 and "--family glm" in err and "[gMASK]" in err


# ---- the families' prompts ---------------------------------------------------------------------------
def messages(history, query, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out + [{"role": "user", "content": query}]


def template_ids(hf, template, msgs, generation_prompt):
    text = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)
    return hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("rounds", [0, 2])
def test_llama_chat_is_the_released_chat_template(folders, system, rounds):
    fam = get_family("llama")
    for style, template, gen in (("llama2", LLAMA2_CHAT_TEMPLATE, False), ("llama3", LLAMA3_CHAT_TEMPLATE, True)):
        tok, hf = ours(folders[style]), theirs(folders[style])
        want = template_ids(hf, template, messages(HISTORY[:rounds], QUERY, system), gen)
        assert fam.chat_prompt(tok, HISTORY[:rounds], QUERY, system) == want, style


def test_llama2_chat_is_metas_reference(folders):
    """Meta's chat_completion: per round bos + encode("[INST] q [/INST] a ") + eos, the last query
    without its reply; a system text inside the first query."""
    tok = ours(folders["llama2"])
    first = f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{HISTORY[0][0]}"
    want = [1] + tok.encode(f"[INST] {first} [/INST] {HISTORY[0][1]} ") + [2]
    want += [1] + tok.encode(f"[INST] {QUERY} [/INST]")
    assert get_family("llama").chat_prompt(tok, HISTORY[:1], QUERY, SYSTEM) == want


def test_llama_stop_and_end_ids(folders):
    fam = get_family("llama")
    llama2, llama3 = ours(folders["llama2"]), ours(folders["llama3"])
    eot = llama3.token_id("<|eot_id|>")
    assert fam.stop_ids(llama2) == (2,) and fam.end_id(llama2) == 2
    assert eot in fam.stop_ids(llama3) and llama3.token_id("<|end_of_text|>") in fam.stop_ids(llama3)
    ids, mask = fam.training_example(llama3, HISTORY[:1], QUERY, " Paris. ")
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == llama3.encode("Paris.") + [eot] and ids[: mask.index(1)] == fam.chat_prompt(
        llama3, HISTORY[:1], QUERY
    )


def test_alpaca_is_stanford_alpacas_template(folders):
    fam, tok, hf = get_family("alpaca"), ours(folders["llama2"]), theirs(folders["llama2"])
    no_input = f"{ALPACA}### Instruction:\nName three colors.\n\n### Response:"
    assert ALPACA.startswith("Below is an instruction that describes a task. Write a response")
    assert fam.chat_prompt(tok, [], "Name three colors.") == hf(no_input)["input_ids"]
    with_input = f"{ALPACA_INPUT}### Instruction:\nName three colors.\n\n### Input:\nred\n\n### Response:"
    assert fam.instruction_prompt(tok, "Name three colors.", "red") == hf(with_input)["input_ids"]
    # train.py: tokenizer(source + output + eos_token), the source's length unlearned
    ids, mask = fam.training_example(tok, [], "Name three colors.", "Red, green and blue.")
    assert ids == hf(no_input + "Red, green and blue." + hf.eos_token)["input_ids"]
    assert mask.index(1) == len(hf(no_input)["input_ids"]) and all(mask[mask.index(1) :])
    # an Alpaca data row with an input trains on the with-input template (sft.conversation)
    row = {"instruction": "Name three colors.", "input": "red", "output": "Red."}
    _, rounds, _ = conversation(row, fam)
    ids, mask = fam.training_example(tok, [], *rounds[0])
    assert ids[: mask.index(1)] == hf(with_input)["input_ids"]


@pytest.mark.parametrize("style", ["bloom", "llama2"])
def test_belle_is_human_assistant_after_bos(folders, style):
    fam, tok, hf = get_family("belle"), ours(folders[style]), theirs(folders[style])
    # BELLE's generate.py: tokenizer(bos_token + "Human: " + q + "\n\nAssistant: "), nothing else added
    want = hf(hf.bos_token + f"Human: {QUERY}\n\nAssistant: ", add_special_tokens=style == "bloom")["input_ids"]
    assert fam.chat_prompt(tok, [], QUERY) == want
    ids, mask = fam.conversation_example(tok, HISTORY)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode(HISTORY[0][1]) + [tok.eos_id] + tok.encode(HISTORY[1][1]) + [tok.eos_id]
    assert ids[: mask.index(1)] == [tok.bos_id] + tok.encode(f"Human: {HISTORY[0][0]}\n\nAssistant: ")


@pytest.mark.parametrize("name,style", [("bloom", "bloom"), ("opt", "opt"), ("llama", "llama2"), ("llama", "llama3")])
def test_plain_families_continue_transformers_ids(folders, name, style):
    fam, tok, hf = get_family(name), ours(folders[style]), theirs(folders[style])
    assert fam.causal and fam.tokenizer_kind == "hf"
    for text in TEXTS:
        assert fam.generation_prompt(tok, text) == hf(text)["input_ids"]
    assert fam.prompt_ids(tok, tok.encode("Hello")) == hf("Hello")["input_ids"]
    assert fam.stop_ids(tok)[: len(tok.stop_ids)] == tok.stop_ids


@pytest.mark.parametrize("name,style", [("bloom", "bloom"), ("opt", "opt"), ("belle", "bloom"), ("llama", "llama2")])
def test_training_and_conversation_masks(folders, name, style):
    fam, tok = get_family(name), ours(folders[style])
    ids, mask = fam.training_example(tok, HISTORY[:1], QUERY, "Paris.", SYSTEM)
    prompt = fam.chat_prompt(tok, HISTORY[:1], QUERY, SYSTEM)
    assert ids[: len(prompt)] == prompt and mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == fam.end_id(tok) == tok.eos_id and tok.decode(ids[len(prompt) :]).strip() == "Paris."
    ((conv, cmask),) = fam.conversation_examples(tok, HISTORY, SYSTEM)
    assert len(conv) == len(cmask) and sum(cmask) == sum(len(tok.encode(a.strip())) + 1 for _, a in HISTORY)
    assert [c for c, m in zip(conv, cmask) if m][-1] == tok.eos_id


def test_glm10b_prompts_are_thudm_glms(folders):
    fam, tok, hf = get_family("glm-10b"), ours(folders["glm"]), theirs(folders["glm"])
    assert not fam.causal and fam.stop_ids(tok) == (tok.eop_id, tok.eos_id)  # <|endofpiece|>, <|endoftext|>
    text = "Tsinghua University is located in [MASK]."
    # its tokenizer: [CLS] text <|endoftext|>; build_inputs_for_generation appends <|startofpiece|>
    assert fam.generation_prompt(tok, text) == hf(text)["input_ids"] + [tok.sop_id]
    plain = fam.generation_prompt(tok, "The fox")
    assert plain == [tok.cls_id] + tok.encode("The fox") + [tok.gmask_id, tok.eos_id, tok.sop_id]
    # fine-tuning rows: [CLS] source [gMASK] <|startofpiece|> target <|endofpiece|>
    ids, mask = fam.training_example(tok, [], QUERY, "Paris.", SYSTEM)
    source = tok.encode(f"{SYSTEM}\n\nHuman: {QUERY}\n\nAssistant:")
    assert ids == [tok.cls_id] + source + [tok.gmask_id, tok.sop_id] + tok.encode("Paris.") + [tok.eop_id]
    assert sum(mask) == len(tok.encode("Paris.")) + 1
    with pytest.raises(FamilyError, match="THUDM/GLM's tokenizer"):
        fam.generation_prompt(ours(folders["opt"]), "x")


def test_hf_families_need_a_tokenizer_json():
    with pytest.raises(FamilyError, match="kind hf"):
        get_family("llama").generation_prompt(get_family("glm").load_tokenizer(), "x")


# ---- generate.py on a converted LLaMA folder -----------------------------------------------------------
def run_script(script, *args):
    """A script's main() in this process -> (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(f"script_{script}", ROOT / "experiments" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow  # ~13 s: a conversion and generate.py's compiles
def test_generate_script_continues_what_transformers_continues(folders, tmp_path):
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(str(folder))
    write_tokenizer(str(folder), "llama2")
    code, out, err = run_script("convert", "--input", folder, "--out", tmp_path / "conv", "--dtype", "float32")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["family"] == "llama"
    text = "Hello world! The quick"
    code, out, err = run_script(
        "generate", "--checkpoint", tmp_path / "conv", "--prompt", text, "--json", "--max-new", "5"
    )
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])["ids"]
    prompt = theirs(str(folder))(text, return_tensors="pt")["input_ids"]
    assert prompt[0, 0] == 1  # <s>: the post-processor's
    with torch.no_grad():
        want = model.generate(prompt, do_sample=False, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    want = want[0, prompt.shape[1] :].tolist()
    strip = lambda ids: ids[: ids.index(2)] if 2 in ids else ids  # noqa: E731 -- both stop at eos
    assert strip(want) and strip(list(np.asarray(got).tolist())) == strip(want)
