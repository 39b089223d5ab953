"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching and a chat page.

    python experiments/serve.py --checkpoint DIR [--adapter DIR] [--quantize int4|int8] [--mesh 1x8] \\
        [--host 127.0.0.1] [--port 8000] [--slots 8] [--max-queue 32] [--api-key KEY]

Then: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the chat
page at http://127.0.0.1:8000/. --slots requests decode together in one compiled step over a
shared KV cache (glm_jax/serving/engine.py); up to --max-queue more wait (default 4 x --slots),
beyond that a request answers 429. The decode step and the smallest prompt bucket are compiled
before the port opens, so /health answers as soon as the server listens. SIGTERM stops taking
requests, gives those in flight --drain seconds, cancels the rest and exits 0.

--mesh 1xT or Dx1xT (default 1x1, one device) serves on D x T devices: the weights loaded straight
into their shardings over the T tensor shards, the slots over the D data replicas (--slots rounded
up to a multiple of D); the startup line and /health report the mesh and the slot count.
"""

import argparse
import os
import signal
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit, parse_args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="the address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--slots", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-queue", type=int, default=None, help="requests that may wait for a slot (default 4 x slots)")
    ap.add_argument(
        "--api-key",
        default=os.environ.get("GLM_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every API route (default $GLM_JAX_API_KEY)",
    )
    ap.add_argument("--name", default=None, help="the model id in the API (default: the checkpoint's family)")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="the largest request body in bytes")
    ap.add_argument("--drain", type=float, default=10.0, help="seconds requests in flight get at SIGTERM")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = parse_args(ap, argv)
    if args.slots < 1:
        ap.error("--slots must be at least 1")
    if args.max_queue is not None and args.max_queue < 1:
        ap.error("--max-queue must be at least 1")
    if not 0 <= args.port < 65536:
        ap.error("--port must be in 0..65535")
    if args.max_body < 1024:
        ap.error("--max-body must be at least 1024 bytes")

    import uvicorn

    from glm_jax.serving.api import make_app
    from glm_jax.serving.engine import Engine

    model = load_model_or_exit(args)
    engine = Engine(
        model.config,
        model.take_params(),  # the engine's per-layer copy is the only one
        ids=model.tokenizer.specials,
        causal=model.family.causal,
        slots=args.slots,
        max_queue=args.max_queue,
        mesh=model.mesh,
        consume=True,
    )
    engine.warmup()
    name = args.name or model.family.name
    app = make_app(model, engine, name=name, api_key=args.api_key, max_body=args.max_body, drain_s=args.drain)
    mesh = "x".join(str(size) for size in engine.load()["mesh"].values())  # data x stage x tensor
    print(
        f"serving {name} ({model.path}, step {model.step}) on http://{args.host}:{args.port} with "
        f"{engine.slots} slots on mesh {mesh}",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn handles SIGTERM (graceful shutdown), then raises it again once done: exit 0 then
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=max(1, int(args.drain))
    )


if __name__ == "__main__":
    main()
