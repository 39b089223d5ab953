"""Training step time, tokens/s and MFU for glm-1b at seq 2048 on one GPU.

    python experiments/bench_train.py [--preset glm-1b] [--batch 8] [--seq 2048]
                                      [--remat none,dots_no_batch,full] [--attention cudnn] [--steps 10]

One jitted step (forward, backward, AdamW with clipping) on real GLM samples ([MASK]/[gMASK] mix,
so the prefix mask is data), bf16 compute, fp32 master weights. MFU = model FLOPs (every matmul,
attention unhalved, x3 for fwd+bwd) / (step time x 989 TFLOP/s, H100 dense bf16); also the ratio
to an 8192^3 bf16 matmul timed in the same run. One JSON line per remat policy.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchutil import emit, environment, matmul_anchor

from glm_jax import sharding as sh
from glm_jax.config import config_from_args
from glm_jax.objectives import SequenceBuilder
from glm_jax.optim import optim_for
from glm_jax.summary import flops_per_token
from glm_jax.train import Trainer, peak_flops


def synthetic_builder(vocab: int, seq: int) -> SequenceBuilder:
    corpus = np.random.default_rng(0).integers(16, vocab, 4_000_000).astype(np.int32)

    def window(rng, n):
        start = int(rng.integers(0, len(corpus) - n + 1))
        return corpus[start : start + n]

    return SequenceBuilder(window, seq, 0)


def sample_batch(builder: SequenceBuilder, first: int, size: int) -> dict:
    """Samples first .. first + size - 1 stacked into a batch (the contract arrays, no `kind`)."""
    samples = [builder.build(first + row) for row in range(size)]
    return {key: np.stack([sample[key] for sample in samples]) for key in samples[0] if key != "kind"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-1b")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--remat", default="none,dots_no_batch,save_attention,full")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    env = environment()
    on_gpu = env["backend"] == "gpu"
    anchor = matmul_anchor() if on_gpu else matmul_anchor(1024, jnp.float32)
    peak = peak_flops(jax.devices()[0])
    mesh = sh.make_mesh("1x1", jax.devices()[:1])
    for policy in args.remat.split(","):
        config = config_from_args(
            args.preset, args.set + [f"remat_policy={policy}", f"attention_impl={args.attention}"]
        )
        builder = synthetic_builder(config.vocab_size, args.seq)
        batches = [sample_batch(builder, i * args.batch, args.batch) for i in range(2)]
        record = dict(
            env,
            bench="train_step",
            preset=args.preset,
            batch=args.batch,
            seq=args.seq,
            remat=policy,
            attention=args.attention,
            anchor_tflops=round(anchor, 1),
        )
        try:
            trainer = Trainer(config, optim_for(args.preset), mesh, args.batch)
            state = trainer.init_state(0)
            placed = [trainer.place_batch(b) for b in batches]
            lr, alpha = jnp.float32(1e-4), jnp.float32(config.embedding_shrink_alpha)
            with trainer.context():
                started = time.perf_counter()
                state, metrics = trainer.fused_step(state, placed[0], lr, alpha)
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - started
                times = []
                for i in range(args.steps):
                    started = time.perf_counter()
                    state, metrics = trainer.fused_step(state, placed[i % 2], lr, alpha)
                    jax.block_until_ready(metrics)
                    times.append(time.perf_counter() - started)
        except Exception as error:  # out of memory for this policy, say so and go on
            emit(dict(record, skipped=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"))
            continue
        step = float(np.median(times))
        tokens = args.batch * args.seq
        flops = flops_per_token(config, args.seq)["train"] * tokens
        tflops = flops / step / 1e12
        emit(
            dict(
                record,
                step_s=round(step, 4),
                compile_s=round(compile_s, 1),
                tokens_per_s=round(tokens / step),
                model_tflops=round(tflops, 1),
                mfu=round(flops / step / peak, 4) if peak else None,
                vs_anchor=round(tflops / anchor, 3),
                loss=float(metrics["loss"]),
            )
        )


if __name__ == "__main__":
    main()
