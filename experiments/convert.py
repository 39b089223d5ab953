"""Convert a released GLM-family checkpoint folder into a serving checkpoint.

    python experiments/convert.py --input DIR --out DIR [--family F] [--tokenizer FILE]
                                  [--dtype float16|bfloat16|float32] [--quantize int4|int8] [--set k=v ...]

Layout and family are detected (glm_jax/released.py): ChatGLM-6B's, ChatGLM2-6B's and ChatGLM3-6B's
Hugging Face folders (`config.json` + `.bin` or `.safetensors` shards and their index), transformers
`GlmForCausalLM` folders (GLM-4), and GLM-130B's SwissArmyTransformer rank folders (float, or the
INT4/INT8 ranks of its `convert_tp.py`, loaded packed). `--family` overrides the detected family.
Weights keep their stored dtype and compute in it (fp16 stays fp16) unless `--dtype` says
otherwise, which sets both (`--set dtype=` / `param_dtype=` set them apart); `--quantize`
applies GLM-130B's weight-only scheme on the way. The output holds params, config, family and a copy
of the tokenizer file (the folder's, or --tokenizer), so every script takes it with no other flag:

    python experiments/generate.py --checkpoint OUT --chat

A bad folder (missing shard, unexpected or misshapen tensor, unknown model_type, a tokenizer that
does not fit the embedding) is a clear error naming the file and tensor, exit code 2, and no output
folder is left behind. Ends with a JSON line (bytes, seconds, peak host memory).
"""

import argparse
import json
import os
import resource
import sys
import time


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="the released folder")
    ap.add_argument("--out", required=True, help="the serving checkpoint folder to write (must not exist)")
    ap.add_argument("--family", default=None, help="override the detected family")
    ap.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer file (default: the folder's)")
    ap.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="stored parameter and compute dtype (default: the checkpoint's own)",
    )
    ap.add_argument("--quantize", choices=("none", "int4", "int8"), default="none")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = ap.parse_args(argv)

    from glm_jax.checkpoints import CheckpointError, move_to_device, save_serving
    from glm_jax.config import ConfigError, parse_overrides
    from glm_jax.convert import ConversionError
    from glm_jax.families import FamilyError, get_family
    from glm_jax.quant import quantize_params, tree_bytes
    from glm_jax.released import convert_folder
    from glm_jax.tokenizer import TokenizerError, bundled_file, check_fits

    t0 = time.perf_counter()
    try:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise CheckpointError(f"{os.path.abspath(args.out)} exists and is not empty; choose another --out")
        result = convert_folder(args.input, args.family, args.tokenizer, args.dtype, parse_overrides(args.set))
        config, params = result.config, move_to_device(result.params)  # numpy leaves dropped as they move
        tok = get_family(result.family).load_tokenizer(result.tokenizer_file)
        check_fits(tok, config.padded_vocab_size, f"the converted model ({args.input})")
        if args.quantize != "none":
            if config.quantization != "none":
                raise ConversionError(f"{args.input} holds {config.quantization} weights already")
            config = config.override(quantization=args.quantize)
            params = quantize_params(params, config)
        save_serving(
            args.out, config, params, result.step, os.path.abspath(args.input), result.family, bundled_file(tok)
        )
    except (ConversionError, ConfigError, FamilyError, TokenizerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = {
        "input": os.path.abspath(args.input),
        "out": os.path.abspath(args.out),
        "layout": result.layout,
        "family": result.family,
        "tokenizer": tok.kind,
        "source_dtype": result.source_dtype,
        "param_dtype": config.param_dtype,
        "quantization": config.quantization,
        "step": result.step,
        "ranks": result.ranks,
        "bytes": tree_bytes(params),
        "seconds": time.perf_counter() - t0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    print(
        f"{result.layout} ({result.family}) -> {args.out}: {out['bytes'] / 1e9:.3f} GB {config.param_dtype}"
        f"{', ' + config.quantization if config.quantization != 'none' else ''}",
        file=sys.stderr,
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
