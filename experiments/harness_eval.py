"""lm-evaluation-harness with our model registered (`glm_jax`): lm-eval's own command line.

    python experiments/harness_eval.py run --model glm_jax --model_args checkpoint=DIR --tasks lambada_openai
    python experiments/harness_eval.py run --model glm_jax --model_args checkpoint=DIR --batch_size 8 \
        --include_path tasks/ --tasks my_local_task
    python experiments/harness_eval.py run --model glm_jax --model_args checkpoint=DIR,mesh=1x8 --tasks lambada_openai

Everything after the script name is lm-eval's (`lm_eval --help`); this wrapper only imports
`glm_jax.harness` first, which registers the model in lm-eval's registry (the plain `lm_eval`
command cannot discover models outside its package). `--model_args` takes `checkpoint`, and
optionally `quantize`, `tokenizer`, `family`, `max_gen_toks`, `window`, and `mesh` (pretrain's
`--mesh` spec: `1x8` splits the model over 8 tensor shards, `2x1x4` over 2 data x 4 tensor; on a
machine with fewer devices, CPU devices are simulated); the batch is lm-eval's own `--batch_size N`.
"""

import argparse
import json
import sys


def mesh_arg(argv) -> str | None:
    """The `mesh` of lm-eval's `--model_args` (`-a`) in argv, in any of its forms (`k=v,k=v`,
    `k=v k=v`, `--model_args=...`, a JSON object), or None."""
    values, taking = [], False
    for token in argv:
        if token.startswith(("--model_args=", "-a=")):
            values.append(token.split("=", 1)[1])
            taking = False
        elif token in ("--model_args", "-a"):
            taking = True
        elif taking and token.startswith("-"):
            taking = False
        elif taking:
            values.append(token)
    mesh = None
    for value in values:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            mesh = parsed.get("mesh", mesh)
            continue
        for item in value.split(","):
            key, eq, val = item.partition("=")
            if eq and key.strip() == "mesh":
                mesh = val.strip()
    return None if mesh is None else str(mesh)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    mesh = mesh_arg(argv)
    if mesh:  # before JAX starts its backends: the devices the mesh needs (simulated on CPU)
        from glm_jax.script_args import prepare_devices

        prepare_devices(argparse.ArgumentParser(prog="harness_eval.py"), mesh)

    from lm_eval.__main__ import cli_evaluate

    import glm_jax.harness  # noqa: F401  (registers "glm_jax")

    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
