"""Model families: what a released model's own code does around the network.

A family fixes the tokenizer kind, the prompt and chat builders, the attention rule (GLM's
bidirectional prefix or a causal decoder), the stop tokens and the reply post-processing:

    fam = get_family("chatglm2-6b")
    tok = fam.load_tokenizer(path)
    ids = fam.chat_prompt(tok, [("你好", "你好！")], "介绍一下你自己")    # what ChatGLM2 feeds its model
    ids, loss_mask = fam.training_example(tok, history, query, answer)  # fine-tuning rows
    reply = fam.postprocess(tok.decode(generated))

Every prompt is returned as the model-ready ids the released code feeds
(docs/reference.md#3-special-tokens-and-positions): prefix families end with sop (the context before
it is bidirectional, sop is the first decoded input), causal families start with [gMASK] sop and
their last id is the first decoded input.
`training_example` gives (ids, loss_mask) with loss_mask[j] = 1 where ids[j] is learned (predicted
from position j - 1): the answer and its end token.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from glm_jax.tokenizer import SpecialIds, Tokenizer, load_tokenizer

History = Sequence[tuple[str, str]]


def default_stop_ids(ids: SpecialIds) -> tuple[int, ...]:
    """Our family's stop ids (eop, eos) from a tokenizer's special ids: where generation ends when
    the caller names no family (`Family.stop_ids`, `generate.Generator`, the serving engine)."""
    return (ids.eop, ids.eos)


class FamilyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Family:
    """Ours (`glm`): a prefix LM with ChatGLM-6B's `[Round i]` chat text (from round 0, also on the
    first turn) on our tokenizer's ids. Subclasses are the released families."""

    name: str = "glm"
    tokenizer_kind: str = "glm"
    causal: bool = False  # a causal decoder: no bidirectional part anywhere
    append_eos: bool = False  # GLM-130B's generate.py: eos after a context that ends in text
    prompt_tail: int = 2  # special ids that end a chat prompt ([gMASK] sop), kept when it is cut

    def load_tokenizer(self, model_file: str | None = None) -> Tokenizer:
        return load_tokenizer(self.tokenizer_kind, model_file)

    def stop_ids(self, tok: Tokenizer) -> tuple[int, ...]:
        """Generation ends at the first of these."""
        return default_stop_ids(tok.specials)

    def end_id(self, tok: Tokenizer) -> int:
        """The id that ends an answer in training data."""
        return tok.eop_id

    # ---- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, tok: Tokenizer, text_ids: Sequence[int], mask: int | None = None) -> list[int]:
        """Tokenized text -> the model-ready prompt: text + mask ([gMASK] unless `mask`) + sop for a
        prefix family, [gMASK] sop + text for a causal one (`mask` is then ignored)."""
        if self.causal:
            return [tok.gmask_id, tok.sop_id] + list(text_ids)
        return list(text_ids) + [tok.gmask_id if mask is None else mask, tok.sop_id]

    def generation_prompt(self, tok: Tokenizer, text: str) -> list[int]:
        """A completion prompt. Prefix families read literal [MASK] / [sMASK] / [gMASK] in the text
        as blanks (GLM-130B's generate.py; the first blank is the one generated); without one the
        text is continued after [gMASK]."""
        if self.causal:
            return self.prompt_ids(tok, tok.encode(text))
        parts = re.split(r"(\[[sg]?MASK\])", text)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append({"[MASK]": tok.mask_id, "[sMASK]": tok.smask_id, "[gMASK]": tok.gmask_id}[part])
            elif part:
                ids += tok.encode(part)
        if len(parts) == 1:
            ids.append(tok.gmask_id)
        elif self.append_eos and not text.endswith("MASK]"):
            ids.append(tok.eos_id)
        return ids + [tok.sop_id]

    def chat_text(self, history: History, query: str) -> str:
        return (
            "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            + f"[Round {len(history)}]\n问：{query}\n答："
        )

    def chat_prompt(self, tok: Tokenizer, history: History, query: str, system: str | None = None) -> list[int]:
        """The prompt of one chat turn; history: (query, reply) pairs of earlier rounds, replies
        post-processed. A system text is put before the query (as THUDM's API servers do)."""
        if system:
            query = system + query
        return self.prompt_ids(tok, tok.encode(self.chat_text(history, query)))

    def training_example(
        self, tok: Tokenizer, history: History, query: str, answer: str, system: str | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of one supervised example: the chat prompt, then answer + end id, of
        which only the answer and the end id are learned."""
        prompt = self.chat_prompt(tok, history, query, system)
        target = tok.encode(answer) + [self.end_id(tok)]
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    def conversation_examples(
        self, tok: Tokenizer, rounds: History, system: str | None = None, last_only: bool = False
    ) -> list[tuple[list[int], list[int]]]:
        """(ids, loss_mask) samples that train every reply of a conversation (`rounds`: (query,
        reply) pairs; the system text goes before the first query). A prefix LM makes one sample
        per reply, its history and query as part A; a causal family one sequence with every
        reply learned (`conversation_example`). last_only: only the last reply (ChatGLM2's script).
        The system text goes where `chat_prompt` puts it, so training prompts are the chat's."""
        if self.causal and not last_only and len(rounds) > 1:
            return [self.conversation_example(tok, rounds, system)]
        first = len(rounds) - 1 if last_only else 0
        return [self.training_example(tok, rounds[:i], *rounds[i], system) for i in range(first, len(rounds))]

    def conversation_example(
        self, tok: Tokenizer, rounds: History, system: str | None = None
    ) -> tuple[list[int], list[int]]:
        raise FamilyError(f"{self.name} is a prefix LM: it trains one sample per reply (conversation_examples)")

    def fit_chat(
        self, tok: Tokenizer, history: History, query: str, limit: int, system: str | None = None
    ) -> tuple[list[int], int]:
        """The chat prompt with the oldest rounds dropped until it is at most `limit` ids.
        -> (ids, number of rounds dropped). A clear error if the query alone does not fit."""
        history = list(history)
        for dropped in range(len(history) + 1):
            ids = self.chat_prompt(tok, history[dropped:], query, system)
            if len(ids) <= limit:
                return ids, dropped
        raise FamilyError(
            f"the query alone is a prompt of {len(ids)} tokens; at most {limit} fit "
            "(max_sequence_length minus the generation budget)"
        )

    def postprocess(self, reply: str) -> str:
        return reply.strip()


_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


@dataclasses.dataclass(frozen=True)
class GLM130B(Family):
    """GLM-130B: icetk ids, [gMASK]/[MASK] prompts with its generate.py rules (eos after a context
    that does not end in a blank). Its chat is ours: the base model has no chat format."""

    name: str = "glm-130b"
    tokenizer_kind: str = "glm-130b"
    append_eos: bool = True


@dataclasses.dataclass(frozen=True)
class ChatGLM6B(Family):
    """ChatGLM-6B: text + [gMASK] <sop>; the first chat turn is the bare query."""

    name: str = "chatglm-6b"
    tokenizer_kind: str = "chatglm-6b"

    def stop_ids(self, tok):
        return (tok.eop_id,)

    def generation_prompt(self, tok, text):
        return self.prompt_ids(tok, tok.encode(text))

    def chat_text(self, history, query):
        return super().chat_text(history, query) if history else query

    def postprocess(self, reply):
        reply = reply.strip().replace("[[训练时间]]", "2023年")
        for ascii_, full in _PUNCTUATION:
            reply = re.sub(rf"([\u4e00-\u9fff]){ascii_}", rf"\g<1>{full}", reply)
            reply = re.sub(rf"{ascii_}([\u4e00-\u9fff])", rf"{full}\g<1>", reply)
        return reply


@dataclasses.dataclass(frozen=True)
class ChatGLM2(Family):
    """ChatGLM2-6B: a causal decoder; [gMASK] sop + text; `[Round i]` chat from round 1."""

    name: str = "chatglm2-6b"
    tokenizer_kind: str = "chatglm2-6b"
    causal: bool = True
    prompt_tail: int = 0

    def stop_ids(self, tok):
        return (tok.eos_id,)

    def end_id(self, tok):
        return tok.eos_id

    def chat_text(self, history, query):
        return (
            "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
            + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        )

    def conversation_example(self, tok, rounds, system=None):
        """The whole chat in one sequence, each reply learned (the last one with eos; the
        separator after an earlier reply is context, since at inference a reply ends with eos).
        A system text goes before the first query."""
        ids, mask = [tok.gmask_id, tok.sop_id], [0, 0]
        rounds = [(system + q if system and i == 0 else q, a) for i, (q, a) in enumerate(rounds)]
        for i, (q, a) in enumerate(rounds, start=1):
            context = tok.encode(f"[Round {i}]\n\n问：{q}\n\n答：")
            reply = tok.encode(a) + ([tok.eos_id] if i == len(rounds) else [])
            sep = [] if i == len(rounds) else tok.encode("\n\n")
            ids += context + reply + sep
            mask += [0] * len(context) + [1] * len(reply) + [0] * len(sep)
        return ids, mask

    def postprocess(self, reply):
        return reply.strip().replace("[[训练时间]]", "2023年")


@dataclasses.dataclass(frozen=True)
class ChatGLM3(ChatGLM2):
    """ChatGLM3-6B: role tokens; each message is role id + encode(metadata + "\\n") + encode(text);
    the prompt ends with <|assistant|>; generation also stops at <|user|> and <|observation|>."""

    name: str = "chatglm3-6b"
    tokenizer_kind: str = "chatglm3-6b"
    prompt_tail: int = 1  # <|assistant|>

    def stop_ids(self, tok):
        return (tok.eos_id, tok.user_id, tok.observation_id)

    @staticmethod
    def message(tok: Tokenizer, role: str, content: str, metadata: str = "") -> list[int]:
        return [tok.specials.role(role)] + tok.encode(metadata + "\n") + tok.encode(content)

    def chat_prompt(self, tok, history, query, system=None):
        ids = [tok.gmask_id, tok.sop_id]
        if system:
            ids += self.message(tok, "system", system)
        for q, a in history:
            ids += self.message(tok, "user", q) + self.message(tok, "assistant", a)
        return ids + self.message(tok, "user", query) + [tok.assistant_id]

    def training_example(self, tok, history, query, answer, system=None):
        prompt = self.chat_prompt(tok, history, query, system)
        target = tok.encode("\n") + tok.encode(answer) + [tok.eos_id]
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    def conversation_example(self, tok, rounds, system=None):
        """ChatGLM3's finetune_demo: each assistant message ("\n" + reply) is learned together with
        the id after it: the next <|user|> (where generation stops) or the final eos. A system
        text is a <|system|> message first, as in `chat_prompt`."""
        ids = [tok.gmask_id, tok.sop_id] + (self.message(tok, "system", system) if system else [])
        mask = [0] * len(ids)
        for i, (q, a) in enumerate(rounds):
            user = self.message(tok, "user", q) + [tok.assistant_id]
            reply = tok.encode("\n") + tok.encode(a)
            ids += user + reply
            mask += [int(i > 0)] + [0] * (len(user) - 1) + [1] * len(reply)  # <|user|> after a reply is learned
        return ids + [tok.eos_id], mask + [1]

    def postprocess(self, reply):
        """The reply's first line is its metadata (empty for a plain answer, a tool name for a call)."""
        metadata, _, content = reply.partition("\n") if "\n" in reply else ("", "", reply)
        if not metadata.strip():
            content = content.strip()
        return content.replace("[[训练时间]]", "2023年")


@dataclasses.dataclass(frozen=True)
class GLM4(ChatGLM3):
    """GLM-4 (transformers' GlmForCausalLM): ChatGLM3's message format and stops on GLM-4's
    tokenizer (its tokenizer.json comes with --tokenizer)."""

    name: str = "glm-4"
    tokenizer_kind: str = "glm-4"


FAMILIES = {f.name: f for f in (Family(), GLM130B(), ChatGLM6B(), ChatGLM2(), ChatGLM3(), GLM4())}


def get_family(name: str) -> Family:
    """The family `name`: glm (ours), glm-130b, chatglm-6b, chatglm2-6b, chatglm3-6b, glm-4."""
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
