"""The released tokenizers (the real files in ../shared) and the families' prompts, against docs/reference.md
section 3, the tokenizer README's documented ids and ids the released tokenizers are known to give."""

import pathlib

import pytest

from glm_jax.families import FamilyError, get_family
from glm_jax.tokenizer import SHARED_TOKENIZERS, TokenizerError, check_fits, load_tokenizer

pytestmark = pytest.mark.skipif(not pathlib.Path(SHARED_TOKENIZERS).is_dir(), reason="../shared tokenizers absent")


@pytest.fixture(scope="module")
def toks():
    return {k: load_tokenizer(k) for k in ("glm", "glm-130b", "chatglm-6b", "chatglm2-6b", "chatglm3-6b")}


def test_special_ids_as_the_spec_gives_them(toks):
    ice, c6, c2, c3 = toks["glm-130b"], toks["chatglm-6b"], toks["chatglm2-6b"], toks["chatglm3-6b"]
    assert (ice.mask_id, ice.gmask_id, ice.smask_id, ice.sop_id, ice.eop_id, ice.eos_id, ice.unk_id) == (
        150000,
        150001,
        150002,
        150004,
        150005,
        20002,
        20000,
    )
    assert (c6.mask_id, c6.gmask_id, c6.smask_id, c6.sop_id, c6.eop_id, c6.pad_id) == (
        130000,
        130001,
        130002,
        130004,
        130005,
        3,
    )
    for t in (c2, c3):
        assert (t.mask_id, t.gmask_id, t.smask_id, t.sop_id, t.eop_id, t.eos_id, t.pad_id) == (
            64789,
            64790,
            64791,
            64792,
            64793,
            2,
            0,
        )
    assert c2.user_id is None and (c3.system_id, c3.user_id, c3.assistant_id, c3.observation_id) == (
        64794,
        64795,
        64796,
        64797,
    )
    assert c6.vocab_size == 130344 and c2.vocab_size == 64794 and c3.vocab_size == 64798
    assert [c6.id_to_piece(i) for i in (130008, 130009, 130087, 130088)] == [
        "<|tab|>",
        "<|blank_2|>",
        "<|blank_80|>",
        "<0x00>",
    ]


def test_icetk_documented_examples(toks):
    ice = toks["glm-130b"]
    assert ice.encode("Hello World! I am icetk.") == [39316, 20932, 20035, 20115, 20344, 22881, 35955, 20007]
    assert [ice.id_to_piece(i) for i in (20000, 20002, 20003, 20004, 20006, 145803)] == [
        "<unk>",
        "</s>",
        "<pad>",
        "<n>",
        ",",
        "α",
    ]
    assert ice.encode("𪚥")[-1] == 20000  # unknown character
    assert ice.encode("a  b\nc") == ice.encode("a b c")  # no preprocessing: its normalizer folds whitespace
    assert ice.decode(ice.encode("Hello World!") + [150001, 150004]) == "Hello World!"


def test_chatglm6b_whitespace_pieces_and_decode_rule(toks):
    c6 = toks["chatglm-6b"]
    assert (
        c6.preprocess("a\n\tb" + " " * 3 + "c" + " " * 83 + "d") == "a<n><|tab|>b<|blank_3|>c<|blank_80|><|blank_3|>d"
    )
    code = "def f(x):\n\treturn  x   +1\n"
    ids = c6.encode(code)
    assert {4, 130008, 130009, 130010} <= set(ids) and c6.decode(ids) == code
    assert c6.encode("你好") == [5, 74874]
    # transformers' clean_up_tokenization_spaces, which ChatGLM-6B's tokenizer config turns on
    assert c6.decode(c6.encode("Hello , world . I 'm here !")) == "Hello, world. I'm here!"
    assert c6.decode([3, *c6.encode("ok"), 130001, 130004]) == "ok"  # pad and specials dropped


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "我们今天去北京天安门广场，看升旗仪式。",
        "GLM-130B 是双语 (English/中文) 模型",
        "def f(x):\n    if x:\n\t\treturn x\n",
        "emoji 😀🎉 ok",
        "全角：（ＡＢＣ）！？",
        "line\n\nbreaks\n",
    ],
)
def test_chatglm2_round_trips_and_keeps_text_as_is(toks, text):
    c2 = toks["chatglm2-6b"]
    ids = c2.encode(text)
    assert c2.decode(ids) == text and not set(ids) & c2.special_ids
    assert c2.encode("\n") == [30910, 13]  # dummy prefix, newline as byte piece 13


def test_special_token_text_is_text(toks):
    for t in toks.values():
        assert not set(t.encode("[gMASK] <sop> [MASK]")) & t.special_ids


def test_released_prompts_id_for_id(toks):
    """Ids the released tokenizers give for these prompts (THUDM's READMEs and issues)."""
    c6, c2, c3 = toks["chatglm-6b"], toks["chatglm2-6b"], toks["chatglm3-6b"]
    assert get_family("chatglm-6b").chat_prompt(c6, [], "你好") == [5, 74874, 130001, 130004]
    assert get_family("chatglm2-6b").chat_prompt(c2, [], "你好") == [
        64790,
        64792,
        790,
        30951,
        517,
        30910,
        30939,
        30996,
        13,
        13,
        54761,
        31211,
        39701,
        13,
        13,
        55437,
        31211,
    ]
    assert get_family("chatglm3-6b").chat_prompt(c3, [], "你好") == [
        64790,
        64792,
        64795,
        30910,
        13,
        36474,
        54591,
        64796,
    ]


def test_chat_prompts_for_zero_one_two_rounds(toks):
    hist = [("你好", "你好！有什么可以帮你？"), ("1+1=?", "2")]
    c6, c2, c3, ice, ours = (toks[k] for k in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-130b", "glm"))
    f6 = get_family("chatglm-6b")
    assert f6.chat_prompt(c6, [], "q") == c6.encode("q") + [130001, 130004]  # first turn: the bare query
    assert f6.chat_prompt(c6, hist[:1], "q") == c6.encode(
        "[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：q\n答："
    ) + [130001, 130004]
    assert f6.chat_prompt(c6, hist, "q")[-2:] == [130001, 130004]
    # its normalizer folds full-width punctuation (why its chat post-processes replies)
    assert c6.decode(f6.chat_prompt(c6, hist, "q")).startswith("[Round 0]\n问:你好\n答:你好!")
    f2 = get_family("chatglm2-6b")
    for n in (0, 1, 2):
        text = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(hist[:n]))
        assert f2.chat_prompt(c2, hist[:n], "q") == [64790, 64792] + c2.encode(
            text + f"[Round {n + 1}]\n\n问：q\n\n答："
        )
    f3 = get_family("chatglm3-6b")
    msg = lambda role, text: [role] + c3.encode("\n") + c3.encode(text)
    for n in (0, 1, 2):
        want = [64790, 64792] + msg(64794, "be brief")
        for q, a in hist[:n]:
            want += msg(64795, q) + msg(64796, a)
        assert f3.chat_prompt(c3, hist[:n], "q", system="be brief") == want + msg(64795, "q") + [64796]
    for fam, tok in ((get_family("glm-130b"), ice), (get_family("glm"), ours)):
        ids = fam.chat_prompt(tok, hist[:1], "q")
        assert ids[-2:] == [tok.gmask_id, tok.sop_id]
        assert (
            tok.decode(ids) == "[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：q\n答："
            or fam.name == "glm-130b"
        )


def test_generation_prompts_follow_the_released_generate_rules(toks):
    ice, c2 = toks["glm-130b"], toks["chatglm2-6b"]
    f = get_family("glm-130b")
    assert f.generation_prompt(ice, "Hello") == ice.encode("Hello") + [150001, 150004]
    assert f.generation_prompt(ice, "A [MASK] b") == ice.encode("A ") + [150000] + ice.encode(" b") + [20002, 150004]
    assert f.generation_prompt(ice, "A [sMASK]") == ice.encode("A ") + [150002, 150004]
    assert get_family("chatglm2-6b").generation_prompt(c2, "Hi") == [64790, 64792] + c2.encode("Hi")


def test_training_examples_learn_the_answer_and_its_end(toks):
    for name, end in (("chatglm-6b", 130005), ("chatglm2-6b", 2), ("chatglm3-6b", 2), ("glm", 7)):
        fam = get_family(name)
        tok = toks[fam.tokenizer_kind]
        ids, mask = fam.training_example(tok, [("a", "b")], "q", "答案")
        assert len(ids) == len(mask) and ids[-1] == end and mask[-1] == 1
        prompt = fam.chat_prompt(tok, [("a", "b")], "q")
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and all(mask[len(prompt) :])
        assert tok.decode([i for i, m in zip(ids, mask) if m]).strip() == "答案"


def test_postprocess_as_the_released_chat_code():
    assert (
        get_family("chatglm-6b").postprocess(" 你好,世界!ok, fine?好 [[训练时间]] ")
        == "你好，世界！ok, fine？好 2023年"
    )
    assert get_family("chatglm2-6b").postprocess(" 你好,世界 [[训练时间]]\n") == "你好,世界 2023年"
    assert get_family("chatglm3-6b").postprocess("\n 你好 ") == "你好"
    assert get_family("chatglm3-6b").postprocess('tool\n{"a": 1}') == '{"a": 1}'


def test_stop_tokens_per_family(toks):
    assert get_family("chatglm3-6b").stop_ids(toks["chatglm3-6b"]) == (2, 64795, 64797)
    assert get_family("chatglm2-6b").stop_ids(toks["chatglm2-6b"]) == (2,)
    assert get_family("chatglm-6b").stop_ids(toks["chatglm-6b"]) == (130005,)
    assert get_family("glm-130b").stop_ids(toks["glm-130b"]) == (150005, 20002)
    assert get_family("chatglm2-6b").causal and not get_family("chatglm-6b").causal


def test_chat_drops_oldest_rounds_to_fit(toks):
    fam, tok = get_family("chatglm2-6b"), toks["chatglm2-6b"]
    hist = [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(4)]
    full = fam.chat_prompt(tok, hist, "q")
    ids, dropped = fam.fit_chat(tok, hist, "q", len(full) - 1)
    assert dropped == 1 and ids == fam.chat_prompt(tok, hist[1:], "q")
    assert fam.fit_chat(tok, hist, "q", len(full)) == (full, 0)
    with pytest.raises(FamilyError, match="query alone"):
        fam.fit_chat(tok, hist, "a long query " * 20, 10)


def test_bad_kinds_and_files_are_clear_errors(tmp_path, toks):
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="icetk text model has 130000"):
        load_tokenizer("glm-130b", str(pathlib.Path(SHARED_TOKENIZERS) / "chatglm-6b" / "ice_text.model"))
    (tmp_path / "x.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece"):
        load_tokenizer("chatglm2-6b", str(tmp_path / "x.model"))
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_tokenizer("glm-4")
    with pytest.raises(TokenizerError, match="only 1000 embedding rows"):
        check_fits(toks["chatglm2-6b"], 1000)
    with pytest.raises(FamilyError, match="unknown model family"):
        get_family("gpt-2")


def test_glm4_tokenizer_from_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = [
        "<|endoftext|>",
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "<sop>",
        "<eop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
    ]
    hf.train_from_iterator(
        ["hello world", "你好 世界", "code\n\tx = 1"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"] + specials),
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer("glm-4", str(tmp_path / "tokenizer.json"))
    assert tok.gmask_id == hf.token_to_id("[gMASK]") and tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("hello 你好\n\tx")) == "hello 你好\n\tx"
    fam = get_family("glm-4")
    ids = fam.chat_prompt(tok, [], "hello")
    assert ids[:3] == [tok.gmask_id, tok.sop_id, tok.user_id] and ids[-1] == tok.assistant_id
    assert fam.stop_ids(tok) == (tok.eos_id, tok.user_id, tok.observation_id) and fam.causal
