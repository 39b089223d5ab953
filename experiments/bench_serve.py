"""The server under load: continuous batching vs the same requests one at a time vs transformers.

    python experiments/bench_serve.py [--requests 32] [--max-tokens 64] [--concurrency 1,4,16] [--slots 16]

Builds a small random model with ChatGLM2-6B's block (the GlmForCausalLM layout), saves it as a
serving checkpoint (family chatglm2-6b, its real tokenizer from ../shared/data/tokenizers) and
exports it with experiments/export.py --format hf-glm. Then, on this machine:
  1. experiments/serve.py on a free loopback port; every request a streamed greedy chat
     completion of --max-tokens tokens; for each concurrency (1 = one at a time, how THUDM's
     servers run) the same --requests requests: requests/s, output tokens/s, time to first token
     and time per output token (p50 / p99), end-to-end latency;
  2. transformers' GlmForCausalLM.generate on the exported folder, same prompt ids, greedy, the
     same number of new tokens: one request at a time (--hf-requests of them) and one padded batch.
One JSON line per measurement, then a summary line with the ratios (what BENCHMARKS.md quotes).
"""

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from benchutil import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "chatglm2-6b", "tokenizer.model")
TOPICS = [
    "the weather in Beijing",
    "类型#上衣*材质#牛仔布*颜色#白色",
    "how a KV cache works",
    "写一首关于春天的诗",
    "the GLM pre-training objective",
    "推荐三本科幻小说",
    "continuous batching",
    "如何学习 JAX",
]


def prompts(n: int) -> list[str]:
    """n chat queries of varied lengths (so several prompt buckets are in play)."""
    return [f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}. " * (1 + i % 6) for i in range(n)]


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else float("nan")


def build(out: str, layers: int, hidden: int) -> tuple[str, str]:
    """The serving checkpoint and its hf-glm export -> (checkpoint dir, export dir)."""
    import jax

    from glm_jax.checkpoints import move_to_device, save_serving
    from glm_jax.config import get_config
    from glm_jax.model import init_params

    checkpoint, exported = os.path.join(out, "checkpoint"), os.path.join(out, "hf-glm")
    if not os.path.isdir(checkpoint):
        config = get_config(
            "chatglm2-6b",
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=hidden // 32,
            num_kv_heads=2,
            inner_hidden_size=hidden * 8 // 3 // 8 * 8,
            max_sequence_length=1024,
            dtype="float32",
            param_dtype="float32",
        )
        save_serving(
            checkpoint,
            config,
            move_to_device(init_params(config, jax.random.key(0))),
            0,
            "bench_serve (random weights)",
            family="chatglm2-6b",
            tokenizer_file=TOKENIZER,
        )
    if not os.path.isdir(exported):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "experiments", "export.py"),
                "--checkpoint",
                checkpoint,
                "--out",
                exported,
                "--format",
                "hf-glm",
                "--dtype",
                "float32",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return checkpoint, exported


def start_server(checkpoint: str, slots: int) -> tuple[subprocess.Popen, str, float]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "serve.py"),
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--slots",
            str(slots),
            "--max-queue",
            str(8 * slots),
            "--log-level",
            "warning",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            time.sleep(0.2)


def one_request(url: str, query: str, max_tokens: int) -> dict:
    """A streamed greedy chat completion -> its timings (seconds) and token count."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": query}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return dict(ttft=first - t0, tpot=(end - first) / max(1, tokens - 1), latency=end - t0, tokens=tokens)


def drive(url: str, queries: list[str], max_tokens: int, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(lambda query: one_request(url, query, max_tokens), queries))
    wall = time.perf_counter() - t0
    tokens = sum(row["tokens"] for row in rows)
    return dict(
        concurrency=concurrency,
        requests=len(rows),
        wall_s=round(wall, 3),
        requests_per_s=round(len(rows) / wall, 3),
        output_tokens_per_s=round(tokens / wall, 1),
        output_tokens=tokens,
        **{
            f"{metric}_{name}_ms": round(1e3 * percentile([row[metric] for row in rows], q), 1)
            for metric in ("ttft", "tpot", "latency")
            for name, q in (("p50", 50), ("p99", 99))
        },
    )


def transformers_peer(exported: str, ids: list[list[int]], max_tokens: int, one_at_a_time: int) -> list[dict]:
    import torch
    from transformers import GlmForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = GlmForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    greedy = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
    out = []
    with torch.no_grad():
        model.generate(torch.tensor([ids[0]]), **{**greedy, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
        t0 = time.perf_counter()
        latencies = []
        for row in ids[:one_at_a_time]:
            began = time.perf_counter()
            model.generate(torch.tensor([row]), **greedy)
            latencies.append(time.perf_counter() - began)
        wall = time.perf_counter() - t0
        out.append(
            dict(
                peer="transformers",
                mode="one at a time",
                requests=len(latencies),
                wall_s=round(wall, 3),
                requests_per_s=round(len(latencies) / wall, 3),
                output_tokens_per_s=round(len(latencies) * max_tokens / wall, 1),
                latency_p50_ms=round(1e3 * percentile(latencies, 50), 1),
            )
        )
        width = max(len(row) for row in ids)  # one left-padded batch of every request
        batch = torch.tensor([[0] * (width - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        t0 = time.perf_counter()
        model.generate(batch, attention_mask=mask, **greedy)
        wall = time.perf_counter() - t0
        out.append(
            dict(
                peer="transformers",
                mode=f"one batch of {len(ids)}",
                requests=len(ids),
                wall_s=round(wall, 3),
                requests_per_s=round(len(ids) / wall, 3),
                output_tokens_per_s=round(len(ids) * max_tokens / wall, 1),
            )
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=8, help="transformers requests run one at a time")
    ap.add_argument("--out", default=os.path.join("runs", "bench_serve"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.requests < 1 or args.max_tokens < 2 or min(levels) < 1:
        ap.error("--requests >= 1, --max-tokens >= 2 and positive --concurrency levels")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from glm_jax.families import get_family

    env = {"device": f"CPU ({os.cpu_count()} cores)", "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    checkpoint, exported = build(args.out, args.layers, args.hidden)
    queries = prompts(args.requests)
    fam = get_family("chatglm2-6b")
    tok = fam.load_tokenizer(TOKENIZER)
    ids = [fam.chat_prompt(tok, [], query) for query in queries]
    proc, url, startup = start_server(checkpoint, args.slots)
    results = []
    try:
        emit(dict(env, bench="serve_startup", health_s=round(startup, 2)))
        drive(url, queries, 2, max(levels))  # compile every prompt bucket first
        for concurrency in levels:
            result = dict(
                env,
                bench="serve",
                peer="glm_jax",
                layers=args.layers,
                hidden=args.hidden,
                max_tokens=args.max_tokens,
                slots=args.slots,
                **drive(url, queries, args.max_tokens, concurrency),
            )
            results.append(result)
            emit(result)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    peers = transformers_peer(exported, ids, args.max_tokens, args.hf_requests)
    for peer in peers:
        emit(dict(env, bench="serve", layers=args.layers, hidden=args.hidden, max_tokens=args.max_tokens, **peer))
    alone = next((result for result in results if result["concurrency"] == 1), None)
    mean_prompt = round(float(np.mean([len(row) for row in ids])), 1)
    summary = dict(env, bench="serve_summary", prompt_tokens_mean=mean_prompt)
    for result in results:
        level = result["concurrency"]
        if alone:
            summary[f"c{level}_vs_one_at_a_time"] = round(
                result["output_tokens_per_s"] / alone["output_tokens_per_s"], 2
            )
        for peer in peers:
            key = "hf_one" if peer["mode"] == "one at a time" else "hf_batch"
            summary[f"c{level}_vs_{key}"] = round(result["output_tokens_per_s"] / peer["output_tokens_per_s"], 2)
    emit(summary)


if __name__ == "__main__":
    main()
