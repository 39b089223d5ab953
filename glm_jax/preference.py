"""Preference data: (prompt, chosen, rejected) rows -> pairs packed for DPO and reward models.

Formats, detected from each row's keys (JSON lines, or one JSON array):

    trl            {"prompt", "chosen", "rejected"}: strings, or message lists as trl takes them:
                   the prompt [{"role": "system"|"user"|"assistant", "content"}, ...] ending with a
                   user message, chosen / rejected an assistant message list ([{"role": "assistant",
                   "content"}]) or one assistant message
    colossalchat   {"context": [{"from": "system"|"human"|"user"|"assistant", "content"}, ...],
                    "chosen", "rejected"}: an assistant message {"from": "assistant", "content"} or
                   a list of one
    llamafactory   {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?}: the query
                   is `family.instruction_query(instruction, input)`

Each row becomes (system, history rounds, query, chosen text, rejected text) (`preference`). Bad
rows are skipped and counted (`PreferenceStats`): broken JSON, missing or mistyped fields (an
answer list of several messages included), an empty answer, chosen == rejected, a pair that does
not fit one row (a pair identical once cut to max_target counts as same_answer).

Both answers are built with `family.training_example(tok, history, query, answer, system)` after
the same prompt (oldest history rounds dropped until the prompt has at most `max_source` ids, then
cut as SFT cuts, `sft.cut`), and become samples of the batch contract by `sft.to_sample`, so a
prefix family's part A and 2D positions are exactly SFT's.

Layout of a packed row (`pack_pairs`, first fit of whole pairs in a seeded order, never split):

    segment_ids   1 1 1 1 2 2 2 2 2 3 3 3 4 4 4 4 0 0     pair k: chosen = segment 2k - 1,
                  |chosen 1|rejected 1|ch 2 |rejected 2|pad         rejected = segment 2k

Both sides of a pair are in one row, so in one microbatch. The arrays are the SFT batch contract
(`objectives.CONTRACT_KEYS`) and nothing else; the loss side recovers pairs from segment_ids
(`alignment.segment_logprobs` sums each segment's answer log-probabilities, `alignment.split_pairs`
pairs segment 2k-1 with 2k).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from glm_jax.data import DataError
from glm_jax.families import Family
from glm_jax.sft import (
    BadRow,
    SFTBuilder,
    cut,
    fitted_example,
    history_rounds,
    message_rounds,
    pack_units,
    read_rows,
    text_field,
    to_sample,
)
from glm_jax.tokenizer import Tokenizer

USER_ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant"}


@dataclasses.dataclass
class PreferenceStats:
    """What reading and building preference data kept, cut and skipped."""

    rows: int = 0
    pairs: int = 0
    bad_json: int = 0
    missing_fields: int = 0
    empty_answer: int = 0
    same_answer: int = 0
    too_long: int = 0
    cut_source: int = 0
    cut_target: int = 0  # answers (not pairs) cut to max_target
    dropped_rounds: int = 0
    formats: dict = dataclasses.field(default_factory=dict)
    tokens: int = 0  # real tokens in the packed rows
    sequences: int = 0
    seq_len: int = 0

    @property
    def skipped(self) -> int:
        return self.bad_json + self.missing_fields + self.empty_answer + self.same_answer + self.too_long

    def summary(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        padding = 1.0 - self.tokens / max(1, self.sequences * self.seq_len)
        return d | {"skipped": self.skipped, "padding_fraction": round(padding, 4)}


Pair = tuple[str | None, list[tuple[str, str]], str, str, str]  # system, history, query, chosen, rejected


# ---- rows -> pairs -------------------------------------------------------------------------------
def detect_format(row: dict) -> str:
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("missing_fields")
    for name, key in (("colossalchat", "context"), ("llamafactory", "instruction"), ("trl", "prompt")):
        if key in row:
            return name
    raise BadRow("missing_fields")


def prompt_messages(messages, role_key: str) -> tuple[str | None, list[tuple[str, str]], str]:
    """[system?, user, assistant, ..., user] -> (system or None, (query, reply) rounds, query)."""
    system, rounds, query = message_rounds(messages, role_key, "content", USER_ROLES)
    if query is None:  # the prompt must end with the query the answers reply to
        raise BadRow("missing_fields")
    return system, rounds, query


def _answer(x, role_key: str) -> str:
    """A string, an assistant message, or a list of exactly one assistant message -> its text."""
    if isinstance(x, list):
        if len(x) != 1:
            raise BadRow("missing_fields")
        x = x[0]
    if isinstance(x, dict):
        if x.get(role_key) != "assistant":
            raise BadRow("missing_fields")
        x = x.get("content")
    return text_field(x)


def preference(row: dict, family: Family = Family()) -> tuple[Pair, str]:
    """row -> ((system or None, history rounds, query, chosen, rejected), format). Raises BadRow."""
    fmt = detect_format(row)
    role_key = "from" if fmt == "colossalchat" else "role"
    system, history = None, []
    if fmt == "colossalchat":
        system, history, query = prompt_messages(row["context"], "from")
    elif fmt == "llamafactory":
        query = family.instruction_query(text_field(row["instruction"]), text_field(row.get("input") or ""))
        history = history_rounds(row)
        system = text_field(row["system"]) if row.get("system") else None
    elif isinstance(row["prompt"], list):
        system, history, query = prompt_messages(row["prompt"], "role")
    else:
        query = text_field(row["prompt"])
    chosen, rejected = _answer(row["chosen"], role_key), _answer(row["rejected"], role_key)
    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty_answer")
    if chosen == rejected:
        raise BadRow("same_answer")
    return (system, history, query, chosen, rejected), fmt


def answer_example(
    row: dict, family: Family, tok: Tokenizer, max_source: int, max_target: int
) -> tuple[list[int], list[int]]:
    """A scoring row {"prompt": text or trl messages, "answer": text or an assistant message} ->
    (ids, loss_mask) built as each answer of a pair is (`pair_examples`). Raises BadRow."""
    if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
        raise BadRow("missing_fields")
    try:
        if isinstance(row["prompt"], list):
            system, history, query = prompt_messages(row["prompt"], "role")
        else:
            system, history, query = None, [], text_field(row["prompt"])
        answer = _answer(row["answer"], "role")
    except (KeyError, TypeError, ValueError):
        raise BadRow("missing_fields") from None
    if not answer.strip():
        raise BadRow("empty_answer")
    ids, mask, _ = fitted_example(family, tok, history, query, answer, system, max_source)
    return cut(ids, mask, family, max_source, max_target)[:2]


# ---- pairs -> samples ----------------------------------------------------------------------------
def pair_examples(
    family: Family, tok: Tokenizer, pair: Pair, max_source: int, max_target: int, stats: PreferenceStats
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """A pair -> ((ids, loss_mask) chosen, (ids, loss_mask) rejected): `family.training_example`
    for each answer after the same prompt, the oldest history rounds dropped until the prompt has
    at most max_source ids, then cut as SFT cuts (`sft.cut`)."""
    system, history, query, chosen, rejected = pair
    *fitted, dropped = fitted_example(family, tok, history, query, chosen, system, max_source)
    stats.dropped_rounds += dropped
    made = [fitted, family.training_example(tok, history[dropped:], query, rejected, system)]
    out = []
    for ids, mask in made:
        ids, mask, cut_s, cut_t = cut(ids, mask, family, max_source, max_target)
        stats.cut_target += cut_t
        out.append((ids, mask))
    stats.cut_source += cut_s
    return out[0], out[1]


def build_pairs(
    paths: Sequence[str],
    family: Family,
    tok: Tokenizer,
    two_d: bool,
    max_source: int,
    max_target: int,
    seq_len: int,
    stats: PreferenceStats | None = None,
    limit: int | None = None,
) -> tuple[list[tuple[dict, dict]], PreferenceStats]:
    """Every usable row of the files -> (chosen sample, rejected sample) pairs of the batch contract
    (unpacked, `sft.to_sample`), at most `limit` rows; a pair longer than seq_len is skipped."""
    stats = stats or PreferenceStats(seq_len=seq_len)
    pairs, formats = [], collections.Counter()
    for path in paths:
        for row in read_rows(path, stats):
            if limit is not None and stats.rows > limit:
                stats.rows -= 1
                break
            try:
                pair, fmt = preference(row, family)
            except BadRow as e:
                setattr(stats, str(e), getattr(stats, str(e)) + 1)
                continue
            formats[fmt] += 1
            (c_ids, c_mask), (r_ids, r_mask) = pair_examples(family, tok, pair, max_source, max_target, stats)
            if c_ids == r_ids:  # identical once cut to max_target: no preference left
                stats.same_answer += 1
                continue
            if len(c_ids) + len(r_ids) - 2 > seq_len:
                stats.too_long += 1
                continue
            pairs.append((to_sample(c_ids, c_mask, family, tok, two_d), to_sample(r_ids, r_mask, family, tok, two_d)))
    stats.formats, stats.pairs = dict(formats), len(pairs)
    if not pairs:
        raise DataError(f"no usable preference rows in {list(paths)}: {stats.summary()}")
    return pairs, stats


def pack_pairs(pairs: Sequence[tuple[dict, dict]], seq_len: int, seed: int) -> list[dict[str, np.ndarray]]:
    """First-fit packing of whole pairs in a seeded order -> rows of the batch contract where pair
    k of a row is segments (2k - 1 chosen, 2k rejected)."""
    return pack_units(pairs, seq_len, np.random.default_rng([seed, 0x9A1]))


def segments_needed(builders) -> int:
    """The most segments in any row of the builders (None skipped), rounded up to whole pairs: the
    static segment count of `pair_objectives.PairObjective`."""
    most = max((int(row["segment_ids"].max()) for b in builders if b is not None for row in b.sequences), default=2)
    return max(2, most + most % 2)


def preference_builder(
    paths: Sequence[str],
    family: Family,
    tok: Tokenizer,
    two_d: bool,
    seq_len: int,
    max_source: int,
    max_target: int,
    seed: int = 0,
    shuffle: bool = True,
    limit: int | None = None,
) -> SFTBuilder:
    """Packed preference rows behind SFTBuilder's interface (`build(index)`, pure in (seed, index));
    its `stats` is a PreferenceStats. Shuffling moves whole rows, so pairs stay together."""
    pairs, stats = build_pairs(paths, family, tok, two_d, max_source, max_target, seq_len, limit=limit)
    sequences = pack_pairs(pairs, seq_len, seed)
    stats.sequences = len(sequences)
    stats.tokens = int(sum((s["segment_ids"] > 0).sum() for s in sequences))
    return SFTBuilder(sequences, seq_len, seed, stats, shuffle)
