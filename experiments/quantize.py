"""Quantize a trained checkpoint's layer weights once and save them for serving.

    python experiments/quantize.py [--checkpoint DIR] [--quantize int4|int8] [--group N | --groups N] [--out DIR]

GLM-130B's weight-only scheme (quant.py): the four linear weights of every layer become integers
(INT4 packed two per byte) with fp16 scales per output row, or per `--group` input rows, or in
`--groups` groups along each input; embeddings, norms and biases are stored in 16 bits (bf16, or
the checkpoint's fp16); no optimizer state; the family and tokenizer go along. The result is a checkpoint folder that
`load_checkpoint` and every evaluation and generation script take as `--checkpoint`
(default `--out`: `int4`/`int8` beside the source
folder). Ends with a JSON line of the bytes saved.
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import DEFAULT_CHECKPOINTS, add_mesh_arg, load_model_or_exit, parse_args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS)
    ap.add_argument("--quantize", choices=("int4", "int8"), default="int4")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--group", type=int, default=0, help="input rows per scale (default: one scale per row)")
    group.add_argument("--groups", type=int, default=0, help="scale groups along every weight's input")
    ap.add_argument("--out", default=None, help="serving checkpoint folder (default: beside --checkpoint)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's)")
    ap.add_argument("--family", default=None, help="model family (default: the checkpoint's)")
    add_mesh_arg(ap)
    args = parse_args(ap, argv)
    if args.group < 0 or args.groups < 0:
        ap.error("--group and --groups must be positive")

    import jax

    from glm_jax import placement
    from glm_jax.checkpoints import CheckpointError, save_serving
    from glm_jax.config import ConfigError
    from glm_jax.quant import quantize_params, tree_bytes
    from glm_jax.tokenizer import bundled_file

    m = load_model_or_exit(argparse.Namespace(**{**vars(args), "quantize": None}))
    config, params, step = m.config, m.params, m.step
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), args.quantize)
    try:
        if config.quantization != "none":
            raise CheckpointError(f"{args.checkpoint} holds {config.quantization} weights already")
        qconfig = config.override(
            quantization=args.quantize,
            quantization_group=args.group,
            quantization_groups=args.groups,
            param_dtype=config.param_dtype if config.param_dtype != "float32" else "bfloat16",
        )
        shardings = None if m.mesh is None else placement.param_shardings(qconfig, m.mesh)
        quantized = quantize_params(params, qconfig, shardings)  # layer by layer, sharded on --mesh
        save_serving(
            out, qconfig, quantized, step, os.path.abspath(args.checkpoint), m.family.name, bundled_file(m.tokenizer)
        )
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    bf16 = jax.eval_shape(lambda tree: jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), tree), params)
    layers = lambda tree: tree_bytes(tree["layers"])
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "out": os.path.abspath(out),
        "step": step,
        "quantize": args.quantize,
        "fp32_bytes": tree_bytes(params),
        "bf16_bytes": tree_bytes(bf16),
        "quantized_bytes": tree_bytes(quantized),
        "layers_bf16_bytes": layers(bf16),
        "layers_quantized_bytes": layers(quantized),
        **m.placement_summary(),
    }
    result["saved_vs_bf16"] = 1 - result["quantized_bytes"] / result["bf16_bytes"]
    print(
        f"{args.quantize}: {result['quantized_bytes'] / 2**20:.2f} MiB vs {result['bf16_bytes'] / 2**20:.2f} MiB "
        f"in bf16 ({100 * result['saved_vs_bf16']:.1f}% saved) -> {out}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
