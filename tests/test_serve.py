"""Serving: the continuous-batching engine against the generator, the text stream, and the HTTP
server (a subprocess on a free loopback port) through the official openai client, concurrency,
disconnects, a schemathesis fuzz run, the chat page in headless Chromium, a second server on a
two-device mesh, and SIGTERM."""

import concurrent.futures as cf
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from script_runs import ROOT, script_env

from glm_jax.checkpoints import move_to_device, save_serving
from glm_jax.config import get_config
from glm_jax.decoding import bucket_length, filter_logits
from glm_jax.generate import Generator
from glm_jax.model import init_params
from glm_jax.peft import PeftConfig
from glm_jax.quant import quantize_params
from glm_jax.serving.engine import Engine, QueueFull, Request, Sampling, run
from glm_jax.serving.text import TextStream
from glm_jax.tokenizer import GLM_IDS as I

pytestmark = pytest.mark.slow  # the server in a subprocess, end to end

KEY = "test-key"
PROMPTS = [[11, 12, 13, I.gmask], [21, I.mask, 22, 23, 24], [5] * 10 + [I.gmask], [30, 31, I.smask, 32]]


def tiny(**kw):
    return get_config(
        "glm-tiny",
        **{
            "dtype": "float32",
            "num_layers": 2,
            "vocab_size": 256,
            "max_sequence_length": 96,
            "tie_word_embeddings": False,
            **kw,
        },
    )


def engine_outputs(engine, prompts, new, sampling=lambda i: Sampling()):
    """Every prompt submitted at once from its own thread -> [(ids, finish_reason)]."""
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda i: run(engine, Request(prompts[i], new, sampling(i))), range(len(prompts))))


# ---- the engine --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["ptuning-2d", "int4-lora-causal"])
def test_engine_greedy_equals_the_generator(variant):
    """Continuous batching (2 slots, 4 requests, so slots are reused) gives the generator's greedy
    tokens for every request: a P-tuning prefix with 2D positions on a prefix LM, and LoRA on
    INT4 weights on a causal decoder."""
    c = tiny(position_encoding_2d=variant.endswith("2d"), num_layers=1)
    causal = variant.endswith("causal")
    peft = (
        PeftConfig("ptuning", pre_seq_len=4)
        if variant.startswith("ptuning")
        else PeftConfig("lora", lora_targets="query,value,dense")
    )
    c = peft.model_config(c)
    params = init_params(c, jax.random.key(0))  # the base and fresh adapter leaves
    if variant.startswith("int4"):
        params = jax.tree_util.tree_map_with_path(  # B is zeros at init: make the adapter do something
            lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
        )
        c = c.override(quantization="int4")
        params = quantize_params(params, c)
    prompts = [[I.gmask, I.sop] + p[:-1] for p in PROMPTS] if causal else PROMPTS
    gen = Generator(c, params, causal=causal)
    expected = [gen.generate([p], 6, stop_tokens=())[0] for p in prompts]
    engine = Engine(c, params, causal=causal, slots=2).start()
    try:
        got = engine_outputs(engine, prompts, 6)
    finally:
        engine.stop()
    assert [ids for ids, _ in got] == expected
    assert all(reason == "length" for _, reason in got)


def test_filtering_equals_the_sorted_reference():
    """Top-k / top-p by bisection keep exactly the ids a full sort keeps (numpy reference)."""
    logits = np.random.default_rng(0).normal(size=(5, 3000)).astype(np.float32) * 3
    top_p, top_k = np.array([0.9, 1.0, 0.5, 0.95, 0.3], np.float32), np.array([0, 0, 50, 3, 0])
    got = np.isfinite(np.asarray(jax.jit(filter_logits)(logits, top_p, top_k)))
    for row, p, k, kept in zip(logits, top_p, top_k, got):
        row = row.astype(np.float64)
        if k:
            row = np.where(row < np.sort(row)[-k], -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        want = np.isfinite(row)
        if p < 1:
            want = np.zeros_like(want)
            want[order[: int(((np.cumsum(probs[order]) - probs[order]) < p).sum())]] = True
        np.testing.assert_array_equal(kept, want)


@pytest.fixture(scope="module")
def engine():
    c = tiny()
    e = Engine(c, init_params(c, jax.random.key(1)), slots=4)
    e.warmup()
    e.start()
    yield e
    e.stop()


def test_engine_output_depends_only_on_the_request(engine):
    """Greedy and seeded sampled requests give the same tokens alone as among 8 others; the
    same seed repeats, another seed differs."""
    settings = [Sampling(), Sampling(0.9, seed=7), Sampling(1.2, top_p=0.8, seed=3), Sampling(0.7, top_k=5, seed=11)]
    alone = [run(engine, Request(PROMPTS[i % 4], 12, settings[i % 4]))[0] for i in range(4)]
    mixed = engine_outputs(engine, [PROMPTS[i % 4] for i in range(12)], 12, lambda i: settings[i % 4])
    assert [ids for ids, _ in mixed] == [alone[i % 4] for i in range(12)]
    other = run(engine, Request(PROMPTS[1], 12, Sampling(0.9, seed=8)))[0]
    assert other != alone[1]


def test_engine_stops_frees_slots_and_bounds_its_queue(engine):
    first = run(engine, Request(PROMPTS[0], 8))[0]
    # a stop id ends the request there (counted in generated); on_token can end it too
    req = Request(PROMPTS[0], 8, stop_ids=(first[2],))
    ids, reason = run(engine, req)
    assert (ids, reason, req.generated) == (first[:2], "stop", 3)
    req = Request(PROMPTS[0], 8, on_token=lambda t: t == first[4])
    assert run(engine, req) == (first[:5], "stop")
    # a prompt past the length limit is refused before it queues
    from glm_jax.generate import GenerationError

    with pytest.raises(GenerationError, match="exceeds max_sequence_length=96"):
        engine.submit(Request([7] * 90 + [I.gmask], 10))
    assert bucket_length(1, 96) == 16 and bucket_length(17, 96) == 32 and bucket_length(90, 96) == 96
    # cancelled requests free their slots; past max_queue waiting requests, QueueFull
    c = engine.config
    small = Engine(c, engine.params, slots=1, max_queue=2)  # not started: requests stay queued
    held = [small.submit(Request(PROMPTS[0], 5)) for _ in range(2)]
    with pytest.raises(QueueFull):
        small.submit(Request(PROMPTS[0], 5))
    small.cancel(held[0])
    small._tick(block=False)
    assert held[0].finish_reason == "cancelled" and small.load()["active"] == 1
    small.stop()
    assert held[1].finish_reason == "cancelled"


# ---- text streaming ----------------------------------------------------------------------------
PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\n\n", 7: "END", 8: "中", 9: ",", 10: "文", 11: "  "}


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def streamed(text, ids):
    deltas = []
    for t in ids:
        stopped = text.push(t)
        deltas.append(text.delta())
        if stopped:
            break
    deltas.append(text.delta(final=True))
    return deltas


def test_text_stream_stop_strings_and_postprocessing():
    from glm_jax.families import get_family

    text = TextStream(decode, stop_ids=[0], stops=["wor", "\n\nEND"])
    deltas = streamed(text, [1, 2, 3, 4])
    assert "".join(deltas) == text.final() == "Hello " and text.stopped
    text = TextStream(decode, stops=["\n\nEND"])  # "\n\n" is held back until it is not the stop
    deltas = streamed(text, [1, 6, 2, 6, 7, 5])
    assert deltas[1] == "" and "".join(deltas) == text.final() == "Hel\n\nlo"
    # ChatGLM-6B rewrites "," after a Chinese character: a delta never sends what it will change
    fam = get_family("chatglm-6b")
    text = TextStream(decode, postprocess=fam.postprocess)
    deltas = streamed(text, [11, 8, 9, 10, 9, 1, 11])
    assert "".join(deltas) == text.final() == fam.postprocess(decode([11, 8, 9, 10, 9, 1, 11])) == "中，文，Hel"
    # ChatGLM3's first line is metadata: nothing is sent until it is known to be empty
    fam = get_family("chatglm3-6b")
    text = TextStream(decode, postprocess=fam.postprocess)
    deltas = streamed(text, [1, 2, 6, 3])
    assert deltas[:2] == ["", ""] and "".join(deltas) == text.final() == fam.postprocess(decode([1, 2, 6, 3]))


def test_a_causal_family_answers_400_to_a_blank():
    """The HTTP layer alone (an engine stand-in that must not be reached): ChatGLM2 is causal."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from glm_jax.families import get_family
    from glm_jax.serving.api import make_app

    class Unreachable:
        error = None

        def start(self):
            pass

        def stop(self, drain_s=0.0):
            pass

        def submit(self, req):
            raise AssertionError("a blank for a causal family reached the engine")

    fam = get_family("chatglm2-6b")
    model = SimpleNamespace(config=tiny(vocab_size=65024), family=fam, tokenizer=fam.load_tokenizer())
    with TestClient(make_app(model, Unreachable(), name="chatglm2-6b")) as http:
        r = http.post("/v1/completions", json={"prompt": "Paris is the [MASK] of France.", "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "causal" in r.json()["error"]["message"]


# ---- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *extra, timeout=60.0):
    port = free_port()
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "serve.py"),
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=script_env())
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    headers = {"Authorization": f"Bearer {KEY}"}
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=1).status_code == 200:
                return proc, url, time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise AssertionError(f"/health did not answer within {timeout} s")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    c = get_config("glm-tiny", num_layers=2, vocab_size=32000, max_sequence_length=192, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("serve") / "ck"
    save_serving(str(path), c, move_to_device(init_params(c, jax.random.key(0))), 3, "test")
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """The shared server: INT8 weights (quantized on load), 4 slots, an API key."""
    proc, url, started = start_server(
        checkpoint, "--slots", "4", "--max-queue", "16", "--api-key", KEY, "--quantize", "int8", "--drain", "20"
    )
    yield dict(proc=proc, url=url, started=started)
    stop_server(proc)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, content, **kw):
    return client.chat.completions.create(
        model="glm", messages=[{"role": "user", "content": content}], **{"temperature": 0, "max_tokens": 12, **kw}
    )


def test_health_models_and_chat(server, client):
    assert server["started"] < 60
    assert [m.id for m in client.models.list().data] == ["glm"]
    r = chat(client, "你好")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12 and r.choices[0].message.content
    # streamed: role chunk, content deltas, final chunk, [DONE]; the deltas join to the same text
    chunks = list(chat(client, "你好", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    # history, a system message
    r2 = client.chat.completions.create(
        model="glm",
        temperature=0,
        max_tokens=4,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "再见"},
        ],
    )
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_stop_strings_max_tokens_and_completions(client):
    full = chat(client, "hello", max_tokens=16).choices[0].message.content
    cut = full[len(full) // 2 :][:2].strip() or full[-1]
    r = chat(client, "hello", max_tokens=16, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[: full.index(cut)].strip()
    assert r.usage.completion_tokens < 16
    r = chat(client, "hello", max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    c = client.completions.create(model="glm", prompt="The cat sat on", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens == 5 and c.choices[0].text
    streamed = "".join(
        x.choices[0].text
        for x in client.completions.create(
            model="glm", prompt="The cat sat on", max_tokens=5, temperature=0, stream=True
        )
    )
    assert streamed == c.choices[0].text
    # [MASK] blanks are filled first to last (generate.fill_blanks), each answer in its place
    b = client.completions.create(model="glm", prompt="A [MASK] B [MASK] C", max_tokens=4, temperature=0)
    blanks = b.choices[0].model_extra["blanks"]
    assert len(blanks) == 2 and b.choices[0].text.startswith("A") and "[MASK]" not in b.choices[0].text
    assert b.usage.completion_tokens == 8
    seeded = [
        client.completions.create(model="glm", prompt="x", max_tokens=6, temperature=1.0, seed=5).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_errors(server, client):
    url = server["url"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.BadRequestError) as e:  # past the length limit
        client.completions.create(model="glm", prompt="hello " * 300, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(client, "hi", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(client, "hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # must end with a user message
        client.chat.completions.create(model="glm", messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 422 and "error" in r.json()
    r = httpx.post(url + "/v1/completions", content=json.dumps({"prompt": "x" * (2 << 20)}), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # a chat whose history does not fit drops its oldest rounds; only a last message too long is a 400
    long = "今天天气很好，" * 20
    messages = sum(([{"role": "user", "content": long}, {"role": "assistant", "content": long}] for _ in range(3)), [])
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=h,
        json={"messages": messages + [{"role": "user", "content": "hi"}], "max_tokens": 8},
    ).json()
    assert r["dropped_rounds"] >= 1 and r["usage"]["completion_tokens"] == 8
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=h,
        json={"messages": [{"role": "user", "content": long * 4}], "max_tokens": 8},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_sixteen_concurrent_requests_equal_one_at_a_time(client):
    def ask(i):
        kw = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=100 + i)
        return chat(client, f"question {i}", max_tokens=10, **kw).choices[0].message.content

    alone = [ask(i) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone and len(set(alone)) > 8


def test_full_queue_answers_429_and_disconnects_free_slots(server):
    url, h = server["url"], {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 150, "stream": True}
    statuses, streams = [], []
    barrier = threading.Barrier(24)
    lock = threading.Lock()

    def open_stream(_):
        c = httpx.Client(timeout=30)
        barrier.wait()
        r = c.send(c.build_request("POST", url + "/v1/chat/completions", json=body, headers=h), stream=True)
        with lock:
            statuses.append(r.status_code)
            streams.append((c, r))

    with cf.ThreadPoolExecutor(24) as pool:
        list(pool.map(open_stream, range(24)))
    try:
        assert statuses.count(429) >= 4 and set(statuses) == {200, 429}
        rejected = next(r for _, r in streams if r.status_code == 429)
        assert json.loads(rejected.read())["error"]["type"] == "rate_limit_error"
    finally:
        for c, r in streams:  # every client goes away mid-stream
            r.close()
            c.close()
    t0 = time.monotonic()
    while True:
        load = httpx.get(url + "/health", headers=h).json()
        if load["active"] == 0 and load["waiting"] == 0:
            break
        assert time.monotonic() - t0 < 10, f"slots not freed after the clients left: {load}"
        time.sleep(0.1)
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=h,
        timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    exe = shutil.which("schemathesis") or shutil.which("st")
    assert exe, "schemathesis is a test dependency"
    url = server["url"]
    r = subprocess.run(
        [
            exe,
            "run",
            url + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--phases",
            "fuzzing",
            "--max-examples",
            "12",
            "--seed",
            "1",
            "--workers",
            "4",
            "--request-timeout",
            "30",
            "-H",
            f"Authorization: Bearer {KEY}",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )  # its cache folder goes there
    assert r.returncode == 0, r.stdout[-3000:]
    assert httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_server_on_a_mesh_answers_as_on_one_device(server, checkpoint, client):
    """--mesh 1x2 (the INT8 weights split over two tensor shards, the cache's KV heads too) gives
    the one-device server's answers: greedy and seeded sampled, streamed, concurrent, blanks."""
    proc, url, _ = start_server(
        checkpoint, "--slots", "4", "--max-queue", "16", "--api-key", KEY, "--quantize", "int8", "--mesh", "1x2"
    )
    try:
        h = {"Authorization": f"Bearer {KEY}"}
        health = httpx.get(url + "/health", headers=h).json()
        assert health["mesh"] == {"data": 1, "stage": 1, "tensor": 2} and health["slots"] == 4
        assert httpx.get(server["url"] + "/health", headers=h).json()["mesh"] == {"data": 1, "stage": 1, "tensor": 1}
        on_mesh = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        def answers(c):
            def ask(i):
                kw = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=40 + i)
                return chat(c, f"question {i}", max_tokens=8, **kw).choices[0].message.content

            with cf.ThreadPoolExecutor(6) as pool:
                together = list(pool.map(ask, range(6)))
            streamed = "".join(x.choices[0].delta.content or "" for x in chat(c, "你好", stream=True) if x.choices)
            blanks = c.completions.create(model="glm", prompt="A [MASK] B [MASK] C", max_tokens=4, temperature=0)
            return together, streamed, blanks.choices[0].text

        expected = answers(client)
        assert len(set(expected[0])) >= 4  # the requests differ, so their answers do
        assert answers(on_mesh) == expected
    finally:
        stop_server(proc)
    assert proc.returncode == 0


def test_chat_page_in_headless_chromium(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    try:
        driver.get(server["url"] + "/")
        driver.find_element(By.ID, "api_key").send_keys(KEY)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("12")
        for turn, text in enumerate(["你好", "再见"]):
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 30).until(
                lambda d: (
                    len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == turn + 1
                    and d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("data-done") == "true"
                )
            )
            reply = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
            assert "error" not in reply.get_attribute("class"), reply.text
            assert reply.text and int(reply.get_attribute("data-chunks")) >= 2  # streamed in pieces
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".user")] == ["你好", "再见"]
    finally:
        driver.quit()


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    """Last in this module: it stops the shared server (started with --drain 20)."""
    proc, url, h = server["proc"], server["url"], {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=60,
        headers=h,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True},
    ) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
