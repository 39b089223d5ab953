"""The serving engine on a (data, 1, tensor) mesh equals the engine on one device: greedy and seeded
sampled requests, one cancelled mid-way, slots reused; one compiled decode step whatever mixes."""

import concurrent.futures as cf
import logging

import jax
import pytest
from mesh_case import CONFIG
from mesh_case import mesh as mesh_of

from glm_jax import placement
from glm_jax.model import init_params
from glm_jax.peft import PeftConfig
from glm_jax.serving.engine import Engine, Request, Sampling, run
from glm_jax.tokenizer import GLM_IDS as I

# every context fits the smallest prefill bucket (16): one prefill shape per engine
PROMPTS = [[5, 6, 7, I.gmask], [9, I.mask, 11, 12, 13], [20, 21, I.gmask], [30, 31, I.smask, 32], [40] * 8 + [I.gmask]]
SETTINGS = [  # greedy and seeded sampled (temperature alone, top-p, top-k)
    Sampling(),
    Sampling(0.9, seed=7),
    Sampling(1.1, top_p=0.8, seed=3),
    Sampling(),
    Sampling(0.7, top_k=5, seed=11),
]
REQUESTS = 7  # more than the slots (3, or 4 on data=2): slots are reused
CANCELLED = 2  # this request cancels itself after its third token


def serve(engine: Engine) -> list[tuple[list[int], str, int]]:
    """Every request submitted at once from its own thread -> [(ids, finish_reason, generated)]."""

    def one(i):
        req = Request(PROMPTS[i % 5], 10, SETTINGS[i % 5])
        if i == CANCELLED:
            req.on_token = lambda token: engine.cancel(req) if req.generated == 3 else None
        ids, reason = run(engine, req)
        return ids, reason, req.generated

    engine.start()
    try:
        with cf.ThreadPoolExecutor(REQUESTS) as pool:
            return list(pool.map(one, range(REQUESTS)))
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def params():
    # scaled: at init scale greedy decoding repeats one id whatever the prompt, which would prove little
    return jax.tree_util.tree_map(lambda x: 4 * x, init_params(CONFIG, jax.random.key(3)))


@pytest.fixture(scope="module")
def reference(params):
    out = serve(Engine(CONFIG, params, slots=3))
    assert out[CANCELLED][1:] == ("cancelled", 3)
    assert all(reason == "length" for i, (_, reason, _) in enumerate(out) if i != CANCELLED)
    assert out[5] == out[0] and out[6] == out[1]  # a request repeated (greedy, one seed) repeats its tokens
    assert len({tuple(ids) for ids, _, _ in out}) == 5  # every other one differs
    return out


@pytest.mark.parametrize("spec", ["2x1x2", "1x4"])
def test_engine_on_a_mesh_equals_one_device(params, reference, spec, caplog):
    mesh = mesh_of(spec)
    engine = Engine(CONFIG, params, slots=3, mesh=mesh)
    assert engine.slots == placement.padded_rows(3, mesh)  # 4 on data=2: every slot serves
    assert engine.load()["mesh"] == {"data": mesh.shape["data"], "stage": 1, "tensor": mesh.shape["tensor"]}
    whole = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    assert placement.bytes_per_device(engine.params) < whole  # the weights are split over `tensor`
    with caplog.at_level(logging.DEBUG, logger="jax._src.interpreters.pxla"):  # JAX logs each program it lowers
        assert serve(engine) == reference
    # at most one decode step and one prefill (one bucket) compiled, whatever the batch held
    lowered = [r.getMessage().split(" ")[1] for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert lowered.count("jit(decode_slots)") <= 1 and lowered.count("jit(prefill_row)") <= 1, lowered
    for pair in engine.cache:
        for buffer in pair:
            assert buffer.sharding.is_equivalent_to(placement.cache_sharding(CONFIG, mesh), 4)
    assert engine.steps_run > 0 and engine.load()["active"] == 0


def test_ptuning_prefix_on_a_mesh_equals_one_device():
    """A P-tuning prefix (scaled up so it decides tokens): every prefill's fresh row cache gets it."""
    c = PeftConfig("ptuning", pre_seq_len=4).model_config(CONFIG.override(num_layers=1))
    params = init_params(c, jax.random.key(5))
    params["prefix_encoder"] = jax.tree_util.tree_map(lambda x: 8 * x, params["prefix_encoder"])
    settings = (Sampling(), Sampling(0.9, seed=2))

    def outputs(params, mesh=None):
        engine = Engine(c, params, slots=1, mesh=mesh).start()
        try:
            return [run(engine, Request(PROMPTS[i], 6, settings[i % 2]))[0] for i in range(3)]
        finally:
            engine.stop()

    alone = outputs(params)
    assert outputs(params, mesh_of("2x1x2")) == alone
    without = {**params, "prefix_encoder": jax.tree_util.tree_map(lambda x: 0 * x, params["prefix_encoder"])}
    assert outputs(without) != alone  # the prefix matters here (the same programs: no compile)
