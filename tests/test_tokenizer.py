"""The bilingual SentencePiece tokenizer: fixed special ids, exact round trips, reproducible build."""

import gzip
import importlib.util
import json
import pathlib

import pytest

from glm_jax.tokenizer import EOP, EOS, GMASK, MASK, NEWLINE, PAD, SMASK, SOP, GLMTokenizer, TokenizerError

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


def test_special_ids_are_fixed(tok):
    assert (PAD, EOS, MASK, GMASK, SMASK, SOP, EOP, NEWLINE) == (0, 2, 3, 4, 5, 6, 7, 8)
    assert [tok.id_to_piece(i) for i in (MASK, GMASK, SMASK, SOP, EOP, EOS)] == [
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "<sop>",
        "<eop>",
        "</s>",
    ]
    assert tok.vocab_size == 32000 and tok.padded_vocab_size(128) % 128 == 0


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "我们今天去北京天安门广场，看升旗仪式。",
        "GLM-130B 是一个双语 (English/中文) 模型，有 1300 亿参数。",
        "emoji 😀🎉👩‍👩‍👧 flags 🇨🇳🇺🇸",
        "odd bytes \x00\x01\x7f \ufeff\u200b é ñ 𠀀𪚥 \ufffd",
        "def f(x):\n    if x:\n\t\treturn x  # two spaces\n\n\n    return None\n",
        "  leading spaces, trailing   ",
        "line one\r\nline two\n",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


def test_special_token_text_is_not_special(tok):
    ids = tok.encode("[MASK] and [gMASK] and <sop>")
    assert not {MASK, GMASK, SOP} & set(ids)
    assert tok.decode(ids) == "[MASK] and [gMASK] and <sop>"


def test_newline_is_one_token(tok):
    assert tok.encode("\n") == [NEWLINE]


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="train_tokenizer.py"):
        GLMTokenizer(str(tmp_path / "nope.model"))


def test_training_script_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "experiments" / "train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = [
        "The cat sat on the mat; the dog ran far.",
        "天下大事，必作于细。天下难事，必作于易。",
        "def main():\n    return 42",
    ]
    for name, docs in (("en", lines[::2]), ("zh", lines[1:2])):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(200):
                for d in docs:
                    f.write(json.dumps({"text": f"{d} {i}"}) + "\n")
    out1, out2 = tmp_path / "a.model", tmp_path / "b.model"
    mod.main(["--data", str(tmp_path), "--vocab", "350", "--out", str(out1)])
    mod.main(["--data", str(tmp_path), "--vocab", "350", "--out", str(out2)])
    assert out1.read_bytes() == out2.read_bytes()
    small = GLMTokenizer(str(out1))
    assert small.decode(small.encode("天下 cat 😀")) == "天下 cat 😀"
