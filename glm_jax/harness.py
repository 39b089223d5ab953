"""An lm-evaluation-harness model over our scorer and generator, registered as `glm_jax`.

    import glm_jax.harness, lm_eval
    lm_eval.simple_evaluate(model="glm_jax", model_args="checkpoint=runs/chatglm3", tasks=[...])
    python experiments/harness_eval.py --model glm_jax --model_args checkpoint=DIR --tasks lambada_openai

Requests follow the checkpoint's family: a context becomes the family's prompt ([gMASK] sop after
it for a prefix LM, bidirectional over the context; [gMASK] sop before it for a causal one) and the
continuation is teacher-forced after sop. Context and continuation are encoded separately, as
`evaluate.lambada_greedy` does, so the harness scores the same tokens as our scripts.

- `loglikelihood`: (sum of log-probs, whether every continuation token is the argmax), batched;
- `loglikelihood_rolling`: the whole text's log-likelihood over [gMASK] windows of the model's
  length (`evaluate.sliding_window_rows`, every token scored once);
- `generate_until`: greedy (or sampled with `do_sample`) continuations, batched per generation
  settings, cut at the family's stop ids, `max_gen_toks` and the first `until` string; a context
  too long for the model is cut from the left (counted in `scorer.cut_rows`).

Model args: `checkpoint`, and optionally `quantize`, `tokenizer`, `family`, `batch_size`,
`max_gen_toks`, `window`, and `mesh` (a spec like pretrain's `--mesh`: `1x8` is 8 tensor shards,
`2x1x4` 2 data x 4 tensor shards; default one device): the model is loaded straight onto that
(data, 1, tensor) mesh over the first devices it needs and scored and generated there (`placement`).

Requires the `lm-eval` package (`pip install lm-eval`); importing this module registers the model.
"""

from __future__ import annotations

import jax
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from glm_jax import sharding
from glm_jax.evaluate import ModelScorer, sliding_window_rows
from glm_jax.loading import load_model


def make_mesh(spec: str | None) -> jax.sharding.Mesh | None:
    """The inference mesh of a `mesh=` model arg over the first devices it needs (None: one device)."""
    spec = "" if spec is None else str(spec).strip()
    if not spec:
        return None
    return sharding.make_mesh(spec, jax.devices()[: sharding.devices_needed(spec)])


@register_model("glm_jax")
class GLMJaxLM(LM):
    def __init__(
        self,
        checkpoint: str,
        quantize: str | None = None,
        tokenizer: str | None = None,
        family: str | None = None,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        window: int | None = None,
        mesh: str | None = None,
        **_,
    ):
        super().__init__()
        self.mesh = make_mesh(mesh)
        loaded = load_model(checkpoint, quantize=quantize, tokenizer_file=tokenizer, family=family, mesh=self.mesh)
        self.model, self.tok, self.family = loaded, loaded.tokenizer, loaded.family
        self.batch = int(batch_size) if str(batch_size).isdigit() else 16
        self.scorer = ModelScorer(
            loaded.config,
            loaded.params,
            loaded.tokenizer,
            batch_size=self.batch,
            family=loaded.family,
            mesh=self.mesh,
        )
        self.max_gen_toks = int(max_gen_toks)
        self.window = int(window or min(loaded.config.max_sequence_length, 2048))

    def _prompt(self, text: str) -> list[int]:
        return self.family.prompt_ids(self.tok, self.tok.encode(text) if text else [])

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [(self._prompt(request.args[0]), self.tok.encode(request.args[1])) for request in requests]
        return [(logp, hit) for logp, _, hit in self.scorer.score(rows)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            rows = sliding_window_rows(
                self.tok.encode(request.args[0]), self.window, lambda context: self.family.prompt_ids(self.tok, context)
            )
            out.append(sum(logp for logp, _, _ in self.scorer.score(rows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        stops = self.family.stop_ids(self.tok)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings, by index
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            for at in range(0, len(members), self.batch):
                chunk = members[at : at + self.batch]
                prompts = [self.scorer.fit_prompt(self._prompt(requests[i].args[0]), budget) for i in chunk]
                gen = self.scorer.generator.generate(
                    prompts, budget, temperature=temperature, stop_tokens=stops, key=jax.random.key(at)
                )
                for i, ids in zip(chunk, gen):
                    text = self.tok.decode(ids)
                    cuts = [text.index(stop) for stop in until if stop and stop in text]
                    out[i] = text[: min(cuts)] if cuts else text
        return out
