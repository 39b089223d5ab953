"""Convert a GLM-130B reference checkpoint (SwissArmyTransformer, tensor-parallel ranks) into a
serving checkpoint for the evaluation and generation scripts.

    python experiments/convert_glm130b.py --input DIR --out DIR [--preset glm-130b] [--set k=v ...]

--input is the reference's checkpoint folder (holding `latest` and `<iteration>/mp_rank_XX_
model_states.pt`) or one iteration's folder. Float checkpoints are merged and converted; INT4 /
INT8 ones (the reference's `tools/convert_tp.py --quantization-bit-width 4|8`) are loaded packed,
bytes and fp16 scales as they are, with one scale group per rank for the row-parallel layers.
Non-quantized tensors are stored in bf16 unless `--set param_dtype=float32`. Needs torch to read
the .pt files. Then: `python experiments/lambada_eval.py --checkpoint OUT --protocol beam`.
"""

import argparse
import glob
import json
import os
import sys


def rank_files(folder: str) -> tuple[list[str], int]:
    """The ranks' .pt files in rank order, and the iteration they belong to."""
    iteration = 0
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        folder = os.path.join(folder, name)
        iteration = int(name) if name.isdigit() else 0
    elif os.path.basename(folder.rstrip("/")).isdigit():
        iteration = int(os.path.basename(folder.rstrip("/")))
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no mp_rank_XX_model_states.pt under {folder}; pass the reference's checkpoint "
                                "folder (with `latest`) or one iteration's folder")
    return files, iteration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="glm-130b")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = ap.parse_args(argv)

    import torch

    from glm_jax.config import ConfigError, config_from_args
    from glm_jax.convert import (ConversionError, from_glm130b_quantized, from_glm130b_state_dict,
                                 merge_glm130b_ranks)
    from glm_jax.int4 import tree_bytes
    from glm_jax.train import save_serving

    try:
        files, iteration = rank_files(args.input)
        config = config_from_args(args.preset, ["param_dtype=bfloat16"] + args.set)
        # the reference's files are pickles holding more than tensors
        ranks = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
        qkv = next((v for k, v in ranks[0].items() if k.endswith("attention.query_key_value.weight")), None)
        if any(k.endswith("weight_scale") for k in ranks[0]):
            bits = 4 if qkv is not None and qkv.shape[1] * 2 == config.hidden_size else 8
            config = config.override(quantization=f"int{bits}", quantization_groups=len(files) if len(files) > 1 else 0)
            params = from_glm130b_quantized(ranks, config)
        else:
            params = from_glm130b_state_dict(merge_glm130b_ranks(ranks), config)
    except (FileNotFoundError, ConfigError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    save_serving(args.out, config, params, iteration, os.path.abspath(args.input))
    result = {"input": os.path.abspath(args.input), "out": os.path.abspath(args.out), "ranks": len(files),
              "iteration": iteration, "quantization": config.quantization, "bytes": tree_bytes(params)}
    print(f"{len(files)} rank(s), {config.quantization} -> {args.out} ({result['bytes'] / 1e9:.2f} GB)", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
