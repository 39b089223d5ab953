"""PPO with rollouts from the serving engine: the engine's sampling log-probabilities equal the
training forward's (a prefix LM, 1D and 2D, and a causal decoder, under an adapter set by
set_adapter), set_adapter swaps only the adapter, PPO raises a toy reward at a small KL to the base,
and experiments/ppo.py end to end."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.adapters import load_adapter
from glm_jax.checkpoints import move_to_device, save_serving
from glm_jax.config import get_config
from glm_jax.generate import GenerationError, make_prompts
from glm_jax.loading import load_model
from glm_jax.model import GLM, abstract_params, init_params
from glm_jax.peft import PeftConfig, combine, split
from glm_jax.ppo import PPO, PPOSettings, read_prompts, rollout_rows, round_prompts, row_width
from glm_jax.serving.engine import Engine, Request, Sampling, run
from glm_jax.tokenizer import GLM_IDS as I

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import ppo as ppo_script  # noqa: E402

SMALL = dict(
    dtype="float32", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=64, max_sequence_length=64
)
LORA = PeftConfig("lora", lora_targets="query_key_value,dense,dense_h_to_4h,dense_4h_to_h")
T = 8


def small_config(variant: str):
    if variant == "causal":  # ChatGLM2's block: pre-RMSNorm, multi-query, SwiGLU, half rotary
        return get_config("chatglm2-6b", **SMALL, num_kv_heads=1, inner_hidden_size=64)
    return get_config("glm-tiny", **SMALL, tie_word_embeddings=False, position_encoding_2d=variant == "2d")


def prompts_of(variant: str) -> list[list[int]]:
    if variant == "causal":
        return [[I.gmask, I.sop, 10, 11, 12], [I.gmask, I.sop, 20], [I.gmask, I.sop, 30, 31, 32, 33, 34]]
    return [[10, 11, 12, I.gmask, I.sop], [20, I.gmask], [30, 31, I.mask, 33, 34, I.sop]]


def host_params(config, seed: int = 0) -> dict:
    """Parameters drawn on the host (no init program to compile): weights N(0, 0.05), norm scales
    1 + N(0, 0.1); numpy leaves."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        noise = rng.standard_normal(shape.shape, np.float32)
        return 1 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(config)))


def lora_model(config, seed: int = 0):
    """(fresh adapter, base, a trained-looking adapter) of a LoRA model: `host_params`, a fresh
    LoRA's B zero, the other adapter's every leaf moved by N(0, 0.3) (B away from zero: it acts)."""
    trained, base = split(host_params(config, seed), LORA, config)
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, trained
    )
    rng = np.random.default_rng(seed + 1)
    trained = jax.tree_util.tree_map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), trained)
    return tuple(jax.tree_util.tree_map(jnp.asarray, tree) for tree in (fresh, base, trained))


# 1D's positions are also checked by the PPO run (its round 0 samples the base: KL 0 to 1e-5)
@pytest.fixture(
    scope="module",
    params=[pytest.param("1d", marks=pytest.mark.slow), "2d", pytest.param("causal", marks=pytest.mark.slow)],
)
def served(request):
    """A LoRA engine (built with a fresh adapter, then given a trained-looking one by set_adapter),
    and the plain stacked parameters that adapter makes."""
    variant = request.param
    base_config = small_config(variant)
    config = LORA.model_config(base_config)
    fresh, base, adapter = lora_model(config)
    engine = Engine(config, combine(fresh, base, LORA), causal=variant == "causal", slots=2)
    engine.set_adapter(adapter)
    engine.start()
    yield variant, config, engine, combine(adapter, base, LORA), adapter
    engine.stop()


def test_engine_logprobs_equal_the_training_forward(served):
    """Seeded temperature-1 samples (one with top-k filtering: its log-probabilities are still the
    raw logits') carry per-token log-probabilities equal to log-softmax of the training forward
    (`GLM.apply` on the stacked parameters) at the same ids, to 1e-5, the stop id's included."""
    variant, config, engine, params, _ = served
    prompts = prompts_of(variant)
    sampling = [Sampling(1.0, seed=3), Sampling(1.0, top_k=5, seed=4), Sampling(1.0, seed=5)]
    responses = [[] for _ in prompts]  # every generated id, the stop id included
    requests = [
        Request(prompt, T, s, stop_ids=(I.eop, I.eos), on_token=ids.append, logprobs=[])
        for prompt, s, ids in zip(prompts, sampling, responses)
    ]
    for req in requests:
        run(engine, req)
    batch = make_prompts(prompts, config, I, variant == "causal")
    rows, window = rollout_rows(batch, responses, row_width(7, T), T, config.position_encoding_2d, I.pad)
    logits = GLM(config).apply({"params": params}, {k: jnp.asarray(v) for k, v in rows.items()})
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    for i, (req, ids) in enumerate(zip(requests, responses)):
        assert len(req.logprobs) == len(ids) == req.generated > 0
        want = [logp[i, window[i, j], token] for j, token in enumerate(ids)]
        np.testing.assert_allclose(req.logprobs, want, atol=1e-5, rtol=1e-5)


def test_set_adapter_swaps_the_adapter_alone(served):
    """After set_adapter the engine samples exactly as a fresh engine on combine(adapter, base):
    the same ids and log-probabilities; the base's arrays are the same objects as before; a tree
    that is not the engine's adapter, or a busy engine, is refused."""
    variant, config, engine, params, adapter = served
    if variant != "2d":
        pytest.skip("one family is enough")
    prompt, sampling = prompts_of(variant)[0], Sampling(1.0, seed=9)

    def sample(e):
        req = Request(prompt, T, sampling, stop_ids=(), logprobs=[])
        return run(e, req)[0], req.logprobs

    fresh = Engine(config, params, slots=2).start()  # the same batch shape: the same rounding
    try:
        assert sample(engine) == sample(fresh)
    finally:
        fresh.stop()
    base = {path: x for path, x in _flat(engine.params).items() if "lora" not in path[-1]}
    engine.set_adapter(jax.tree_util.tree_map(jnp.zeros_like, adapter))
    after = _flat(engine.params)
    assert all(after[path] is x for path, x in base.items()) and len(after) > len(base)
    assert not any(np.asarray(x).any() for path, x in after.items() if path[-1] == "lora_b")
    engine.set_adapter(adapter)  # back, for the other tests
    with pytest.raises(GenerationError, match="leaves"):
        engine.set_adapter({"layers": {"attention": adapter["layers"]["attention"]}})
    wrong = jax.tree_util.tree_map(lambda x: x[:1], adapter)
    with pytest.raises(GenerationError, match="shape"):
        engine.set_adapter(wrong)
    idle = Engine(config, params, slots=1)  # no loop: a submitted request stays queued
    idle.submit(Request(prompt, 2))
    with pytest.raises(RuntimeError, match="in flight"):
        idle.set_adapter(adapter)


@pytest.mark.slow
def test_set_adapter_rewrites_a_ptuning_prefix():
    """A P-tuning v2 engine given a new prefix encoder by set_adapter samples as a fresh engine
    built with it: the prefix slots of the cache are written again."""
    peft = PeftConfig("ptuning", pre_seq_len=4)
    config = peft.model_config(small_config("1d"))
    first, base = split(host_params(config), peft, config)
    second, _ = split(host_params(config, seed=1), peft, config)
    outputs = []
    for built, given in ((first, second), (second, None)):
        engine = Engine(config, combine(built, base, peft), slots=2)
        if given is not None:
            engine.set_adapter(given)
        engine.start()
        try:
            req = Request([10, 11, I.gmask], T, Sampling(1.0, seed=2), logprobs=[])
            outputs.append((run(engine, req)[0], req.logprobs))
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]


def _flat(params):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        out[tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def test_prompt_files_and_round_order(tmp_path):
    """Prompt rows of every accepted shape become the family's chat prompts; bad rows are counted;
    a round's prompts are a pure function of (seed, round) covering every prompt once per pass."""
    from glm_jax.families import get_family

    fam = get_family("glm")
    tok = fam.load_tokenizer()
    rows = [
        {"prompt": "hello"},
        {"prompt": [{"role": "user", "content": "hello"}]},
        {
            "messages": [
                {"from": "human", "content": "hi"},
                {"from": "assistant", "content": "yo"},
                {"from": "human", "content": "hello"},
            ]
        },
        {"instruction": "hello", "input": ""},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # no query
        {"other": 1},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    prompts, stats = read_prompts(str(path), fam, tok, 64)
    assert prompts[0] == fam.chat_prompt(tok, [], "hello") == prompts[1] == prompts[3]
    assert prompts[2] == fam.chat_prompt(tok, [("hi", "yo")], "hello")
    assert (stats.prompts, stats.missing_fields, stats.bad_json) == (4, 2, 1)
    items = list(range(5))
    first_pass = round_prompts(items, 0, 3, 7) + round_prompts(items, 1, 3, 7)[:2]
    assert sorted(first_pass) == items and round_prompts(items, 1, 3, 7) == round_prompts(items, 1, 3, 7)


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_at_a_small_kl():
    """PPO from the engine's rollouts, reward = the count of one token id: over 20 seeded rounds the
    mean reward of the last 5 rounds is well above the first 5's, the KL to the base stays under
    1 nat per token, and the engine samples from the actor PPO trains."""
    config = small_config("1d")
    target = 42
    prompts = [[10 + i, 20 + i, 30 + i, I.gmask, I.sop] for i in range(16)]
    settings = PPOSettings(batch=16, minibatch=8, max_new_tokens=16, lr=3e-3, kl_coef=0.2, seed=0)
    ppo = PPO(
        config,
        init_params(config, jax.random.key(0)),
        I,
        False,
        (I.eop, I.eos),
        settings,
        LORA,
        lambda prompt, response: float(response.count(target)),
        max_prompt_len=5,
    )
    try:
        rows = [ppo.round(r, round_prompts(prompts, r, 16, 0)) for r in range(20)]
        served = _flat(ppo.engine.params)
        for path, leaf in _flat(ppo.actor).items():  # the engine serves the actor's last update
            np.testing.assert_array_equal(served[(path[0], "0", *path[1:])], leaf[0])
    finally:
        ppo.close()
    first, last = np.mean([r["reward"] for r in rows[:5]]), np.mean([r["reward"] for r in rows[-5:]])
    assert last > first + 1.0, (first, last)
    assert max(r["kl_per_token"] for r in rows) < 1.0
    # round 0 samples the base: the engine's log-probabilities are the reference forward's
    assert rows[0]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny base on our tokenizer (the script builds chat prompts) and a prompt file."""
    root = tmp_path_factory.mktemp("ppo")
    c = get_config(
        "glm-tiny", dtype="float32", num_layers=2, hidden_size=32, num_attention_heads=2, max_sequence_length=64
    )
    save_serving(str(root / "base"), c, move_to_device(host_params(c)), 3, "test")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": q}) for q in ("hello", "你好", "tell me a story")) + "\n")
    return root


def script(checkpoint, out, *extra):
    return ppo_script.main(
        [
            "--checkpoint",
            str(checkpoint / "base"),
            "--prompts",
            str(checkpoint / "prompts.jsonl"),
            "--out",
            str(checkpoint / out),
            "--rounds",
            "2",
            "--batch",
            "2",
            "--max-new-tokens",
            "4",
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.slow
def test_the_script_writes_rounds_a_plot_and_a_loadable_adapter(checkpoint):
    # on a 2-way tensor mesh: the engine and the training forwards split the base, the adapters placed with it
    summary = script(
        checkpoint, "run", "--reward-token", "100", "--lr", "1e-2", "--set", "lora_rank=4", "--mesh", "1x2"
    )
    logs = checkpoint / "run" / "logs"
    rows = [json.loads(line) for line in (logs / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and (logs / "ppo.png").stat().st_size > 0
    assert {"reward", "kl_per_token", "response_length", "pg_loss", "vf_loss", "seconds"} <= set(rows[0])
    adapter = load_adapter(summary["adapter_dir"])
    assert adapter.peft.method == "lora" and adapter.config.lora_rank == 4 and adapter.step == 2
    model = load_model(str(checkpoint / "base"), adapter=str(checkpoint / "run"))  # as generate.py loads it
    assert model.config.lora_rank == 4
    trained = [x for path, x in _flat(adapter.params).items() if path[-1] == "lora_b"]
    assert trained and all(np.abs(np.asarray(x)).sum() > 0 for x in trained)  # B moved off its zero init


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward-token", "100", "--batch", "0"], "--batch must be positive"),
        (["--reward-token", "100", "--batch", "4", "--minibatch", "3"], "must divide"),
        (["--reward-token", "99999"], "not an id of the vocabulary"),
        (["--reward-token", "1", "--set", "hidden_size=8"], "LoRA knobs"),
        (["--reward-model", "MISSING"], "MISSING"),
        ([], "one of the arguments"),
    ],
)
def test_bad_flags_exit_2(checkpoint, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        script(checkpoint, "bad", *extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
