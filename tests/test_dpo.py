"""The preference objectives (pair_objectives.py) in the trainer and finetune.py: each pair loss as
its formula on answers scored alone, the same on a mesh as on one device, DPO's first loss log 2,
held-out pair accuracy, the reference cache of freeze / full runs, the reward model and
score_rewards.py."""

import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import alignment
from glm_jax import sharding as sh
from glm_jax.adapters import save_adapter
from glm_jax.checkpoints import move_to_device, save_serving
from glm_jax.config import get_config
from glm_jax.loading import load_model
from glm_jax.model import GLM, init_params
from glm_jax.optim import OptimConfig
from glm_jax.pair_objectives import REFERENCE_FIELD, PairObjective
from glm_jax.peft import PeftConfig, base_identity, split
from glm_jax.preference import answer_example, preference_builder, segments_needed
from glm_jax.sft import to_sample
from glm_jax.train import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import finetune  # noqa: E402
import make_preference_set  # noqa: E402
import score_rewards  # noqa: E402

SHORT = ["--max-source", "24", "--max-target", "24"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A float32 tiny base, and the small preference set (English, the other language's answer
    rejected) split into 256 training and 64 held-out pairs."""
    root = tmp_path_factory.mktemp("dpo")
    config = get_config("glm-tiny", num_layers=2, dtype="float32", hidden_dropout=0.0, attention_dropout=0.0)
    base = str(root / "base")
    save_serving(base, config, move_to_device(init_params(config, jax.random.key(0))), 1, "test")
    every = str(root / "all.jsonl")
    make_preference_set.main(["--out", every, "--lang", "en", "--limit", "320"])
    lines = open(every, encoding="utf-8").readlines()
    train, held = str(root / "train.jsonl"), str(root / "held.jsonl")
    open(train, "w", encoding="utf-8").writelines(lines[:256])
    open(held, "w", encoding="utf-8").writelines(lines[256:])
    return root, base, train, held


def run(setup, out, steps, *extra, method="lora"):
    root, base, train, held = setup
    flags = ["--method", method, "--checkpoint", base, "--data", train, "--eval-data", held, "--out", str(root / out)]
    flags += ["--steps", str(steps), "--batch", "8", "--eval-every", str(steps), "--mesh", "1x1x1", "--no-progress"]
    flags += [*SHORT, *extra]
    return finetune.main(flags)


# ---- the objective on a batch ---------------------------------------------------------------------
def _hidden(config, params, batch):
    return GLM(config).apply({"params": params}, batch, method=lambda m, b: m.blocks(m.embed(b), b))


@pytest.fixture(scope="module")
def pairs(setup):
    """Two packed rows of real pairs (the glm family), a tiny model with LoRA (B != 0)
    and a value head, a reference model, and every answer scored alone (one jitted batch):
    {"policy": [A] summed log-probabilities, "length": [A], "reference": [A], "value": [A] at the
    answer's last position}, answers in pair order (chosen, rejected, chosen, ...)."""
    _, base, train, _ = setup
    model = load_model(base)
    rows = preference_builder(
        [train], model.family, model.tokenizer, model.config.position_encoding_2d, 120, 12, 12, shuffle=False, limit=6
    )
    batch = {k: np.stack([row[k] for row in rows.sequences[:2]]) for k in rows.sequences[0]}
    config = PeftConfig("lora", value_head=True).model_config(model.config)
    params = init_params(config, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params)
    reference = init_params(model.config, jax.random.key(2))
    n = segments_needed([rows])
    answers = {k: np.zeros((4 * len(batch["tokens"]), 120), np.int32) for k in batch}
    count = 0
    for r in range(len(batch["tokens"])):
        for seg in range(1, n + 1):
            where = batch["segment_ids"][r] == seg
            if where.any():
                for k in batch:
                    answers[k][count, : where.sum()] = batch[k][r][where]
                answers["segment_ids"][count, : where.sum()] = 1
                count += 1
    answers = {k: v[:count] for k, v in answers.items()}

    @jax.jit
    def alone(params, reference, a):
        mask = a["loss_mask"].astype(jnp.float32)
        h = _hidden(config, params, a)
        policy = alignment.token_logprobs(GLM(config).apply({"params": params}, h, method=GLM.head), a["targets"])
        ref = alignment.token_logprobs(GLM(model.config).apply({"params": reference}, a), a["targets"])
        values = GLM(config).apply({"params": params}, h, method=GLM.values)
        last = a["loss_mask"].shape[1] - 1 - jnp.argmax(a["loss_mask"][:, ::-1], axis=1)
        return {
            "policy": jnp.sum(policy * mask, 1),
            "length": mask.sum(1),
            "reference": jnp.sum(ref * mask, 1),
            "value": jnp.take_along_axis(values, last[:, None], 1)[:, 0],
        }

    scored = jax.tree_util.tree_map(np.asarray, alone(params, reference, answers))
    fields = {k: jnp.asarray(v) for k, v in batch.items()}
    ref_logps = alignment.token_logprobs(GLM(model.config).apply({"params": reference}, fields), fields["targets"])
    fields[REFERENCE_FIELD] = ref_logps * fields["loss_mask"]
    h = jax.jit(lambda p, b: _hidden(config, p, b))(params, fields)
    return config, params, fields, h, n, scored, model


def _formula(kind, s, beta, gamma):
    """The pair losses [P] from answers scored alone (`pairs`' dict, chosen at even indices)."""
    pi_c, pi_r = s["policy"][0::2], s["policy"][1::2]
    n_c, n_r = s["length"][0::2], s["length"][1::2]
    ref_c, ref_r = s["reference"][0::2], s["reference"][1::2]
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    if kind == "reward":
        return -log_sig(s["value"][0::2] - s["value"][1::2])
    if kind == "dpo":
        return -log_sig(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    if kind == "ipo":
        return ((pi_c / n_c - ref_c / n_c) - (pi_r / n_r - ref_r / n_r) - 1 / (2 * beta)) ** 2
    if kind == "simpo":
        return -log_sig(beta * pi_c / n_c - beta * pi_r / n_r - gamma)
    odds = lambda m: m - np.log1p(-np.exp(m))  # noqa: E731
    return -pi_c / n_c - beta * log_sig(odds(pi_c / n_c) - odds(pi_r / n_r))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo", "reward"])
def test_pair_loss_is_its_formula_on_answers_scored_alone(pairs, kind):
    config, params, fields, h, n, scored, _ = pairs
    objective = PairObjective(kind, n, beta=0.5, simpo_gamma=0.3)
    loss_sum, count = objective.head_loss(config, params, h, fields)
    expected = _formula(kind, jax.tree_util.tree_map(lambda x: x.astype(np.float64), scored), 0.5, 0.3)
    assert int(count) == len(expected) >= 3 and float(objective.units(fields)) == len(expected)
    np.testing.assert_allclose(float(loss_sum) / float(count), expected.mean(), rtol=2e-5, atol=2e-6)
    # room for more pairs than a row holds: the absent ones change nothing and their gradient is 0, never NaN
    roomy = PairObjective(kind, n + 2, beta=0.5, simpo_gamma=0.3)
    np.testing.assert_allclose(roomy.head_loss(config, params, h, fields)[0], loss_sum, rtol=1e-6)
    grad = jax.grad(lambda h: roomy.head_loss(config, params, h, fields)[0])(h)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


@pytest.mark.slow
def test_pair_objective_on_a_mesh_equals_one_device(pairs):
    """DPO with LoRA, the reference from the frozen base: loss and gradients of a pass on a
    2 x 2 x 2 (data x stage x tensor) mesh under 1F1B (its per-microbatch loss is GPipe's, its
    cotangent divides by the pairs: `PairObjective.units`) equal one device's."""
    config, params, fields, _, n, _, _ = pairs
    batch = {k: np.asarray(v) for k, v in fields.items() if k != REFERENCE_FIELD}
    config = config.override(value_head=False)
    peft = PeftConfig("lora")
    params = {k: v for k, v in params.items() if k != "value_head"}
    trainable, frozen = split(params, peft, config)
    objective = PairObjective("dpo", n)
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 4 rows
    results = []
    for mesh_spec, schedule in (("1x1x1", None), ("2x2x2", "1f1b")):
        mesh = sh.make_mesh(mesh_spec, jax.devices()[: np.prod([int(x) for x in mesh_spec.split("x")])])
        trainer = Trainer(config, OptimConfig(), mesh, 4, peft=peft, schedule=schedule, objective=objective)
        trainer.set_frozen(frozen)
        state = trainer.init_state(0, trainable)
        with trainer.context():
            placed = trainer.with_reference(state.params, trainer.place_batch(batch))
            grads, loss_sum, units = trainer.grad_pass(state.params, placed, None, 0.1, 1.0)
            grads = trainer.plain_params(grads)
        results.append((float(loss_sum), float(units), jax.tree_util.tree_map(np.asarray, grads)))
    for loss_sum, units, grads in results[1:]:
        assert units == results[0][1]
        np.testing.assert_allclose(loss_sum, results[0][0], rtol=1e-5)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, results[0][2]
        )


# ---- finetune.py ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_lora_starts_at_log2_and_learns_held_out_pairs(setup):
    report = run(setup, "dpo", 12, "--objective", "dpo", "--lr", "2e-3")
    assert report["objective"] == "dpo" and report["eval_pairs"] == 64
    assert abs(report["first_loss"] - math.log(2)) < 1e-6 and abs(report["initial_eval_loss"] - math.log(2)) < 1e-6
    assert report["eval_pair_accuracy"] >= 0.75 and report["eval_reward_margin"] > 0
    lines = [json.loads(x) for x in open(os.path.join(setup[0], "dpo", "logs", "metrics.jsonl"))]
    assert [x["step"] for x in lines if "eval_pair_accuracy" in x] == [0, 12]
    adapter = load_model(setup[1], adapter=report["adapter_dir"])
    assert adapter.config.lora_rank == 8 and not adapter.config.value_head


def _sigterm_when(path, timeout=300):
    t0 = time.time()
    while not os.path.isdir(path) and time.time() - t0 < timeout:
        time.sleep(0.002)
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_freeze_dpo_reference_cache_is_the_base_and_survives_a_resume(setup, capfd):
    """freeze (the last layer) holds no frozen copy of the layers it trains: its reference is the
    cache, scored once by the base; a run stopped after step 2 and resumed reads it back instead of
    scoring again (that a resumed run ends as an uninterrupted one: test_finetune.py)."""
    root, base, train, _ = setup
    flags = ["--objective", "dpo", "--lr", "1e-3", "--ckpt-every", "2", "--set", "trainable_layers=1"]
    flags += ["--eval-limit", "8"]
    stopper = threading.Thread(target=_sigterm_when, args=(root / "frozen-a" / "checkpoints" / "2",), daemon=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not stop pytest
    try:
        stopper.start()
        first = run(setup, "frozen-a", 8, *flags, method="freeze")  # SIGTERM once step 2 is saved
        stopper.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert first["interrupted"] and first["steps"] < 8 and abs(first["first_loss"] - math.log(2)) < 1e-6
    table_path = root / "frozen-a" / "reference" / "train.npy"
    mtime, table = os.path.getmtime(table_path), np.load(table_path)
    model = load_model(base)  # the cached rows are the base's answer log-probabilities
    two_d = model.config.position_encoding_2d
    rows = preference_builder([train], model.family, model.tokenizer, two_d, 104, 24, 24, seed=0)
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows.sequences[:4]])) for k in rows.sequences[0]}
    lp = alignment.token_logprobs(GLM(model.config).apply({"params": model.params}, batch), batch["targets"])
    np.testing.assert_allclose(table[:4], np.asarray(lp * batch["loss_mask"]), rtol=1e-5, atol=1e-5)
    capfd.readouterr()
    resumed = run(setup, "frozen-a", 8, *flags, method="freeze")
    assert "train read from" in capfd.readouterr().err and os.path.getmtime(table_path) == mtime
    steps = [x["step"] for x in map(json.loads, open(root / "frozen-a" / "logs" / "metrics.jsonl")) if "loss" in x]
    assert resumed["steps"] == 8 and steps == list(range(1, 9)) and resumed["eval_pair_accuracy"] is not None


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs_and_scores_answers(setup, pairs, tmp_path):
    root, base, _, held = setup
    report = run(setup, "rm", 12, "--objective", "reward", "--lr", "1e-2")
    assert report["objective"] == "reward" and report["eval_loss"] < report["initial_eval_loss"] - 0.1
    assert report["eval_pair_accuracy"] >= 0.65 and report["eval_reward_margin"] > 0.3
    answers = tmp_path / "answers.jsonl"
    with open(answers, "w", encoding="utf-8") as f:
        for line in open(held, encoding="utf-8").readlines()[:8]:
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                f.write(json.dumps({"prompt": row["prompt"], "answer": row[side], "side": side}) + "\n")
        f.write("{broken\n")
    scored_path = str(tmp_path / "scored.jsonl")
    flags = ["--checkpoint", base, "--adapter", report["adapter_dir"], "--input", str(answers), "--output"]
    summary = score_rewards.main(flags + [scored_path, *SHORT, "--batch", "4"])
    assert summary["scored"] == 16 and summary["skipped"] == {"bad_json": 1}
    scored = [json.loads(x) for x in open(scored_path)]
    chosen = np.array([r["reward"] for r in scored if r["side"] == "chosen"])
    rejected = np.array([r["reward"] for r in scored if r["side"] == "rejected"])
    assert chosen.mean() > rejected.mean()
    # a score is the value head at the answer's last position, as inside a packed training pair
    model = load_model(base, adapter=report["adapter_dir"])
    ids, mask = answer_example(scored[0], model.family, model.tokenizer, 24, 24)
    sample = to_sample(ids, mask, model.family, model.tokenizer, model.config.position_encoding_2d)
    one = {k: jnp.asarray(v[None]) for k, v in sample.items()}
    one["segment_ids"] = jnp.ones_like(one["tokens"])
    h = _hidden(model.config, model.params, one)
    values = GLM(model.config).apply({"params": model.params}, h, method=GLM.values)
    assert scored[0]["reward"] == pytest.approx(float(values[0, len(ids) - 2]), rel=1e-4, abs=1e-5)
    plain = load_model(base)  # an adapter without a value head is refused
    config = PeftConfig("lora").model_config(plain.config)
    trainable = split(init_params(config, jax.random.key(3)), PeftConfig("lora"), config)[0]
    identity = base_identity(plain.config, plain.params, plain.step)
    lora = save_adapter(str(tmp_path), config, PeftConfig("lora"), trainable, 1, identity, "glm", None)
    with pytest.raises(SystemExit) as bad:
        score_rewards.main(["--checkpoint", base, "--adapter", lora, "--input", str(answers), "--output", scored_path])
    assert bad.value.code == 2


@pytest.mark.slow
def test_bad_preference_flags_exit_2(setup, capsys):
    for extra in (["--objective", "dpo", "--mix", f"{setup[2]}:0.2"], ["--objective", "dpo", "--beta", "0"]):
        with pytest.raises(SystemExit) as e:
            run(setup, "bad", 1, *extra)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_full_reward_model_starts_from_the_base_and_a_fresh_value_head():
    """freeze / full train the base's own weights: the base gives them, and the value head it
    lacks is initialised."""
    config = get_config("glm-tiny", dtype="float32", num_layers=2, vocab_size=256)
    base = init_params(config, jax.random.key(0))
    peft = PeftConfig("full", value_head=True)
    trainer = Trainer(peft.model_config(config), OptimConfig(), sh.make_mesh("1x1x1", jax.devices()[:1]), 2, peft=peft)
    params = trainer.init_state(0, split(base, peft, peft.model_config(config))[0]).params
    assert params["value_head"]["kernel"].shape == (config.hidden_size, 1)
    np.testing.assert_array_equal(params["word_embeddings"]["embedding"], base["word_embeddings"]["embedding"])
