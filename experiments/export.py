"""Export a checkpoint (trained, fine-tuned, converted or quantized) into a released layout, or
its LoRA adapter as a Hugging Face peft folder.

    python experiments/export.py --checkpoint DIR --out DIR --format hf-glm|chatglm2|llama|bloom|opt [--dtype float16]
    python experiments/export.py --checkpoint BASE --adapter DIR --out DIR --format peft [--layout L]

hf-glm: safetensors shards + config.json that transformers' `GlmForCausalLM.from_pretrained` loads;
chatglm2: ChatGLM2-6B / ChatGLM3-6B's released names (what `experiments/convert.py` reads back);
llama, bloom, opt: transformers' LlamaForCausalLM, BloomForCausalLM, OPTForCausalLM folders.
Quantized weights are dequantized. The checkpoint's tokenizer file is copied along. Only a model
with the matching block exports; anything else is a clear error (exit 2).
peft: the LoRA of `--adapter` (ours, or a peft folder) as adapter_config.json +
adapter_model.safetensors in a released layout's module names (`--layout` chatglm, chatglm2 or
hf-glm; default: the family's), which `PeftModel.from_pretrained(released_model, DIR)` loads with
the same outputs (glm_jax/peft_files.py). Ends with a JSON line.
"""

import argparse
import json
import os
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit

FORMATS = ("hf-glm", "chatglm2", "llama", "bloom", "opt", "peft")
LAYOUTS = ("chatglm", "chatglm2", "hf-glm")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=FORMATS, required=True)
    ap.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="stored dtype (default: float16 for models, float32 for peft adapters, as peft keeps them)",
    )
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (GB)")
    ap.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="peft: the released module names (default: the family's: chatglm-6b and glm-130b chatglm, "
        "chatglm2/3 chatglm2, glm-4 hf-glm)",
    )
    ap.add_argument(
        "--base-model",
        default=None,
        metavar="NAME",
        help="peft: base_model_name_or_path to record (default: the released folder the checkpoint was "
        "converted from, when it is one)",
    )
    args = ap.parse_args(argv)
    if args.format == "peft" and not args.adapter:
        ap.error("--format peft writes an adapter: pass --adapter DIR (a LoRA fine-tuning run or a peft folder)")

    from glm_jax.export import ExportError, export_tensors, write_folder
    from glm_jax.peft_files import default_layout, write_peft_folder
    from glm_jax.tokenizer import bundled_file

    m = load_model_or_exit(args)
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "out": os.path.abspath(args.out),
        "format": args.format,
        "family": m.family.name,
    }
    try:
        if args.format == "peft":
            dtype = args.dtype or "float32"
            base = args.base_model or _released_folder(m.source)
            layout = args.layout or default_layout(m.family.name)
            summary = write_peft_folder(args.out, m.config, m.params, layout, base, dtype)
            result.update(adapter=os.path.abspath(args.adapter), dtype=dtype, base_model_name_or_path=base, **summary)
        else:
            dtype = args.dtype or "float16"
            tensors, cfg = export_tensors(m.params, m.config, args.format, dtype, m.tokenizer.specials)
            files = write_folder(args.out, tensors, cfg, int(args.shard_gb * 2**30), bundled_file(m.tokenizer))
            result.update(
                dtype=dtype,
                tensors=len(tensors),
                shards=len(files),
                bytes=int(sum(x.nbytes for x in tensors.values())),
            )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    return result


def _released_folder(source: str | None) -> str | None:
    """The folder a converted checkpoint came from, when it is a released one (has config.json)."""
    return source if source and os.path.isfile(os.path.join(source, "config.json")) else None


if __name__ == "__main__":
    main()
