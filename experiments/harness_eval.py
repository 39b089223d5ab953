"""lm-evaluation-harness with our model registered (`glm_jax`): lm-eval's own command line.

    python experiments/harness_eval.py run --model glm_jax --model_args checkpoint=DIR --tasks lambada_openai
    python experiments/harness_eval.py run --model glm_jax --model_args checkpoint=DIR --batch_size 8 \
        --include_path tasks/ --tasks my_local_task

Everything after the script name is lm-eval's (`lm_eval --help`); this wrapper only imports
`glm_jax.harness` first, which registers the model in lm-eval's registry (the plain `lm_eval`
command cannot discover models outside its package). `--model_args` takes `checkpoint`, and
optionally `quantize`, `tokenizer`, `family`, `max_gen_toks`, `window`; the batch is lm-eval's own
`--batch_size N`.
"""

import sys


def main(argv=None):
    from lm_eval.__main__ import cli_evaluate

    import glm_jax.harness  # noqa: F401  (registers "glm_jax")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
