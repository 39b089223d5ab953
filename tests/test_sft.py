"""Supervised data (sft.py): formats, bad rows, loss masks, cuts, packing; the metrics (text_metrics.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import get_config
from glm_jax.data import DataError
from glm_jax.families import get_family
from glm_jax.model import GLM, init_params
from glm_jax.sft import BadRow, SFTBuilder, build_samples, conversation, pack_samples
from glm_jax.text_metrics import corpus_scores, row_scores

ROWS = [
    {"content": "类型#裙*颜色#红色", "summary": "一条红色的裙子"},
    {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"},
    {"prompt": "and now?", "response": "second reply", "history": [["first question", "first reply"]]},
    {
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    },
]
BAD = [
    '{"content": "x", "summary": ',
    '{"instruction": "no output"}',
    '{"content": "x", "summary": "  "}',
    '{"conversations": [{"role": "assistant", "content": "reply first"}]}',
    "[1, 2]",
]


def write(tmp_path, rows, bad=(), name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join([json.dumps(r, ensure_ascii=False) for r in rows] + list(bad)) + "\n", encoding="utf-8")
    return str(path)


def learned(tok, s):
    return tok.decode([int(t) for t, m in zip(s["targets"], s["loss_mask"]) if m])


@pytest.mark.parametrize("family", ["glm", "chatglm-6b", "chatglm2-6b", "chatglm3-6b"])
def test_each_format_and_every_reply_is_learned(tmp_path, family):
    fam = get_family(family)
    tok = fam.load_tokenizer()
    samples, stats = build_samples([write(tmp_path, ROWS, BAD)], fam, tok, family == "chatglm-6b", 64, 128, 256)
    assert stats.formats == {"advertisegen": 1, "alpaca": 1, "chatglm2": 1, "chatglm3": 1}
    assert (stats.bad_json, stats.missing_fields, stats.empty_reply) == (2, 2, 1) and stats.skipped == 5
    replies = [learned(tok, s) for s in samples]
    text = " | ".join(replies)
    for reply in ("一条红色的裙子", "Hi Bob", "first reply", "second reply", "a1", "a2"):
        assert reply in text
    # nothing but replies (and end/role ids) is learned: no prompt text leaks into the loss
    for prompt in ("类型", "Say hi", "first question", "q1", "Be brief"):
        assert prompt not in text
    # prefix LMs: one sample per reply; causal: one sequence per conversation
    assert len(samples) == (4 if fam.causal else 6)
    for s in samples:
        if fam.causal:
            assert not s["prefix_mask"].any()
        else:  # part A is exactly the unlearned prompt
            a = int(s["prefix_mask"].sum())
            assert not s["loss_mask"][: a - 1].any() and s["loss_mask"][a:].all()


def test_last_turn_only_trains_the_last_reply(tmp_path):
    for family in ("glm", "chatglm2-6b"):
        fam = get_family(family)
        tok = fam.load_tokenizer()
        samples, _ = build_samples([write(tmp_path, ROWS[2:3])], fam, tok, False, 64, 128, 256, last_only=True)
        assert len(samples) == 1 and "first reply" not in learned(tok, samples[0])
        assert "second reply" in learned(tok, samples[0]) and "first reply" in tok.decode(samples[0]["tokens"].tolist())


def test_chatglm3_learns_the_id_after_each_reply(tmp_path):
    fam = get_family("chatglm3-6b")
    tok = fam.load_tokenizer()
    (s,), _ = build_samples([write(tmp_path, ROWS[3:])], fam, tok, False, 64, 128, 256)
    learned_ids = [int(t) for t, m in zip(s["targets"], s["loss_mask"]) if m]
    assert tok.user_id in learned_ids and learned_ids[-1] == tok.eos_id
    assert tok.assistant_id not in learned_ids
    # the system text is a <|system|> message first, as the chat prompt puts it
    system = fam.message(tok, "system", "Be brief.")
    assert s["tokens"][2 : 2 + len(system)].tolist() == system


def test_long_examples_are_cut_as_the_reference_and_counted(tmp_path):
    fam = get_family("glm")
    tok = fam.load_tokenizer()
    row = {"content": "word " * 200, "summary": "reply " * 300}
    (s,), stats = build_samples([write(tmp_path, [row])], fam, tok, False, 16, 24, 64)
    assert (stats.cut_source, stats.cut_target) == (1, 1)
    n_prompt = int(s["prefix_mask"].sum())
    assert n_prompt == 16 - 1  # 16 prompt ids (ending [gMASK] sop), inputs stop before sop's target
    assert int(s["loss_mask"].sum()) == 24 + 1  # 24 reply ids and the end id
    assert s["targets"][s["loss_mask"] == 1][-1] == tok.eop_id
    assert s["tokens"][n_prompt - 1] == tok.gmask_id and s["tokens"][n_prompt] == tok.sop_id


def test_a_long_history_drops_its_oldest_rounds_and_keeps_the_query(tmp_path):
    fam = get_family("chatglm-6b")
    tok = fam.load_tokenizer()
    history = [[f"old question {i} " + "word " * 12, f"old answer {i}"] for i in range(4)]
    row = {"prompt": "the current question", "response": "the reply", "history": history}
    samples, stats = build_samples([write(tmp_path, [row])], fam, tok, False, 60, 16, 128, last_only=True)
    (s,) = samples
    prompt = tok.decode([int(t) for t, a in zip(s["tokens"], s["prefix_mask"]) if a])
    assert "the current question" in prompt and "old question 3" in prompt and "old question 0" not in prompt
    assert stats.dropped_rounds == 3 and stats.cut_source == 0 and int(s["prefix_mask"].sum()) <= 60


def test_two_d_positions_put_part_b_at_the_gmask():
    fam = get_family("chatglm-6b")
    tok = fam.load_tokenizer()
    from glm_jax.sft import to_sample

    ids, mask = fam.training_example(tok, [], "问题", "回答")
    s = to_sample(ids, mask, fam, tok, two_d=True)
    a = int(s["prefix_mask"].sum())
    assert (s["position_ids"][a:] == a - 1).all() and (s["block_position_ids"][a:] == np.arange(1, len(ids) - a)).all()
    assert (s["position_ids"][:a] == np.arange(a)).all() and not s["block_position_ids"][:a].any()


def test_packed_samples_are_isolated_and_equal_each_alone(tmp_path):
    fam = get_family("glm")
    tok = fam.load_tokenizer()
    samples, stats = build_samples([write(tmp_path, ROWS)], fam, tok, False, 64, 128, 96)
    seqs = pack_samples(samples, 96, seed=0)
    assert len(seqs) < len(samples)  # short samples share sequences
    c = get_config("glm-tiny", dtype="float32", num_layers=2)
    params = init_params(c, jax.random.key(0))
    run = jax.jit(lambda b: GLM(c).apply({"params": params}, b))
    packed = max(seqs, key=lambda s: s["segment_ids"].max())
    assert packed["segment_ids"].max() >= 2
    got = np.asarray(run({k: jnp.asarray(v[None]) for k, v in packed.items()}))[0]
    for seg in range(1, int(packed["segment_ids"].max()) + 1):
        where = packed["segment_ids"] == seg
        alone = {k: np.zeros(96, np.int32) for k in packed}
        for k in packed:
            alone[k][: where.sum()] = packed[k][where]
        alone["segment_ids"][: where.sum()] = 1
        want = np.asarray(run({k: jnp.asarray(v[None]) for k, v in alone.items()}))[0, : where.sum()]
        np.testing.assert_allclose(got[where], want, atol=2e-5, rtol=1e-5)


def test_builder_is_deterministic_and_heldout_covers_each_sequence_once(tmp_path):
    fam = get_family("glm")
    tok = fam.load_tokenizer()
    path = write(tmp_path, ROWS * 5)
    a = SFTBuilder.from_files([path], fam, tok, False, 96, 64, 128, seed=3)
    b = SFTBuilder.from_files([path], fam, tok, False, 96, 64, 128, seed=3)
    for i in (0, 5, len(a) + 2):
        assert all((a.build(i)[k] == b.build(i)[k]).all() for k in a.build(i))
    held = SFTBuilder.from_files([path], fam, tok, False, 96, 64, 128, shuffle=False)
    n = held.batches_to_cover(4) * 4
    tokens = sum(int((held.build(i)["segment_ids"] > 0).sum()) for i in range(n))
    assert tokens == held.stats.tokens
    assert 0 <= held.stats.padding_fraction < held.stats.reference_padding_fraction < 1


def test_alpaca_json_array_files_are_read(tmp_path):
    fam = get_family("glm")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ROWS[1], "not a row"]), encoding="utf-8")
    samples, stats = build_samples([str(path)], fam, fam.load_tokenizer(), False, 64, 128, 256)
    assert len(samples) == 1 and stats.bad_json == 1 and stats.rows == 2


def test_metrics_on_hand_made_examples():
    s = row_scores("the cat sat", "the cat ran")
    assert s["rouge-1"] == pytest.approx(66.6667, abs=1e-3)  # 2 of 3 unigrams, both ways
    assert s["rouge-2"] == pytest.approx(50.0, abs=1e-3)  # (the, cat) of two bigrams
    assert s["rouge-l"] == pytest.approx(66.6667, abs=1e-3)
    # character BLEU-4 with method3: p1..p3 = 3/4, 2/3, 1/2; no 4-gram match -> 1/(2 x 1); BP 1
    assert row_scores("abcd", "abce")["bleu-4"] == pytest.approx(100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25, abs=1e-3)
    assert row_scores("", "abc") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert corpus_scores(["abc", ""], ["abc", "abc"])["rouge-1"] == pytest.approx(50.0)


def test_sharegpt_openai_and_alpaca_with_history_read_as_the_same_conversation():
    turns = [("system", "Be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = {
        "chatglm3": {"conversations": [{"role": r, "content": c} for r, c in turns]},
        "openai": {"messages": [{"role": r, "content": c} for r, c in turns]},
        "sharegpt": {"conversations": [{"from": sharegpt[r], "value": c} for r, c in turns]},
        "alpaca": {"instruction": "q2", "input": "", "output": "a2", "system": "Be brief", "history": [["q1", "a1"]]},
    }
    for fmt, row in rows.items():
        assert conversation(row) == ("Be brief", [("q1", "a1"), ("q2", "a2")], fmt)
    for bad in (
        {"conversations": [{"from": "bot", "value": "x"}]},  # an unknown ShareGPT role
        {"messages": [{"role": "assistant", "content": "a reply without a query"}]},
        {"instruction": "q", "output": "a", "history": [["only a query"]]},
    ):
        with pytest.raises(BadRow):
            conversation(bad)


def test_mix_replays_general_data_at_its_share(tmp_path):
    fam = get_family("glm")
    tok = fam.load_tokenizer()
    task = write(tmp_path, [{"content": f"ad {i}", "summary": f"ad reply {i}"} for i in range(6)], name="task.json")
    general = write(tmp_path, [{"instruction": "say hi", "output": "hello there"}], name="general.json")
    common = dict(family=fam, tok=tok, two_d=False, seq_len=64, max_source=32, max_target=16)
    builder = SFTBuilder.from_files([task], mix=[(general, 0.25)], **common)
    assert builder.stats.mixed == {general: 2}  # 6 task samples are 75%: 2 general ones, one file row twice
    replies = " | ".join(learned(tok, s) for s in builder.sequences)
    assert replies.count("hello there") == 2 and "ad reply 5" in replies
    with pytest.raises(DataError):
        SFTBuilder.from_files([task], mix=[(general, 1.0)], **common)
