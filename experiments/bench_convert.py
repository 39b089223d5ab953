"""Host memory and time of converting a released folder (experiments/convert.py's path).

    python experiments/bench_convert.py [--layers 8 --hidden 512 --vocab 65024] [--format bin|safetensors]

Writes a synthetic ChatGLM2-6B-layout folder (fp16 shards with their index, ChatGLM2's shapes
scaled down), runs experiments/convert.py on it in a fresh process and takes that process's peak resident memory
over a baseline process that makes the same imports and nothing else. Reports the peak over the
model's fp16 bytes (the anchor: 1.0 = exactly one copy of the model), splits the rest into one
memory-mapped shard plus a number of copies of the largest tensor, and extrapolates the peak to
ChatGLM2-6B (7 shards) and GLM-130B (8 rank files) with that split.
Ends with a JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from benchutil import emit, environment

SIX_B = 6_243_584_000  # ChatGLM2-6B parameters (28 x 4096, FFN 13696, MQA 2, vocab 65024, untied)
HUNDRED_30B = 130_000_000_000
LARGEST = {"chatglm2-6b": 65024 * 4096, "glm-130b": 150528 * 12288}  # embedding rows x hidden


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=65024)
    ap.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from reference_numpy import random_chatglm2_state_dict
    from test_released import chatglm2_json, write_folder

    from glm_jax.convert import config_from_chatglm2

    heads = args.hidden // 128 * 4 or 4
    cfg = chatglm2_json(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=heads,
        kv_channels=args.hidden // heads,
        ffn_hidden_size=args.hidden * 27 // 8,
        padded_vocab_size=args.vocab,
    )
    config = config_from_chatglm2(cfg)
    sd = {k: v.astype(np.float16) for k, v in random_chatglm2_state_dict(config, np.random.default_rng(0)).items()}
    model_bytes = sum(x.nbytes for x in sd.values())
    largest = max(x.size for x in sd.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(os.path.join(tmp, "in"), sd, cfg, fmt=args.format, shards=args.shards)
        del sd
        here = os.path.dirname(os.path.abspath(__file__))
        # the same imports and nothing else: the baseline resident memory of a converting process
        baseline = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import json, sys; sys.path.insert(0, sys.argv[1]); import jax, torch, safetensors, "
                    "glm_jax.released, glm_jax.checkpoints, glm_jax.quant, convert; "
                    "print(json.dumps(convert.peak_rss_bytes()))",
                    here,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        p = subprocess.run(
            [
                sys.executable,
                os.path.join(here, "convert.py"),
                "--input",
                str(folder),
                "--out",
                os.path.join(tmp, "out"),
            ],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            raise SystemExit(p.stderr)
        conv = json.loads(p.stdout.strip().splitlines()[-1])
    peak = conv["peak_rss_bytes"] - baseline
    shard = model_bytes / args.shards
    # what the peak holds beyond one copy of the model and one mapped shard, in largest tensors
    extra = (peak - model_bytes - shard) / (2 * largest)
    out = {
        **environment(),
        "format": args.format,
        "layers": args.layers,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "shards": args.shards,
        "model_bytes": model_bytes,
        "largest_tensor_bytes": 2 * largest,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": conv["peak_rss_bytes"],
        "peak_over_model": peak / model_bytes,
        "extra_largest_tensors": extra,
        "seconds": conv["seconds"],
        "mb_per_s": model_bytes / 2**20 / conv["seconds"],
    }
    # extrapolated: one copy + one shard (ChatGLM2-6B ships 7) + the measured extra largest tensors
    for name, n, shards in (("chatglm2-6b", SIX_B, 7), ("glm-130b", HUNDRED_30B, 8)):
        fp16 = 2 * n
        out[f"{name}_peak_gb"] = (fp16 + fp16 / shards + max(extra, 0) * 2 * LARGEST[name]) / 1e9
    emit(out)
    return out


if __name__ == "__main__":
    main()
