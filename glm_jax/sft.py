"""Supervised fine-tuning data: instruction and dialogue files -> packed training sequences.

Formats, detected from each row's keys (JSON lines, or one JSON array as Alpaca files are):

    advertisegen  {"content", "summary"}
    alpaca        {"instruction", "input", "output", "system"?, "history"?: [[q, a], ...]}
                                        (query: instruction + "\\n" + input; the alpaca family's own
                                         with-input template: `Family.instruction_query`)
    chatglm2      {"prompt", "response", "history": [[q, a], ...]}
    chatglm3      {"conversations": [{"role": "system"|"user"|"assistant", "content"}, ...]}
    sharegpt      {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
    openai        {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}

Each row becomes (query, reply) rounds, then samples through the family's
`conversation_examples` (families.py: one definition of each prompt format): the loss covers the
replies and their end ids only, every reply of a conversation is trained unless `last_only`.
A prompt over `max_source` ids first drops its oldest history rounds, as a chat turn is fitted at
inference, so the current query stays; what is still over-long is cut as the reference scripts cut
it (the prompt keeps its first `max_source` ids and its final specials, the reply its first
`max_target` ids and its end id) and counted; a causal conversation that does not fit `seq_len`
drops its oldest rounds. Bad rows (broken
JSON, missing or mistyped fields, an empty reply) are skipped and counted.

Samples are packed into `seq_len` sequences isolated by segment ids (first fit, in a seeded
order); `SFTBuilder.build(index)` is a pure function of (seed, index), like the pre-training
builder, so `data.DataIterator` and checkpoint resume work unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Sequence

import numpy as np

from glm_jax.data import DataError, ReadStats, read_records
from glm_jax.families import Family
from glm_jax.objectives import pack
from glm_jax.tokenizer import Tokenizer

FORMATS = {
    "openai": ("messages",),
    "chatglm3": ("conversations",),  # or sharegpt, told apart by its messages' keys
    "chatglm2": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "advertisegen": ("content", "summary"),
}


class BadRow(ValueError):
    """A row that cannot be used; the message is the counter it goes to."""


@dataclasses.dataclass
class SFTStats:
    """What reading and building the data kept, cut and skipped."""

    rows: int = 0
    samples: int = 0
    bad_json: int = 0
    missing_fields: int = 0
    empty_reply: int = 0
    too_long: int = 0
    cut_source: int = 0
    cut_target: int = 0
    dropped_rounds: int = 0
    formats: dict = dataclasses.field(default_factory=dict)
    mixed: dict = dataclasses.field(default_factory=dict)  # replayed samples by --mix file
    tokens: int = 0  # real tokens in the packed sequences
    sequences: int = 0
    seq_len: int = 0

    @property
    def skipped(self) -> int:
        return self.bad_json + self.missing_fields + self.empty_reply + self.too_long

    @property
    def padding_fraction(self) -> float:
        """Padding share of the packed sequences."""
        return 1.0 - self.tokens / max(1, self.sequences * self.seq_len)

    @property
    def reference_padding_fraction(self) -> float:
        """Padding share if every sample were padded to seq_len alone, as the reference scripts
        pad every example to max_source + max_target."""
        return 1.0 - self.tokens / max(1, self.samples * self.seq_len)

    def summary(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {
            "skipped": self.skipped,
            "padding_fraction": round(self.padding_fraction, 4),
            "reference_padding_fraction": round(self.reference_padding_fraction, 4),
        }


# ---- rows -> conversations -----------------------------------------------------------------------
def read_rows(path: str, stats: SFTStats) -> Iterator[dict]:
    """The JSON objects of a file: one JSON array, or JSON lines (plain or gzip)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{path} starts like a JSON array but does not parse ({e}); write one JSON "
                "object per line to have bad rows skipped instead"
            ) from None
        for row in rows:
            stats.rows += 1
            if isinstance(row, dict):
                yield row
            else:
                stats.bad_json += 1
        return
    lines = ReadStats()
    for row in read_records(path, lines):
        stats.rows += 1
        yield row
    stats.rows += lines.bad_json + lines.bad_utf8
    stats.bad_json += lines.bad_json + lines.bad_utf8


def detect_format(row: dict) -> str:
    for name, keys in FORMATS.items():
        if all(k in row for k in keys):
            if name == "chatglm3" and _first_message_has(row["conversations"], "from"):
                return "sharegpt"
            return name
    raise BadRow("missing_fields")


def _first_message_has(messages, key: str) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict) and key in messages[0]


# a message format: (role key, content key, its role names -> system / user / assistant)
MESSAGES = {
    "chatglm3": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "openai": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}


def history_rounds(row: dict) -> list[tuple[str, str]]:
    """A row's `history`: [[query, reply], ...] (absent: none)."""
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise BadRow("missing_fields")
    return [(text_field(q), text_field(a)) for q, a in history]


def _messages(messages, fmt: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A list of messages -> (system text or None, (query, reply) rounds): an optional system
    message first, then user and assistant messages in turn."""
    system, rounds, _ = message_rounds(messages, *MESSAGES[fmt])
    if not rounds:
        raise BadRow("missing_fields")
    return system, rounds


def message_rounds(messages, role_key: str, content_key: str, roles: dict) -> tuple[str | None, list, str | None]:
    """Messages (an optional system message first, then user and assistant in turn; `roles` maps
    their role names to system / user / assistant) -> (system text or None, (query, reply) rounds,
    a last query no reply follows, or None). Raises BadRow for anything else."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRow("missing_fields")
    system, rounds, query = None, [], None
    for i, m in enumerate(messages):
        role, content = roles.get(m.get(role_key)), text_field(m.get(content_key))
        if role == "system" and i == 0:
            system = content
        elif role == "user" and query is None:
            query = content
        elif role == "assistant" and query is not None:
            rounds.append((query, content))
            query = None
        else:  # two users in a row, a reply without a query, an unknown role
            raise BadRow("missing_fields")
    return system, rounds, query


def text_field(x) -> str:
    if not isinstance(x, str):
        raise BadRow("missing_fields")
    return x


def conversation(row: dict, family: Family = Family()) -> tuple[str | None, list[tuple[str, str]], str]:
    """row -> (system text or None, (query, reply) rounds, format). Raises BadRow. An instruction
    row's query is `family.instruction_query(instruction, input)` (default: input on a new line)."""
    fmt = detect_format(row)
    system = None
    if fmt == "advertisegen":
        rounds = [(text_field(row["content"]), text_field(row["summary"]))]
    elif fmt == "alpaca":
        extra, instruction = text_field(row.get("input") or ""), text_field(row["instruction"])
        query = family.instruction_query(instruction, extra)
        rounds = history_rounds(row) + [(query, text_field(row["output"]))]
        system = text_field(row["system"]) if row.get("system") else None
    elif fmt == "chatglm2":
        rounds = history_rounds(row) + [(text_field(row["prompt"]), text_field(row["response"]))]
    else:
        system, rounds = _messages(row["messages" if fmt == "openai" else "conversations"], fmt)
    if any(not a.strip() for _, a in rounds):
        raise BadRow("empty_reply")
    return system, rounds, fmt


# ---- conversations -> samples ----------------------------------------------------------------------
def cut_prompt(prompt: list[int], family: Family, max_source: int) -> list[int]:
    """A chat prompt cut as the reference cuts its source: its first max_source ids, keeping the
    family's `prompt_tail` final specials."""
    if len(prompt) <= max_source:
        return prompt
    tail = family.prompt_tail
    return prompt[: max_source - tail] + (prompt[len(prompt) - tail :] if tail else [])


def cut(
    ids: list[int], mask: list[int], family: Family, max_source: int, max_target: int
) -> tuple[list[int], list[int], bool, bool]:
    """The reference's truncation of a one-reply sample: the prompt (ids before the first learned
    id) by `cut_prompt`; the reply keeps its first max_target ids and its end id.
    -> (ids, mask, source cut, target cut)."""
    first = mask.index(1)
    prompt, target = ids[:first], ids[first:]
    cut_s, cut_t = len(prompt) > max_source, len(target) - 1 > max_target
    prompt = cut_prompt(prompt, family, max_source)
    if cut_t:
        target = target[:max_target] + target[-1:]
    return prompt + target, [0] * len(prompt) + [1] * len(target), cut_s, cut_t


def to_sample(
    ids: Sequence[int], mask: Sequence[int], family: Family, tok: Tokenizer, two_d: bool
) -> dict[str, np.ndarray]:
    """(ids, loss_mask) -> one unpacked sample of the batch contract (inputs ids[:-1], targets
    ids[1:]). Prefix LM: part A is the prompt up to sop (bidirectional); 1D positions count on,
    2D part B sits at the [gMASK] position with block positions 1, 2, ... (docs/reference.md section 3)."""
    ids = np.asarray(ids, np.int32)
    n = len(ids) - 1
    out = dict(
        tokens=ids[:-1],
        targets=ids[1:],
        loss_mask=np.asarray(mask[1:], np.int32),
        position_ids=np.arange(n, dtype=np.int32),
        block_position_ids=np.zeros(n, np.int32),
        prefix_mask=np.zeros(n, np.int32),
    )
    if not family.causal:
        sop = int(np.nonzero(ids == tok.sop_id)[0][0])
        out["prefix_mask"][:sop] = 1
        if two_d:
            out["position_ids"][sop:] = sop - 1
            out["block_position_ids"][sop:] = np.arange(1, n - sop + 1)
    return out


def build_samples(
    paths: Sequence[str],
    family: Family,
    tok: Tokenizer,
    two_d: bool,
    max_source: int,
    max_target: int,
    seq_len: int,
    last_only: bool = False,
    stats: SFTStats | None = None,
    limit: int | None = None,
) -> tuple[list[dict], SFTStats]:
    """Every usable row of the files -> unpacked samples (at most `limit` rows), and the counts."""
    stats = stats or SFTStats(seq_len=seq_len)
    samples = []
    formats = collections.Counter()
    for path in paths:
        for row in read_rows(path, stats):
            if limit is not None and stats.rows > limit:
                stats.rows -= 1
                break
            try:
                system, rounds, fmt = conversation(row, family)
            except BadRow as e:
                setattr(stats, str(e), getattr(stats, str(e)) + 1)
                continue
            formats[fmt] += 1
            made = _examples(family, tok, system, rounds, max_source, max_target, seq_len, last_only, stats)
            samples += [to_sample(ids, mask, family, tok, two_d) for ids, mask in made]
    stats.formats = dict(formats)
    stats.samples = len(samples)
    if not samples:
        raise DataError(f"no usable rows in {list(paths)}: {stats.summary()}")
    return samples, stats


def _examples(family, tok, system, rounds, max_source, max_target, seq_len, last_only, stats):
    if family.causal and not last_only and len(rounds) > 1:
        for dropped in range(len(rounds) - 1):
            ((ids, mask),) = family.conversation_examples(tok, rounds[dropped:], system)
            if len(ids) - 1 <= seq_len:
                stats.dropped_rounds += dropped
                return [(ids, mask)]
        stats.dropped_rounds += len(rounds) - 1
        rounds = rounds[-1:]  # the last round alone, cut like any single reply
    made = []
    for i in range(len(rounds) - 1 if last_only else 0, len(rounds)):  # a sample per reply
        ids, mask, dropped = fitted_example(family, tok, rounds[:i], *rounds[i], system, max_source)
        stats.dropped_rounds += dropped
        ids, mask, cut_s, cut_t = cut(ids, mask, family, max_source, max_target)
        stats.cut_source += cut_s
        stats.cut_target += cut_t
        if len(ids) - 1 > seq_len:
            stats.too_long += 1
            continue
        made.append((ids, mask))
    return made


def fitted_example(family, tok, history, query, reply, system, max_source):
    """`Family.training_example` with the oldest history rounds dropped until its prompt has at
    most max_source ids, as a chat turn is fitted at inference (`Family.fit_chat`): the current
    query stays; only a query too long alone is cut afterwards (`cut`). -> (ids, mask, rounds dropped)."""
    for dropped in range(len(history) + 1):
        ids, mask = family.training_example(tok, history[dropped:], query, reply, system)
        if mask.index(1) <= max_source or dropped == len(history):
            return ids, mask, dropped


def mixed_samples(mix, task_samples: int, family, tok, two_d, max_source, max_target, seq_len, seed, stats):
    """Samples of general data to replay during task fine-tuning (the usual answer to "after
    P-tuning it only talks about ads"): for each (file, share), share x total samples, where
    total = task_samples / (1 - sum of shares); counted in `stats.mixed`."""
    shares = [share for _, share in mix]
    if any(not 0 < share < 1 for share in shares) or sum(shares) >= 1:
        raise DataError(f"--mix shares {shares} must each be in (0, 1) and sum to less than 1")
    total, out = task_samples / (1 - sum(shares)), []
    for k, (path, share) in enumerate(mix):
        pool, _ = build_samples([path], family, tok, two_d, max_source, max_target, seq_len)
        want = round(share * total)
        order = np.concatenate(
            [np.random.default_rng([seed, k, rep]).permutation(len(pool)) for rep in range(-(-want // len(pool)))]
        )
        out += [pool[i] for i in order[:want]]
        stats.mixed[path] = want
    return out


def shuffled_index(seed: int, index: int, n: int) -> int:
    """Item `index` of an endless stream over n items in a fresh seeded order per pass (epoch):
    a pure function of (seed, index)."""
    epoch, at = divmod(index, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[at])


def pack_samples(samples: Sequence[dict], seq_len: int, seed: int) -> list[dict[str, np.ndarray]]:
    """First-fit packing in a seeded order -> sequences of the batch contract."""
    return pack_units([[sample] for sample in samples], seq_len, np.random.default_rng([seed, 0x5F7]))


def pack_units(units: Sequence[Sequence[dict]], seq_len: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """First-fit packing of units (samples that stay together in one sequence, in order: a
    preference pair's two answers) in the order `rng` draws -> sequences of the batch contract."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for i in rng.permutation(len(units)):
        n = sum(len(sample["tokens"]) for sample in units[i])
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([])
            room.append(seq_len)
            j = len(bins) - 1
        bins[j] += units[i]
        room[j] -= n
    return [pack(b, seq_len) for b in bins]


@dataclasses.dataclass
class SFTBuilder:
    """Packed SFT sequences in the pre-training builder's interface (`build(index)`, `seed`,
    `seq_len`). Training (shuffle): sequence `index` is the packed sequences in a fresh seeded
    order per epoch. Held-out (shuffle False): the sequences in order, then empty padding, so a
    fixed number of batches covers each exactly once."""

    sequences: list[dict]
    seq_len: int
    seed: int
    stats: SFTStats
    shuffle: bool = True

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str],
        family: Family,
        tok: Tokenizer,
        two_d: bool,
        seq_len: int,
        max_source: int,
        max_target: int,
        seed: int = 0,
        last_only: bool = False,
        shuffle: bool = True,
        limit: int | None = None,
        mix: Sequence[tuple[str, float]] = (),
    ) -> SFTBuilder:
        """mix: (file, share) pairs: general instruction data replayed beside the task's, `share`
        of the training samples from each file (drawn seeded, repeated if the file is short)."""
        samples, stats = build_samples(
            paths, family, tok, two_d, max_source, max_target, seq_len, last_only, limit=limit
        )
        samples += mixed_samples(mix, len(samples), family, tok, two_d, max_source, max_target, seq_len, seed, stats)
        stats.samples = len(samples)  # with the replayed ones
        sequences = pack_samples(samples, seq_len, seed)
        stats.sequences = len(sequences)
        stats.tokens = int(sum((s["segment_ids"] > 0).sum() for s in sequences))
        return cls(sequences, seq_len, seed, stats, shuffle)

    def __len__(self) -> int:
        return len(self.sequences)

    def build(self, index: int) -> dict[str, np.ndarray]:
        n = len(self.sequences)
        if not self.shuffle:
            if index < n:
                return self.sequences[index]
            return {k: np.zeros_like(v) for k, v in self.sequences[0].items()}  # padding, with any extra fields
        return self.sequences[shuffled_index(self.seed, index, n)]

    def batches_to_cover(self, batch: int) -> int:
        return -(-len(self.sequences) // batch)
