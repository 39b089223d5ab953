"""Inference on a mesh (placement.py): loading straight into shardings, quantize-on-load sharded,
generation (greedy, seeded sampling, beam search, blanks) and scoring on (data, 1, tensor) meshes
equal to one device; bad meshes are clear errors naming the axis."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from mesh_case import CONFIG, mesh
from script_runs import ROOT

from glm_jax import placement
from glm_jax.checkpoints import move_to_device, save_serving
from glm_jax.evaluate import ModelScorer
from glm_jax.generate import Generator, fill_blanks
from glm_jax.loading import load_checkpoint
from glm_jax.model import init_params
from glm_jax.quant import quantize_params
from glm_jax.tokenizer import GLM_IDS

_spec = importlib.util.spec_from_file_location("lambada_eval", ROOT / "experiments" / "lambada_eval.py")
lambada_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lambada_eval)
LAMBADA = str(ROOT.parent / "shared" / "data" / "lambada" / "lambada_test.jsonl")
PROMPTS = [[5, 6, 7, GLM_IDS.gmask], [9, GLM_IDS.mask, 11, 12, 13], [20, 21, GLM_IDS.gmask]]  # 3 rows: padded


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(3))


@pytest.fixture(scope="module")
def reference(params):
    gen = Generator(CONFIG, params)
    return {
        "greedy": gen.generate(PROMPTS, 6),
        "sampled": gen.generate(PROMPTS, 6, temperature=0.9, top_p=0.9, key=jax.random.key(7)),
        "beams": gen.beam_search(PROMPTS[0], 3, 4),
        "blanks": fill_blanks(gen, [4, GLM_IDS.mask, 8, GLM_IDS.mask, 9], 3),
        "logits": np.asarray(gen.step(gen.start(gen.prompts(PROMPTS), 4), [GLM_IDS.sop] * 3, 0)),
    }


@pytest.mark.parametrize("spec", ["2x1x2", "1x4"])
def test_generation_on_a_mesh_equals_one_device(params, reference, spec):
    gen = Generator(CONFIG, params, mesh=mesh(spec))
    logits = np.asarray(gen.step(gen.start(gen.prompts(PROMPTS), 4), [GLM_IDS.sop] * 3, 0))
    np.testing.assert_allclose(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    top2 = np.sort(reference["logits"], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # the first tokens are decided, not ties
    assert gen.generate(PROMPTS, 6) == reference["greedy"]
    assert gen.generate(PROMPTS, 6, temperature=0.9, top_p=0.9, key=jax.random.key(7)) == reference["sampled"]
    beams = gen.beam_search(PROMPTS[0], 3, 4)
    assert [b for b, _ in beams] == [b for b, _ in reference["beams"]]
    np.testing.assert_allclose([s for _, s in beams], [s for _, s in reference["beams"]], rtol=1e-5)
    assert fill_blanks(gen, [4, GLM_IDS.mask, 8, GLM_IDS.mask, 9], 3) == reference["blanks"]
    cache = gen.start(gen.prompts(PROMPTS), 4)["cache"]
    assert cache[0][0].shape[0] == placement.padded_rows(3, gen.mesh)
    assert cache[0][0].sharding.is_equivalent_to(placement.cache_sharding(CONFIG, gen.mesh), 4)


@pytest.mark.slow
def test_scoring_on_a_mesh_equals_one_device_float_and_int4(params):
    rows = [([5, 6, GLM_IDS.gmask], [7, 8, 9]), ([10, GLM_IDS.mask, 12], [13]), ([14, 15, GLM_IDS.gmask], [16, 17])]
    for config, tree in ((CONFIG, params), (CONFIG.override(quantization="int4"), None)):
        tree = quantize_params(params, config) if tree is None else tree
        alone = ModelScorer(config, tree, batch_size=3).score(rows)
        sharded = ModelScorer(config, tree, batch_size=3, mesh=mesh("2x1x2"))
        assert sharded.batch_size == 4  # rows padded to the data axis
        got = sharded.score(rows)
        np.testing.assert_allclose([g[0] for g in got], [a[0] for a in alone], rtol=1e-5, atol=1e-5)
        assert [g[1:] for g in got] == [a[1:] for a in alone]
    int4 = CONFIG.override(quantization="int4")
    qparams = quantize_params(params, int4)
    alone = Generator(int4, qparams).generate(PROMPTS, 5)
    assert Generator(int4, qparams, mesh=mesh("1x4")).generate(PROMPTS, 5) == alone


def test_load_model_onto_a_mesh(params, tmp_path):
    path = str(tmp_path / "ckpt")
    save_serving(path, CONFIG, move_to_device(jax.tree_util.tree_map(np.asarray, params)), 1, "test")
    on_mesh = mesh("2x1x2")
    for quantize in (None, "int4"):
        config, loaded, _ = load_checkpoint(path, quantize=quantize, mesh=on_mesh)
        one = load_checkpoint(path, quantize=quantize)[1]
        for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(one)):
            assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))  # same bytes
        tensor = 2
        specs = placement.param_shardings(config, on_mesh)
        expected = 0
        for leaf, sharding in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(specs)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
            split = "tensor" in jax.tree_util.tree_leaves(tuple(sharding.spec))
            expected += leaf.nbytes // (tensor if split else 1)
            if leaf.ndim >= 3 and split:  # a layer stack: no device holds it whole
                assert all(s.data.nbytes < leaf.nbytes for s in leaf.addressable_shards)
        assert placement.bytes_per_device(loaded) == expected
    with pytest.raises(Exception, match="stage axis of 2"):
        load_checkpoint(path, mesh=mesh("2x2"))
    with pytest.raises(Exception, match="tensor axis of 16"):
        load_checkpoint(path, mesh=mesh("1x16"))


@pytest.fixture(scope="module")
def script_checkpoint(tmp_path_factory):
    """A tiny checkpoint our 32k tokenizer fits, for the scripts' --mesh."""
    config = CONFIG.override(vocab_size=32000, vocab_pad_multiple=128)
    path = str(tmp_path_factory.mktemp("script") / "ckpt")
    save_serving(path, config, move_to_device(init_params(config, jax.random.key(5))), 1, "test")
    return path


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(LAMBADA), reason="LAMBADA rows absent (../shared/data)")
def test_scripts_take_a_mesh_and_report_it(script_checkpoint, capsys):
    run = lambda *flags: lambada_eval.main(
        ["--checkpoint", script_checkpoint, "--data", LAMBADA, "--limit", "4", *flags]
    )
    alone, sharded = run(), run("--mesh", "2x1x2")
    assert alone["mesh"] == {"data": 1, "stage": 1, "tensor": 1} and sharded["mesh"] == {
        "data": 2,
        "stage": 1,
        "tensor": 2,
    }
    assert sharded["param_bytes_per_device"] < 0.6 * alone["param_bytes_per_device"]
    assert sharded["accuracy"] == alone["accuracy"] and sharded["n"] == alone["n"] == 4
    for bad, axis in (("2x2", "stage axis of 2"), ("1x16", "tensor axis of 16")):
        with pytest.raises(SystemExit) as stop:
            run("--mesh", bad)
        assert stop.value.code == 2 and axis in capsys.readouterr().err


def test_a_consuming_generator_holds_the_weights_once(params, reference):
    copy = jax.tree_util.tree_map(lambda x: x + 0, params)  # ours to hand over
    stacked = jax.tree_util.tree_leaves(copy["layers"])
    gen = Generator(CONFIG, copy, consume=True)
    assert all(leaf.is_deleted() for leaf in stacked)  # split, then freed: no second copy
    assert gen.generate(PROMPTS, 6) == reference["greedy"]
