"""finetune.py / finetune_eval.py end to end on a tiny base: resume, adapters on load, merge, errors."""

import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_forward import forward

from glm_jax.checkpoints import CheckpointError, move_to_device, save_serving
from glm_jax.config import get_config
from glm_jax.loading import load_model
from glm_jax.model import init_params
from glm_jax.quant import quantize_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import finetune  # noqa: E402
import finetune_eval  # noqa: E402

pytestmark = pytest.mark.slow
ROWS = [
    {"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子很好看，适合{i}月穿。"}
    for i, c in enumerate(["红色", "蓝色", "白色", "黑色", "绿色", "黄色"] * 2)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    c = get_config("glm-tiny", num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    bases = []
    for seed in (0, 1):
        path = str(root / f"base{seed}")
        save_serving(path, c, move_to_device(init_params(c, jax.random.key(seed))), 5, "test")
        bases.append(path)
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    return root, bases, str(data)


def run(setup, out, method, steps, *extra, held_out=True):
    root, bases, data = setup
    return finetune.main(
        [
            "--method",
            method,
            "--checkpoint",
            bases[0],
            "--data",
            data,
            *(["--eval-data", data] if held_out else []),
            "--out",
            str(root / out),
            "--steps",
            str(steps),
            "--batch",
            "4",
            "--max-source",
            "16",
            "--max-target",
            "16",
            "--eval-every",
            "2",
            "--ckpt-every",
            "2",
            "--mesh",
            "1x1x1",
            "--no-progress",
            *extra,
        ]
    )


def losses(setup, out):
    path = setup[0] / out / "logs" / "metrics.jsonl"
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, open(path))]


def _sigterm_when(path, timeout=120):
    t0 = time.time()
    while not os.path.isdir(path) and time.time() - t0 < timeout:
        time.sleep(0.002)
    os.kill(os.getpid(), signal.SIGTERM)


def probe_logits(model):
    b = {
        k: jnp.asarray(v, jnp.int32)[None]
        for k, v in dict(
            tokens=np.arange(10, 22),
            position_ids=np.arange(12),
            block_position_ids=np.zeros(12),
            segment_ids=np.ones(12),
            prefix_mask=np.arange(12) < 6,
        ).items()
    }
    return np.asarray(forward(model.config, model.params, b))


def test_lora_resumes_exactly_merges_and_checks_its_base(setup):
    root, bases, data = setup
    whole = run(setup, "a", "lora", 8, "--merge")
    assert whole["steps"] == 8 and whole["trainable_params"] < 0.05 * whole["frozen_params"]
    assert whole["initial_eval_loss"] is not None and whole["eval_loss"] is not None
    stopper = threading.Thread(target=_sigterm_when, args=(root / "b" / "checkpoints" / "2",), daemon=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not stop pytest
    try:
        stopper.start()
        first = run(setup, "b", "lora", 8, held_out=False)  # SIGTERM once step 2 is saved: saves and stops
        stopper.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert first["interrupted"] and first["steps"] < 8
    run(setup, "b", "lora", 8, held_out=False)  # the same command resumes
    a, b = losses(setup, "a"), losses(setup, "b")
    assert [x for x in b if x[1] is not None] == [x for x in a if x[1] is not None]
    # the adapter holds the LoRA leaves only; on its base it equals the merged checkpoint
    with_adapter = load_model(bases[0], adapter=str(root / "a"))
    merged = load_model(str(root / "a" / "merged"))
    assert merged.config.lora_rank == 0 and with_adapter.config.lora_rank == 8
    # bf16 compute: the merged kernel rounds W + BA once, the adapter path rounds each product
    np.testing.assert_allclose(probe_logits(with_adapter), probe_logits(merged), atol=4e-3, rtol=0)
    assert np.abs(probe_logits(with_adapter) - probe_logits(load_model(bases[0]))).max() > 0  # it trained
    with pytest.raises(CheckpointError, match="another base"):
        load_model(bases[1], adapter=str(root / "a"))
    with pytest.raises(SystemExit) as exit_:  # another method into the same run folder
        run(setup, "a", "ptuning", 4)
    assert exit_.value.code == 2
    # held-out generation and scores, with the adapter on an INT4 base
    report = finetune_eval.main(
        [
            "--checkpoint",
            bases[0],
            "--adapter",
            str(root / "a"),
            "--quantize",
            "int4",
            "--data",
            data,
            "--limit",
            "3",
            "--out",
            str(root / "pred.jsonl"),
            "--max-target",
            "8",
            "--no-progress",
        ]
    )
    assert report["n"] == 3 and np.isfinite(report["loss"])
    assert set(report) >= {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    lines = [json.loads(x) for x in open(root / "pred.jsonl")]
    assert [x["index"] for x in lines] == [0, 1, 2] and set(lines[0]) == {"index", "prompt", "reference", "prediction"}


def test_ptuning_prefix_travels_inside_the_merged_checkpoint(setup):
    root, bases, _ = setup
    mix = f"{setup[2]}:0.5"  # the same rows replayed as "general" data: as many again
    summary = run(setup, "p", "ptuning", 2, "--merge", "--set", "pre_seq_len=4", "--quantize", "int8", "--mix", mix)
    assert summary["trainable_params"] == 4 * 2 * 2 * 128  # P x layers x (k, v) x kv width
    assert summary["trainable_dtype"] == summary["moment_dtype"] == "float32"
    assert summary["train_data"]["mixed"] == {setup[2]: summary["train_data"]["samples"] // 2}
    merged = load_model(str(root / "p" / "merged"))
    assert merged.config.pre_seq_len == 4 and "prefix_encoder" in merged.params
    np.testing.assert_allclose(
        probe_logits(merged), probe_logits(load_model(bases[0], adapter=str(root / "p"))), atol=1e-5
    )


def test_bad_flags_exit_2(setup, capsys):
    with pytest.raises(SystemExit) as e:
        run(setup, "bad", "full", 2, "--quantize", "int4")
    assert e.value.code == 2 and "adapter method" in capsys.readouterr().err
    # --merge reads the float base again at the end: LoRA on an INT4 checkpoint cannot merge (said before training)
    root, bases, data = setup
    c = load_model(bases[0]).config.override(quantization="int4")
    save_serving(
        str(root / "int4"),
        c,
        move_to_device(quantize_params(init_params(c.override(quantization="none"), jax.random.key(0)), c)),
        5,
        "test",
    )
    with pytest.raises(SystemExit) as e:
        finetune.main(
            [
                "--method",
                "lora",
                "--checkpoint",
                str(root / "int4"),
                "--data",
                data,
                "--out",
                str(root / "bad"),
                "--merge",
            ]
        )
    assert e.value.code == 2 and "merges into float weights" in capsys.readouterr().err
    assert not (root / "bad" / "checkpoints").exists()
    for mix, says in (("nowhere.json:0.2", "no file"), (f"{setup[2]}:lots", "FILE:SHARE"), (f"{setup[2]}:1", "(0, 1)")):
        with pytest.raises(SystemExit) as e:
            run(setup, "bad", "lora", 2, "--mix", mix)
        assert e.value.code == 2 and says in capsys.readouterr().err
