"""The paper's evaluation protocols (docs/reference.md#7-evaluation-protocols): LAMBADA, MMLU, LM windows.

Protocol logic works on two narrow interfaces, so it is testable with hand-made models:

- `score(rows) -> [(logprob_sum, tokens, all_argmax)]`: teacher forcing. A row is (a model-ready
  prompt from `Family.prompt_ids`, continuation tokens); the continuation is fed after the
  prompt's start id (sop for a prefix family, the prompt's last id for a causal one) and scored
  token by token (the start id predicts its first token).
- `beams(prompt tokens) -> [text, ...]`: beam-search outputs, best first.

`ModelScorer` implements both for a GLM and its parameters.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import placement
from glm_jax.config import GLMConfig
from glm_jax.decoding import bucket_length
from glm_jax.families import Family, default_stop_ids, get_family
from glm_jax.generate import Generator, inference_params, layered_forward, make_prompts
from glm_jax.losses import token_loss
from glm_jax.model import GLM
from glm_jax.objectives import CONTRACT_KEYS
from glm_jax.tokenizer import GLM_IDS, SpecialIds, Tokenizer

Row = tuple[Sequence[int], Sequence[int]]
ScoreFn = Callable[[Sequence[Row]], list[tuple[float, int, bool]]]


# ---- teacher forcing with a GLM --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(config: GLMConfig, params, batch):
    """params in `generate.serving_params` layout (the layers unrolled, as the generator holds them)."""
    logits = layered_forward(config, params, batch).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    gold = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return gold, jnp.argmax(logits, axis=-1) == batch["targets"]


def teacher_forcing_batch(
    rows: Sequence[Row], config: GLMConfig, length: int | None = None, ids: SpecialIds = GLM_IDS, causal: bool = False
) -> dict:
    """Rows -> a padded batch (contract arrays) whose loss_mask covers the continuations. Its
    length: `length`, or the longest context plus the longest continuation rounded up to a multiple
    of 64 (`decoding.bucket_length`)."""
    prompts = make_prompts([list(context) for context, _ in rows], config, ids, causal)
    longest = int(prompts.lengths.max()) + max(len(continuation) for _, continuation in rows)
    width = length or bucket_length(longest, multiple=64)
    out = {key: np.zeros((len(rows), width), np.int32) for key in CONTRACT_KEYS}
    for i, (_, continuation) in enumerate(rows):
        n, k = int(prompts.lengths[i]), len(continuation)  # context and continuation lengths
        out["tokens"][i, : n + k] = list(prompts.tokens[i, :n]) + [prompts.start[i]] + list(continuation[:-1])
        out["targets"][i, n : n + k] = continuation
        out["loss_mask"][i, n : n + k] = 1
        out["segment_ids"][i, : n + k] = 1
        out["prefix_mask"][i, :n] = 0 if causal else 1
        out["position_ids"][i, :n] = np.arange(n)
        if prompts.continue_positions[i]:
            out["position_ids"][i, n : n + k] = np.arange(n, n + k)
        else:
            out["position_ids"][i, n : n + k] = prompts.mask_pos[i]
        if config.position_encoding_2d:
            out["block_position_ids"][i, n : n + k] = np.arange(1, k + 1)
    return out


class ModelScorer:
    """`score` and `beams` for a GLM: teacher-forced batches and KV-cached beam search.

    Rows longer than the model's max_sequence_length are cut from the left of their context
    (after the special ids that open a causal prompt: [gMASK] sop, LLaMA's <s>), as the reference
    datasets cut; `cut_rows` counts them.
    mesh: a (data, 1, tensor) mesh to score and search on (`placement`): the weights split by the
    training rules, each batch's rows over `data` (the batch size rounded up to a multiple of it).
    The weights are held once, in `generate.serving_params` layout, for teacher forcing
    (`generate.layered_forward`) and beam search alike; consume: as `Generator`'s."""

    def __init__(
        self,
        config: GLMConfig,
        params,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 16,
        family: Family | None = None,
        mesh: jax.sharding.Mesh | None = None,
        consume: bool = False,
    ):
        # one copy of the weights, in the generator's per-layer layout, for scoring and beam search
        params = inference_params(config, params, mesh, consume)
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.batch_size = placement.padded_rows(batch_size, mesh)
        self.family = family or get_family("glm")
        self.ids = tokenizer.specials if tokenizer is not None else GLM_IDS
        self.cut_rows = 0

    @functools.cached_property
    def generator(self) -> Generator:
        """Made on first use (beam search); it shares the scorer's per-layer weights."""
        return Generator(self.config, self.params, ids=self.ids, causal=self.family.causal, mesh=self.mesh)

    def fit(self, row: Row) -> Row:
        """A row cut from the left of its context to fit max_sequence_length."""
        ctx, cont = list(row[0]), list(row[1])
        start = 0 if self.family.causal or (ctx and ctx[-1] == self.ids.sop) else 1
        over = len(ctx) + start + len(cont) - 1 - self.config.max_sequence_length
        if over <= 0:
            return ctx, cont
        keep = self._lead(ctx) if self.family.causal else 0  # [gMASK] sop, LLaMA's <s>: never cut
        if len(ctx) - keep - over < (0 if self.family.causal else 2):
            raise ValueError(
                f"a continuation of {len(cont)} tokens does not fit max_sequence_length="
                f"{self.config.max_sequence_length}"
            )
        self.cut_rows += 1
        return ctx[:keep] + ctx[keep + over :], cont

    def _lead(self, ctx: Sequence[int]) -> int:
        """How many special ids open a causal prompt (ChatGLM2's [gMASK] sop, LLaMA's <s>, none for
        BLOOM): the head a cut keeps."""
        specials = self.tokenizer.special_ids if self.tokenizer is not None else {self.ids.gmask, self.ids.sop}
        return next((i for i, t in enumerate(ctx) if t not in specials), len(ctx))

    def fit_prompt(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """A generation prompt cut from the left of its context to leave room for max_new_tokens."""
        prompt = list(prompt)
        ends_with_start = self.family.causal or (prompt and prompt[-1] == self.ids.sop)
        need = len(prompt) + (0 if ends_with_start else 1) + max_new_tokens
        if need <= self.config.max_sequence_length:
            return prompt
        return self.fit((prompt, [0] * (max_new_tokens + 1)))[0]

    def score(self, rows: Sequence[Row]) -> list[tuple[float, int, bool]]:
        out = []
        rows = [self.fit(r) for r in rows]
        for i in range(0, len(rows), self.batch_size):
            chunk = list(rows[i : i + self.batch_size])
            n_real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - n_real)  # one batch shape
            batch = teacher_forcing_batch(chunk, self.config, ids=self.ids, causal=self.family.causal)
            mask = batch["loss_mask"].astype(bool)
            gold, hit = _token_logprobs(self.config, self.params, {k: jnp.asarray(v) for k, v in batch.items()})
            gold, hit = np.asarray(gold, np.float64), np.asarray(hit)
            for r in range(n_real):
                m = mask[r]
                out.append((float(gold[r][m].sum()), int(m.sum()), bool(hit[r][m].all())))
        return out

    def beams(
        self,
        prompt: Sequence[int],
        num_beams: int = 16,
        max_new_tokens: int = 5,
        no_repeat_ngram: int = 3,
        banned_ids: Sequence[int] = (),
        banned_prefixes: Sequence[Sequence[int]] = (),
    ) -> list[str]:
        """Beam-search outputs best first, decoded without their stop token (the reference's
        `generate_text(return_all_beams=True)`)."""
        stops = self.family.stop_ids(self.tokenizer) if self.tokenizer is not None else None
        prompt = self.fit_prompt(prompt, max_new_tokens)
        found = self.generator.beam_search(
            prompt,
            num_beams,
            max_new_tokens,
            no_repeat_ngram=no_repeat_ngram,
            stop_tokens=stops,
            banned_ids=banned_ids,
            banned_prefixes=banned_prefixes,
        )
        stop = set(stops or default_stop_ids(self.ids))
        return [self.tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop else tokens) for tokens, _ in found]


# ---- LAMBADA -------------------------------------------------------------------------------------------------
def read_lambada(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, target word) pairs: the target is the passage's last whitespace-delimited word."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"LAMBADA file {path} not found (pass --data PATH)")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"].strip()
            context, _, target = text.rpartition(" ")
            if context and target:
                out.append((context, target))
            if limit and len(out) >= limit:
                break
    return out


def is_punctuation(word: str) -> bool:
    return bool(word) and all(unicodedata.category(ch).startswith("P") for ch in word)


def output_words(text: str) -> list[str]:
    """Whitespace-delimited words, with punctuation split off the words it is glued to: our
    tokenizer emits "word." where the reference's (icetk) emitted "word ." (our reading)."""
    return re.sub(r"([^\w\s'’-])", r" \1 ", text).split()


def lambada_prediction(
    outputs: Sequence[str], split_punctuation: bool = False, retokenize: Callable[[str], str] = lambda w: w
) -> str:
    """`tasks/lambada/task.py`: the first beam whose stripped text, split on " ", has a second
    word that `in string.punctuation` (a substring test, as the reference writes it) gives its first
    word; if none does, beam 0's; the word goes through the tokenizer and back (`retokenize`).
    split_punctuation: split punctuation off the words it is glued to first, for our tokenizer,
    which emits "word." where icetk's pieces put "word ." (our reading)."""

    def words(text):
        return output_words(text) if split_punctuation else text.strip().split(" ")

    def qualifies(w):
        return is_punctuation(w[1]) if split_punctuation else w[1] in string.punctuation

    for text in outputs:
        w = words(text)
        if len(w) >= 2 and qualifies(w):
            return retokenize(w[0])
    w = words(outputs[0]) if outputs else []
    return retokenize(w[0]) if w else ""


GLM130B_QUOTES = dict(banned_ids=[20068, 146010, 146337], banned_prefixes=[[46010], [146337]])  # "'", "``"


def lambada_bans(tokenizer: Tokenizer) -> tuple[list[int], list[list[int]]]:
    """`tasks/lambada/task.py`'s bans with this tokenizer's ids: every ASCII punctuation character
    that encodes to one id is banned at every step, and each one's id sequence is a banned prefix;
    GLM-130B's tokenizer adds the reference's three quote-like ids and two prefixes; others ban
    the encodings of "'" and "``" as prefixes."""
    if tokenizer.kind == "glm-130b":
        invalid, prefixes = list(GLM130B_QUOTES["banned_ids"]), [list(p) for p in GLM130B_QUOTES["banned_prefixes"]]
    else:
        invalid, prefixes = [], [tokenizer.encode("'"), tokenizer.encode("``")]
    for p in string.punctuation:
        ids = tokenizer.encode(p)
        if len(ids) == 1:
            invalid.append(ids[0])
        prefixes.append(ids)
    return invalid, [p for p in prefixes if p]


def lambada_beam(
    examples: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    beams: Callable,
    progress: Callable = lambda it: it,
    family: Family | None = None,
) -> list[bool]:
    """The GLM-130B protocol: [gMASK] after the context, beam search with its bans, the prediction
    rule (`lambada_prediction`; punctuation split off words only for our tokenizer), exact match.
    beams(prompt, banned_ids, banned_prefixes) -> decoded outputs best first."""
    family = family or get_family("glm")
    banned_ids, banned_prefixes = lambada_bans(tokenizer)
    split = tokenizer.kind == "glm"
    retokenize = lambda w: tokenizer.decode(tokenizer.encode(w)).strip()
    results = []
    for context, target in progress(examples):
        outputs = beams(family.prompt_ids(tokenizer, tokenizer.encode(context)), banned_ids, banned_prefixes)
        results.append(lambada_prediction(outputs, split, retokenize).strip() == target.strip())
    return results


def lambada_greedy(
    examples: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    score: ScoreFn,
    progress: Callable = lambda it: it,
    batch: int = 64,
    family: Family | None = None,
) -> list[bool]:
    """The cheap protocol: every target token is the argmax under teacher forcing."""
    family = family or get_family("glm")
    results = []
    rows = [(family.prompt_ids(tokenizer, tokenizer.encode(c)), tokenizer.encode(" " + t)) for c, t in examples]
    for i in progress(range(0, len(rows), batch)):
        results += [hit for _, _, hit in score(rows[i : i + batch])]
    return results


# ---- multiple choice (MMLU) ------------------------------------------------------------------------------------
LETTERS = "ABCD"


def read_mmlu(folder: str, split: str, fmt: str = "mmlu") -> dict[str, list[tuple[str, list[str], int]]]:
    """{subject: [(question, [4 choices], answer index)]} from folder/split/: MMLU's
    SUBJECT_split.csv (question, choice0..3, answer index), or CMMLU's SUBJECT.csv (header
    `,Question,A,B,C,D,Answer`, a letter answer)."""
    d = os.path.join(folder, split)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{fmt.upper()} folder {d} not found")
    out = {}
    for name in sorted(os.listdir(d)):
        if fmt == "cmmlu" and name.endswith(".csv"):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                rows = [
                    (r["Question"], [r[x] for x in LETTERS], LETTERS.index(r["Answer"].strip()))
                    for r in csv.DictReader(f)
                    if r.get("Answer", "").strip() in tuple(LETTERS)
                ]
            out[name[:-4]] = rows
        elif fmt == "mmlu" and name.endswith(f"_{split}.csv"):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                rows = [
                    (r["question"], [r[f"choice{i}"] for i in range(4)], int(r["answer"])) for r in csv.DictReader(f)
                ]
            out[name[: -len(f"_{split}.csv")]] = rows
    return out


# tasks/mmlu/task.py's subject groups (subject names as the CSV files spell them)
MMLU_CATEGORIES = {
    "STEM": [
        "abstract algebra",
        "anatomy",
        "astronomy",
        "college biology",
        "college chemistry",
        "college computer science",
        "college mathematics",
        "college physics",
        "computer security",
        "conceptual physics",
        "electrical engineering",
        "elementary mathematics",
        "high school biology",
        "high school chemistry",
        "high school computer science",
        "high school mathematics",
        "high school physics",
        "high school statistics",
        "machine learning",
    ],
    "Other": [
        "business ethics",
        "clinical knowledge",
        "college medicine",
        "global facts",
        "human aging",
        "management",
        "marketing",
        "medical genetics",
        "miscellaneous",
        "nutrition",
        "professional accounting",
        "professional medicine",
        "virology",
    ],
    "Social Sciences": [
        "econometrics",
        "high school geography",
        "high school government and politics",
        "high school macroeconomics",
        "high school microeconomics",
        "high school psychology",
        "human sexuality",
        "professional psychology",
        "public relations",
        "security studies",
        "sociology",
        "us foreign policy",
    ],
    "Humanities": [
        "formal logic",
        "high school european history",
        "high school us history",
        "high school world history",
        "international law",
        "jurisprudence",
        "logical fallacies",
        "moral disputes",
        "moral scenarios",
        "philosophy",
        "prehistory",
        "professional law",
        "world religions",
    ],
}
CATEGORY_OF = {name.replace(" ", "_"): cat for cat, names in MMLU_CATEGORIES.items() for name in names}


def category_accuracy(per_subject: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Size-weighted accuracy of each MMLU category over the subjects present."""
    totals: dict[str, list[float]] = {}
    for subject, (acc, n) in per_subject.items():
        t = totals.setdefault(CATEGORY_OF.get(subject, "Other"), [0.0, 0])
        t[0] += acc * n
        t[1] += n
    return {cat: hit / n for cat, (hit, n) in totals.items() if n}


def mmlu_prompt(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    body = question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
    return body + (f" {LETTERS[answer]}\n\n" if answer is not None else "")


def multiple_choice(
    subjects: dict,
    tokenizer: Tokenizer,
    score: ScoreFn,
    shots: dict | None = None,
    k: int = 0,
    progress: Callable = lambda it: it,
    family: Family | None = None,
) -> dict:
    """[MASK] scoring: '<k examples> question A. .. D. .. Answer: [MASK]', each choice letter scored
    by its log-likelihood after sop; the highest wins. -> per-subject and size-weighted accuracy."""
    family = family or get_family("glm")
    per_subject = {}
    for subject in progress(sorted(subjects)):
        prefix = "".join(mmlu_prompt(q, c, a) for q, c, a in (shots or {}).get(subject, [])[:k])
        rows, answers = [], []
        for q, choices, answer in subjects[subject]:
            ctx = family.prompt_ids(tokenizer, tokenizer.encode(prefix + mmlu_prompt(q, choices)), tokenizer.mask_id)
            rows += [(ctx, tokenizer.encode(" " + LETTERS[i])) for i in range(len(choices))]
            answers.append(answer)
        scores = [s for s, _, _ in score(rows)]
        picks = np.asarray(scores).reshape(len(answers), -1).argmax(-1)
        per_subject[subject] = (float(np.mean(picks == np.asarray(answers))), len(answers))
    total = sum(n for _, n in per_subject.values())
    weighted = sum(acc * n for acc, n in per_subject.values()) / max(total, 1)
    categories = category_accuracy(per_subject)
    return {
        "accuracy": weighted,
        "n": total,
        "categories": categories,
        "category_average": sum(categories.values()) / max(len(categories), 1),
        "subjects": {s: a for s, (a, _) in per_subject.items()},
    }


# ---- language modelling --------------------------------------------------------------------------------------
def summed_loss(
    rows: Sequence[Row], score: ScoreFn, batch: int, progress: Callable = lambda it: it
) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of rows, scored `batch` at a time."""
    nll, tokens = 0.0, 0
    for i in progress(range(0, len(rows), batch)):
        for logp, n, _ in score(rows[i : i + batch]):
            nll -= logp
            tokens += n
    return nll, tokens


def sliding_window_rows(
    tokens: Sequence[int],
    window: int,
    prompt: Callable[[list[int]], list[int]] = lambda ids: ids + [GLM_IDS.gmask, GLM_IDS.sop],
) -> list[Row]:
    """docs/reference.md section 7: windows of `window` inputs; each scores window/2 new tokens after the
    window/2 - 1 tokens before them, [gMASK] and sop (the first window has no context).
    prompt: context ids -> the model-ready prompt (`Family.prompt_ids`)."""
    stride = window // 2
    rows = []
    for start in range(0, len(tokens), stride):
        context = list(tokens[max(0, start - (stride - 1)) : start])
        rows.append((prompt(context), list(tokens[start : start + stride])))
    return rows


def language_modelling(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    score: ScoreFn,
    window: int = 2048,
    progress: Callable = lambda it: it,
    family: Family | None = None,
) -> dict:
    """Perplexity per token and bits per UTF-8 byte over documents."""
    family = family or get_family("glm")
    n_bytes = 0.0
    rows = []
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        rows += sliding_window_rows(ids, window, lambda ctx: family.prompt_ids(tokenizer, ctx))
        n_bytes += len(text.encode("utf-8"))
    nll, tokens = summed_loss(rows, score, 64, progress)
    return {
        "perplexity": math.exp(nll / max(tokens, 1)),
        "bits_per_byte": nll / max(n_bytes, 1) / math.log(2),
        "tokens": int(tokens),
        "bytes": int(n_bytes),
        "nll": nll,
    }


# ---- GLM-130B's language-modelling tasks (evaluation/dataset.py LanguageModelTaskDataset) -------------------
def reference_lm_windows(
    tokens: Sequence[int], max_seq_length: int, generation_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) per window, as the reference cuts a tokenized file: windows of
    max_seq_length - 1 tokens starting every generation_length; the first scores all but its
    first token (which is its context), each later one scores its last generation_length tokens
    with the rest as context. Every token but the file's first is scored exactly once."""
    n, g, w = len(tokens), generation_length, max_seq_length - 1
    if g <= 0 or w <= g:
        raise ValueError(f"generation_length={g} must be positive and below max_seq_length - 1 = {w}")
    count = max(math.ceil(max(n - w, 0) / g) + 1, 1)
    rows = []
    for idx in range(count):
        window = list(tokens[idx * g : idx * g + w])
        cut = 1 if idx == 0 else w - g
        context, scored = window[:cut], window[cut:]
        if scored:
            rows.append((context, scored))
    return rows


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def words_in(raw_text: str) -> int:
    """The reference's word count for per-word perplexity: len(raw_text.strip().split(" "))."""
    return len(raw_text.strip().split(" "))


def reference_perplexity(
    raw_text: str,
    tokenizer: Tokenizer,
    score: ScoreFn,
    max_seq_length: int = 2048,
    generation_length: int = 256,
    family: Family | None = None,
    progress: Callable = lambda it: it,
    batch: int = 16,
) -> dict:
    """WikiText / PTB as GLM-130B reports them: the whole file tokenized at once, the reference's
    windows, [gMASK] sop after each window's context, per-WORD perplexity
    exp(min(20, summed token loss / words)) (`evaluation/metrics.py` caps the exponent at 20)."""
    family = family or get_family("glm")
    ids = tokenizer.encode(raw_text)
    rows = [
        (family.prompt_ids(tokenizer, ctx), scored)
        for ctx, scored in reference_lm_windows(ids, max_seq_length, generation_length)
    ]
    nll, n = summed_loss(rows, score, batch, progress)
    words = words_in(raw_text)
    return {
        "perplexity": math.exp(min(20.0, nll / words)),
        "perplexity_uncapped": _exp(nll / words),
        "token_perplexity": _exp(nll / max(n, 1)),
        "nll": nll,
        "tokens": int(n),
        "words": words,
        "windows": len(rows),
    }


def reference_bits_per_byte(
    docs: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    score: ScoreFn,
    max_seq_length: int = 2048,
    generation_length: int = 1024,
    family: Family | None = None,
    progress: Callable = lambda it: it,
    batch: int = 16,
) -> dict:
    """The Pile as the paper reports it: bits per UTF-8 byte per component (`pile_set_name`),
    summed token loss over the component's bytes / ln 2, each document cut into the reference's
    windows (generation_length 1024). docs: (component, text) pairs."""
    family = family or get_family("glm")
    per: dict[str, list[float]] = {}
    for name, text in progress(list(docs)):
        ids = tokenizer.encode(text)
        rows = [
            (family.prompt_ids(tokenizer, c), x)
            for c, x in reference_lm_windows(ids, max_seq_length, generation_length)
        ]
        nll, _ = summed_loss(rows, score, batch)
        acc = per.setdefault(name, [0.0, 0.0])
        acc[0] += nll
        acc[1] += len(text.encode("utf-8"))
    components = {k: nll / max(b, 1) / math.log(2) for k, (nll, b) in per.items()}
    total_nll, total_bytes = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    return {
        "bits_per_byte": components,
        "bits_per_byte_all": total_nll / max(total_bytes, 1) / math.log(2),
        "bytes": int(total_bytes),
    }


@functools.partial(jax.jit, static_argnums=(0,))
def _sft_loss_sum(config: GLMConfig, params, batch):
    loss, n = token_loss(GLM(config).apply({"params": params}, batch), batch)
    return loss * n, n


def sft_loss(config: GLMConfig, params, sequences: Sequence[dict], batch: int) -> float:
    """Mean teacher-forced NLL per learned token (replies and their end ids) over packed SFT
    sequences (`sft.SFTBuilder.sequences`), as training's held-out loss counts it."""
    total = count = 0.0
    for i in range(0, len(sequences), batch):
        rows = list(sequences[i : i + batch])
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch - len(rows))  # one compiled shape
        s, n = _sft_loss_sum(config, params, {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in CONTRACT_KEYS})
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
