"""Evaluation protocols: LAMBADA rules and both protocols on toy models, MMLU, perplexity/BPB,
teacher forcing vs the KV cache, and lambada_eval.py end to end on a tiny checkpoint."""

import importlib.util
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
import sharding_case as case

from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints
from glm_jax.evaluate import (
    ModelScorer,
    lambada_beam,
    lambada_greedy,
    lambada_prediction,
    language_modelling,
    multiple_choice,
    output_words,
    read_lambada,
    sliding_window_rows,
)
from glm_jax.families import get_family
from glm_jax.generate import Generator, make_prompts
from glm_jax.optim import OptimConfig
from glm_jax.tokenizer import GMASK, MASK, SOP, GLMTokenizer
from glm_jax.train import Trainer
from glm_jax.train_state import save_state

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


def test_output_words_and_prediction_rule():
    assert output_words(" house, said Tom") == ["house", ",", "said", "Tom"]
    assert output_words("don't stop.") == ["don't", "stop", "."]
    split = dict(split_punctuation=True)  # our tokenizer glues punctuation to words
    assert lambada_prediction([" the end of", " home. And", "garden ."], **split) == "home"  # beam 1 qualifies first
    assert lambada_prediction([" house, said", " home."], **split) == "house"
    assert lambada_prediction([" big red", " large blue"], **split) == "big"  # none qualifies: beam 0
    assert lambada_prediction([""], **split) == ""
    # the reference's rule: split on " ", second word `in string.punctuation` (a substring test)
    assert lambada_prediction([" home. And", " garden . x"]) == "garden"
    assert lambada_prediction([" big red", " house !?"]) == "big"  # "!?" is no substring of punctuation
    assert lambada_prediction(["sea  now"]) == "sea"  # "" (two spaces) is a substring: qualifies
    assert lambada_prediction([" Tom ,"], retokenize=str.upper) == "TOM"


def test_lambada_bans_use_the_tokenizers_ids():
    import string

    from glm_jax.evaluate import lambada_bans
    from glm_jax.tokenizer import SHARED_TOKENIZERS, load_tokenizer

    ours = GLMTokenizer()
    ids, prefixes = lambada_bans(ours)
    dot = ours.encode(".")
    assert len(dot) == 1 and dot[0] in ids and ours.encode("'") in prefixes
    assert len(prefixes) == len(string.punctuation) + 2
    if os.path.isdir(SHARED_TOKENIZERS):
        ice = load_tokenizer("glm-130b")
        ids, prefixes = lambada_bans(ice)
        assert ids[:3] == [20068, 146010, 146337] and prefixes[:2] == [[46010], [146337]]
        assert all(ice.encode(p) in prefixes for p in string.punctuation)


def test_read_lambada_splits_the_last_word(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(
        json.dumps({"text": "He opened the door and saw his dog"})
        + "\n\n"
        + json.dumps({"text": "  trailing space kept out  "})
        + "\n"
    )
    assert read_lambada(str(p)) == [("He opened the door and saw his", "dog"), ("trailing space kept", "out")]
    with pytest.raises(FileNotFoundError, match="not found"):
        read_lambada(str(tmp_path / "none.jsonl"))


def test_lambada_greedy_on_a_copy_model(tok):
    # a toy "copy" model: the continuation is all-argmax iff its tokens appear in the context, in order
    def copy_score(rows):
        out = []
        for ctx, cont in rows:
            s = ",".join(map(str, ctx))
            out.append((0.0, len(cont), ",".join(map(str, cont)) in s))
        return out

    examples = [
        ("the cat sat with the cat", "cat"),
        ("a b c d", "zebra"),
        ("go to the market to buy the market", "market"),
        ("one two", "three"),
    ]
    hits = lambada_greedy(examples, tok, copy_score)
    assert hits == [True, False, True, False]


def test_lambada_beam_on_a_hand_made_model(tok):
    # beams repeat the context's last word: followed by punctuation in beam 1 only
    def beams(prompt, banned_ids, banned_prefixes):
        assert prompt[-2:] == [GMASK, SOP] and banned_ids and banned_prefixes
        last = tok.decode(prompt[:-2]).split()[-1]
        return [f" {last} {last}", f" {last}.", " other ,"]

    examples = [("I said hello hello", "hello"), ("see the sea", "sea"), ("red is red", "blue")]
    assert lambada_beam(examples, tok, beams) == [True, True, False]


def test_multiple_choice_on_hand_made_scores(tok):
    # subject a: the right letter always scores best; subject b: always the wrong one
    subjects = {
        "a": [("q1", ["w", "x", "y", "z"], 2), ("q2", ["w", "x", "y", "z"], 0), ("q3", ["1", "2", "3", "4"], 3)],
        "b": [("q4", ["w", "x", "y", "z"], 1)],
    }
    answer_of = {}

    def score(rows):
        out = []
        for ctx, cont in rows:
            text = tok.decode(ctx[:-2])
            assert ctx[-2:] == [MASK, SOP] and text.endswith("Answer:")
            q = text.split("\n")[-6] if "\n\n" in text else text.split("\n")[0]
            letter = tok.decode(cont).strip()
            right = answer_of[q]
            out.append((1.0 if (letter == right) == (q != "q4") else 0.0, 1, True))
        return out

    for subject in subjects.values():
        for q, _, a in subject:
            answer_of[q] = "ABCD"[a]
    r = multiple_choice(subjects, tok, score)
    assert r["subjects"] == {"a": 1.0, "b": 0.0} and r["n"] == 4 and r["accuracy"] == pytest.approx(0.75)
    shots = {"a": [("s1", ["p", "q", "r", "s"], 1)]}
    r5 = multiple_choice({"a": subjects["a"]}, tok, score, shots=shots, k=1)
    assert r5["accuracy"] == 1.0


def test_sliding_windows_score_every_token_once():
    tokens = list(range(100, 111))
    rows = sliding_window_rows(tokens, 4)
    scored = [t for _, cont in rows for t in cont]
    assert scored == tokens
    assert rows[0][0] == [GMASK, SOP] and all(len(ctx) <= 3 for ctx, _ in rows)
    assert rows[2] == ([103, GMASK, SOP], [104, 105])


def test_bits_per_byte_of_a_one_bit_per_token_model(tok):
    texts = ["hello world", "北京欢迎你"]
    one_bit = lambda rows: [(-math.log(2) * len(c), len(c), False) for _, c in rows]
    r = language_modelling(texts, tok, one_bit, window=8)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["tokens"] == n_tokens and r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(n_tokens / n_bytes)
    assert r["perplexity"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_model():
    c = case.config(num_layers=2, vocab_size=32000)
    return c, case.params(c)


def test_teacher_forcing_equals_the_cached_decoder(tiny_model):
    c, params = tiny_model
    rows = [([11, 12, 13, GMASK], [40, 41, 42]), ([21, MASK, 22], [50, 51])]
    scored = ModelScorer(c, params, batch_size=2).score(rows)
    gen = Generator(c, params)
    for (ctx, cont), (logp, n, _) in zip(rows, scored):
        state = gen.start(make_prompts([ctx], c), len(cont))
        token, total = np.array([SOP], np.int32), 0.0
        for step, t in enumerate(cont):
            lp = np.asarray(jax.nn.log_softmax(gen.step(state, token, step)[0]))
            total += float(lp[t])
            token = np.array([t], np.int32)
        assert n == len(cont) and logp == pytest.approx(total, abs=1e-4)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """A training checkpoint folder (step 7) of the tiny model."""
    c, _ = tiny_model
    path = tmp_path_factory.mktemp("run") / "ck"
    t = Trainer(c, OptimConfig(), sh.make_mesh("1x1", jax.devices()[:1]), 1)
    ckpt = Checkpoints(str(path), async_save=False)
    save_state(ckpt, t, 7, t.init_state(0), {"config": c.to_dict()})
    ckpt.close()
    return path


@pytest.mark.slow
def test_lambada_eval_script_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint, capsys):
    ck = tiny_checkpoint
    script = _load_script("lambada_eval")
    r = script.main(["--checkpoint", str(ck), "--limit", "4", "--protocol", "greedy", "--batch", "4"])
    assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["step"] == 7
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4
    r = script.main(["--checkpoint", str(ck / "7"), "--limit", "2", "--protocol", "beam", "--beams", "2"])
    assert r["n"] == 2
    r = script.main(["--checkpoint", str(ck), "--limit", "4", "--quantize", "int4", "--batch", "4"])
    assert r["n"] == 4
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", str(tmp_path / "nothing")])
    assert e.value.code == 2


def test_quantized_serving_checkpoint_round_trips_and_serves(tiny_checkpoint, tmp_path, capsys):
    """experiments/quantize.py writes INT4 weights once; load_checkpoint gives exactly the arrays
    quantizing on load gives, the evaluation scripts take the folder, and re-quantizing it is a
    clear error."""
    from glm_jax.checkpoints import CheckpointError
    from glm_jax.loading import load_checkpoint
    from glm_jax.quant import quantize_params

    out = tmp_path / "int4"
    r = _load_script("quantize").main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--groups", "2"])
    assert r["step"] == 7 and r["layers_quantized_bytes"] < r["layers_bf16_bytes"] / 3.5
    config, params, step = load_checkpoint(str(out))
    assert (config.quantization, config.quantization_groups, step) == ("int4", 2, 7)
    _, float_params, _ = load_checkpoint(str(tiny_checkpoint))
    want = quantize_params(float_params, config)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    lam = _load_script("lambada_eval").main(["--checkpoint", str(out), "--limit", "2", "--batch", "2"])
    assert lam["n"] == 2 and lam["step"] == 7
    with pytest.raises(CheckpointError, match="holds int4 weights already"):
        load_checkpoint(str(out), quantize="int8")
    with pytest.raises(SystemExit) as e:
        _load_script("quantize").main(["--checkpoint", str(out), "--out", str(tmp_path / "again")])
    assert e.value.code == 2


def test_over_long_rows_are_cut_from_the_left_and_counted(tiny_model):
    c, params = tiny_model
    short = c.override(max_sequence_length=16)
    scorer = ModelScorer(short, params, batch_size=2)
    long_ctx = list(range(100, 120)) + [GMASK]  # 21 + sop + 3 continuation > 16
    fitted = scorer.fit((long_ctx, [40, 41, 42]))
    assert fitted == (long_ctx[8:], [40, 41, 42]) and scorer.cut_rows == 1
    assert scorer.fit(([11, GMASK], [40])) == ([11, GMASK], [40]) and scorer.cut_rows == 1
    full = ModelScorer(c, params, batch_size=2).score([fitted])
    assert scorer.score([(long_ctx, [40, 41, 42])])[0] == pytest.approx(full[0], abs=1e-5)
    causal = ModelScorer(short, params, batch_size=2, family=get_family("chatglm2-6b"))
    ctx = [GMASK, SOP] + list(range(100, 120))
    assert causal.fit((ctx, [40, 41]))[0] == [GMASK, SOP] + list(range(107, 120))  # [gMASK] sop kept


@pytest.mark.slow
def test_generate_script_beam_search_json(tiny_checkpoint, capsys):
    script = _load_script("generate")
    script.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--prompt",
            "The sea",
            "--num-beams",
            "3",
            "--all-beams",
            "--json",
            "--max-new",
            "3",
            "--no-repeat-ngram",
            "2",
        ]
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = [b["score"] for b in line["beams"]]
    assert line["prompt"] == "The sea" and 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    assert all(len(b["ids"]) <= 3 for b in line["beams"])


def test_reference_lm_windows_and_per_word_perplexity_by_hand():
    from glm_jax.evaluate import reference_lm_windows, reference_perplexity

    rows = reference_lm_windows(list(range(10)), max_seq_length=6, generation_length=2)
    assert rows == [([0], [1, 2, 3, 4]), ([2, 3, 4], [5, 6]), ([4, 5, 6], [7, 8]), ([6, 7, 8], [9])]
    assert reference_lm_windows([7], 6, 2) == []  # one token: nothing to score
    with pytest.raises(ValueError, match="generation_length"):
        reference_lm_windows(list(range(10)), 6, 5)

    class OneNatPerToken:  # every scored token costs exactly 1 nat
        def encode(self, text):
            return [100 + i for i, _ in enumerate(text.split())]

        gmask_id, sop_id, mask_id = GMASK, SOP, MASK

    seen = []

    def score(batch):
        seen.extend(batch)
        return [(-float(len(cont)), len(cont), False) for _, cont in batch]

    text = " a b c d e f g h i j \n"  # 10 words; the first token is context only: 9 nats
    r = reference_perplexity(text, OneNatPerToken(), score, max_seq_length=6, generation_length=2)
    assert r["nll"] == 9 and r["words"] == 10 and r["perplexity"] == pytest.approx(math.exp(0.9))
    assert seen[0] == ([100, GMASK, SOP], [101, 102, 103, 104])  # [gMASK] sop after each context
    big = reference_perplexity(text, OneNatPerToken(), lambda b: [(-1000.0, 1, False) for _ in b], 6, 2)
    assert big["perplexity"] == pytest.approx(math.exp(20)) and big["perplexity_uncapped"] > big["perplexity"]


@pytest.mark.slow
def test_ppl_eval_script_wikitext_task_on_a_small_file(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "wiki.test.tokens"
    f.write_text(
        " = Robert = \n Robert is an English film , television and theatre actor . He had a guest role "
        "in the television series The Bill in 2000 . \n" * 3
    )
    r = _load_script("ppl_eval").main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--task",
            "wikitext",
            "--data",
            str(f),
            "--generation-length",
            "16",
            "--window",
            "64",
        ]
    )
    assert r["task"] == "wikitext" and r["words"] == len(f.read_text().strip().split(" ")) and r["windows"] >= 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] == r["perplexity"]


def test_cmmlu_layout_and_mmlu_categories(tmp_path, tok):
    from glm_jax.evaluate import category_accuracy, read_mmlu

    for split in ("test", "dev"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "agronomy.csv").write_text(
            ",Question,A,B,C,D,Answer\n0,水稻属于什么科？,禾本科,豆科,菊科,蔷薇科,A\n1,一加一,1,2,3,4,B\n2,bad,a,b,c,d,E\n",
            encoding="utf-8",
        )
    rows = read_mmlu(str(tmp_path), "test", "cmmlu")
    assert rows == {
        "agronomy": [("水稻属于什么科？", ["禾本科", "豆科", "菊科", "蔷薇科"], 0), ("一加一", ["1", "2", "3", "4"], 1)]
    }
    # every choice scored: the letter scores are (A: 1, B: 0) for the first question, the right one wins
    r = multiple_choice(rows, tok, lambda batch: [(1.0 if i % 4 == 0 else 0.0, 1, True) for i, _ in enumerate(batch)])
    assert r["subjects"] == {"agronomy": 0.5} and r["categories"] == {"Other": 0.5}
    cats = category_accuracy(
        {"anatomy": (1.0, 10), "virology": (0.0, 5), "philosophy": (0.5, 4), "sociology": (0.25, 4)}
    )
    assert cats == {"STEM": 1.0, "Other": 0.0, "Humanities": 0.5, "Social Sciences": 0.25}


def test_generation_prompts_are_cut_to_leave_room(tiny_model):
    c, params = tiny_model
    scorer = ModelScorer(c.override(max_sequence_length=16), params, batch_size=2)
    prompt = list(range(100, 120)) + [GMASK, SOP]
    cut = scorer.fit_prompt(prompt, 5)
    assert len(cut) + 5 <= 16 and cut[-2:] == [GMASK, SOP] and cut[:-2] == prompt[-len(cut) : -2]
    assert scorer.cut_rows == 1 and scorer.fit_prompt([11, GMASK, SOP], 5) == [11, GMASK, SOP]
