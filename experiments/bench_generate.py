"""Decode speed of glm-1b on the GPU: tokens/s and ms/token at batch 1 and 16 against the floor
of reading every weight once per token at the HBM bandwidth measured in the same run.

    python experiments/bench_generate.py [--preset glm-1b] [--batch 1,16] [--prompt 128] [--new 128]

Weights are cast to bf16 (serving precision); the KV cache is bf16. The floor per decode step is
(weight bytes + KV-cache bytes read) / bandwidth, the bandwidth from a large device copy.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchutil import emit, environment, hbm_bandwidth

from glm_jax.config import config_from_args
from glm_jax.generate import Generator, make_prompts, serving_params
from glm_jax.model import init_params
from glm_jax.quant import tree_bytes
from glm_jax.tokenizer import GLM_IDS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-1b")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args(argv)
    env = environment()
    config = config_from_args(args.preset, args.set + ["hidden_dropout=0", "attention_dropout=0"])
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), init_params(config, jax.random.key(0)))
    params = serving_params(params, config.num_layers)  # Generator's layout, made once here
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    bandwidth = hbm_bandwidth(2.0 if env["backend"] == "gpu" else 0.25)
    gen = Generator(config, params)
    rng = np.random.default_rng(0)
    for rows in (int(size) for size in args.batch.split(",")):
        prompts = [list(rng.integers(16, config.vocab_size, args.prompt - 1)) + [GLM_IDS.gmask] for _ in range(rows)]
        batch = make_prompts(prompts, config)
        state = gen.start(batch, args.new)
        token = batch.start
        jax.block_until_ready(gen.step(state, token, 0))  # compile
        t0 = time.perf_counter()
        for step in range(1, args.new):
            logits = gen.step(state, token, step)
        jax.block_until_ready(logits)
        per_token = (time.perf_counter() - t0) / (args.new - 1)
        cache_bytes = tree_bytes(state["cache"])
        floor = (weight_bytes + cache_bytes) / bandwidth
        emit(
            dict(
                env,
                bench="decode",
                preset=args.preset,
                batch=rows,
                prompt=args.prompt,
                new_tokens=args.new,
                ms_per_token=round(1e3 * per_token, 3),
                tokens_per_s=round(rows / per_token, 1),
                floor_ms=round(1e3 * floor, 3),
                vs_floor=round(floor / per_token, 3),
                bandwidth_gb_s=round(bandwidth / 1e9, 1),
                weight_gb=round(weight_bytes / 1e9, 3),
            )
        )


if __name__ == "__main__":
    main()
