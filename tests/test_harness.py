"""The lm-evaluation-harness model: its calls equal our scorer and generator, and a local task
YAML over ../shared's LAMBADA rows gives the accuracy our greedy protocol gives on the same rows."""

import json
import os
import pathlib

import jax
import pytest
import sharding_case as case

from glm_jax import sharding as sh
from glm_jax.checkpoints import Checkpoints
from glm_jax.evaluate import ModelScorer, lambada_greedy, read_lambada
from glm_jax.optim import OptimConfig
from glm_jax.tokenizer import GLMTokenizer
from glm_jax.train import Trainer
from glm_jax.train_state import save_state

assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # conftest: lm-eval's datasets never reach the hub
lm_eval = pytest.importorskip("lm_eval")

LAMBADA = pathlib.Path(__file__).parents[2] / "shared" / "data" / "lambada" / "lambada_test.jsonl"


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def harness_model(tmp_path_factory):
    import glm_jax.harness as harness

    c = case.config(num_layers=2, vocab_size=32000)
    path = tmp_path_factory.mktemp("h") / "ck"
    t = Trainer(c, OptimConfig(), sh.make_mesh("1x1", jax.devices()[:1]), 1)
    ckpt = Checkpoints(str(path), async_save=False)
    save_state(ckpt, t, 3, t.init_state(0), {"config": c.to_dict()})
    ckpt.close()
    return harness.GLMJaxLM(checkpoint=str(path), batch_size=4, max_gen_toks=4)


def test_calls_equal_our_scorer_and_generator(harness_model):
    lm, tok = harness_model, GLMTokenizer()
    got = lm.loglikelihood([Req("The sea is", " blue"), Req("", " Hello")])
    rows = [
        (tok.encode("The sea is") + [tok.gmask_id, tok.sop_id], tok.encode(" blue")),
        ([tok.gmask_id, tok.sop_id], tok.encode(" Hello")),
    ]
    want = ModelScorer(lm.model.config, lm.model.params, tok, batch_size=4).score(rows)
    assert got == [(lp, hit) for lp, _, hit in want]
    rolling = lm.loglikelihood_rolling([Req("one two three four")])[0]
    assert rolling < 0 and rolling == pytest.approx(
        sum(
            lp
            for lp, _, _ in ModelScorer(lm.model.config, lm.model.params, tok).score(
                [([tok.gmask_id, tok.sop_id], tok.encode("one two three four"))]
            )
        ),
        abs=1e-4,
    )
    texts = lm.generate_until([Req("The sea", {"until": ["\n"], "max_gen_toks": 3}), Req("A", {"max_gen_toks": 2})])
    ids = lm.scorer.generator.generate([tok.encode("The sea") + [tok.gmask_id, tok.sop_id]], 3)[0]
    assert texts[0] == tok.decode(ids).split("\n")[0] and isinstance(texts[1], str)


@pytest.mark.slow
@pytest.mark.skipif(not LAMBADA.is_file(), reason="../shared LAMBADA absent")
def test_a_local_task_yaml_agrees_with_our_lambada_greedy(harness_model, tmp_path):
    from lm_eval.tasks import TaskManager

    rows = LAMBADA.read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "lambada.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "glm_lambada_local.yaml").write_text(f"""task: glm_lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "lambada.jsonl"}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.strip().rsplit(' ', 1)[0]}}}}"
doc_to_target: "{{{{' ' + text.strip().rsplit(' ', 1)[1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    out = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=["glm_lambada_local"],
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    acc = out["results"]["glm_lambada_local"]["acc,none"]
    examples = read_lambada(str(tmp_path / "lambada.jsonl"))
    tok = GLMTokenizer()
    ours = lambada_greedy(examples, tok, harness_model.scorer.score)
    assert len(examples) == 6 and acc == pytest.approx(sum(ours) / len(ours))
    # row by row: the harness's log-likelihood of each target is our scorer's
    rows = [(tok.encode(c) + [tok.gmask_id, tok.sop_id], tok.encode(" " + t)) for c, t in examples]
    want = [lp for lp, _, _ in harness_model.scorer.score(rows)]
    samples = sorted(out["samples"]["glm_lambada_local"], key=lambda x: x["doc_id"])
    got = [float(sample["resps"][0][0][0]) for sample in samples]
    assert got == pytest.approx(want, abs=1e-5) and all(g < 0 for g in got)
    json.dumps(out["results"])  # a plain result


def test_the_model_on_a_mesh_scores_as_one_device(harness_model):
    """`mesh=2x1x2`: the checkpoint loaded onto 2 data x 2 tensor shards gives one device's
    log-likelihoods; harness_eval.py finds the spec in lm-eval's --model_args to simulate devices."""
    import glm_jax.harness as harness

    lm = harness.GLMJaxLM(checkpoint=harness_model.model.path, batch_size=4, mesh="2x1x2")
    assert dict(lm.mesh.shape) == {"data": 2, "stage": 1, "tensor": 2}
    leaves = jax.tree_util.tree_leaves(lm.scorer.params)
    assert all(len(leaf.sharding.device_set) == 4 for leaf in leaves)
    assert any("tensor" in leaf.sharding.spec for leaf in leaves)  # loaded split over the tensor axis
    requests = [Req("The sea is", " blue"), Req("", " Hello"), Req("one two", " three four")]
    got, want = lm.loglikelihood(requests), harness_model.loglikelihood(requests)
    assert [hit for _, hit in got] == [hit for _, hit in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5, abs=1e-5)

    import importlib.util

    script_path = pathlib.Path(__file__).parents[1] / "experiments" / "harness_eval.py"
    spec = importlib.util.spec_from_file_location("harness_eval", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mesh_arg = script.mesh_arg
    assert mesh_arg(["run", "--model_args", "checkpoint=d,mesh=1x8", "--tasks", "t"]) == "1x8"
    assert mesh_arg(["run", "-a", "checkpoint=d", "mesh=2x1x4"]) == "2x1x4"
    assert mesh_arg(["run", '--model_args={"checkpoint": "d", "mesh": "1x2"}']) == "1x2"
    assert mesh_arg(["run", "--model_args", "checkpoint=d", "--tasks", "mesh=1x2"]) is None
