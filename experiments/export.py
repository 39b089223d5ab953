"""Export a checkpoint (trained, fine-tuned, converted or quantized) into a released layout.

    python experiments/export.py --checkpoint DIR --out DIR --format hf-glm|chatglm2 [--dtype float16]

hf-glm: safetensors shards + config.json that transformers' `GlmForCausalLM.from_pretrained` loads;
chatglm2: ChatGLM2-6B / ChatGLM3-6B's released names (what `experiments/convert.py` reads back).
Quantized weights are dequantized. The checkpoint's tokenizer file is copied along. Only a model
with the matching block exports; anything else is a clear error (exit 2). Ends with a JSON line.
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=("hf-glm", "chatglm2"), required=True)
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (GB)")
    args = ap.parse_args(argv)

    from glm_jax.export import ExportError, export_tensors, write_folder
    from glm_jax.tokenizer import bundled_file

    m = load_model_or_exit(args)
    try:
        tensors, cfg = export_tensors(m.params, m.config, args.format, args.dtype, m.tokenizer.specials)
        files = write_folder(args.out, tensors, cfg, int(args.shard_gb * 2**30), bundled_file(m.tokenizer))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "out": os.path.abspath(args.out),
        "format": args.format,
        "family": m.family.name,
        "dtype": args.dtype,
        "tensors": len(tensors),
        "shards": len(files),
        "bytes": int(sum(x.nbytes for x in tensors.values())),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
