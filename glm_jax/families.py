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
it is bidirectional, sop is the first decoded input), causal families start with what their
tokenizer puts first ([gMASK] sop for ChatGLM2/3 and GLM-4, LLaMA's <s>, OPT's </s>, nothing for
BLOOM) and their last id is the first decoded input. The other families of the survey (llama,
alpaca, belle, bloom, opt on a tokenizer.json, and the original GLM, glm-10b) are at the end
(docs/families.md).
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

    def instruction_query(self, instruction: str, input: str = "") -> str:
        """An instruction row's query (Alpaca-style data: instruction and optional input): the
        instruction, then the input on a new line."""
        return instruction + ("\n" + input if input.strip() else "")

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


# ---- the Hugging Face families (tokenizer kind "hf": a folder's tokenizer.json and sidecars) ----------
def lead_ids(tok: Tokenizer) -> list[int]:
    """The special ids a tokenizer's post-processor puts before a text (LLaMA's <s>, OPT's </s>,
    none for BLOOM)."""
    probe = tok.encode("a")
    full = tok.encode_with_specials("a")
    at = next((i for i in range(len(full) - len(probe) + 1) if full[i : i + len(probe)] == probe), 0)
    return full[:at]


def _hf_tokenizer(tok: Tokenizer, family: str) -> Tokenizer:
    if not hasattr(tok, "encode_with_specials"):
        raise FamilyError(f"the {family} family needs a tokenizer.json tokenizer (kind hf), not kind {tok.kind}")
    return tok


@dataclasses.dataclass(frozen=True)
class CausalHF(Family):
    """A Hugging Face causal LM (`opt`, `bloom`; the base of llama / alpaca / belle): a completion is
    transformers' `tokenizer(text)` (the post-processor's specials included), generation stops at
    the folder's stop ids (generation_config.json / config.json), answers end with eos.

    A chat is a list of rounds built from four pieces, so chat prompts, training examples and whole
    conversations agree: `start` (before the first round: the post-processor's lead ids and the
    system text), `query_ids` (a round up to where the reply begins), `reply_ids` (the learned
    reply and its end id) and `history_ids` (an earlier round inside a prompt: query + reply).
    OPT and BLOOM have no released chat format: their chat is BELLE's "Human: ...\\n\\nAssistant: "
    text, a system text as its own paragraph first."""

    name: str = "opt"
    tokenizer_kind: str = "hf"
    causal: bool = True
    prompt_tail: int = 0

    def stop_ids(self, tok):
        return tuple(_hf_tokenizer(tok, self.name).stop_ids)

    def end_id(self, tok):
        return tok.eos_id

    def prompt_ids(self, tok, text_ids, mask=None):
        """Tokenized text -> the post-processor's lead ids + text ([eos] for nothing at all, as
        lm-evaluation-harness starts a text without a bos)."""
        return lead_ids(_hf_tokenizer(tok, self.name)) + list(text_ids) or [tok.eos_id]

    def generation_prompt(self, tok, text):
        return _hf_tokenizer(tok, self.name).encode_with_specials(text)

    # ---- the pieces of a chat ---------------------------------------------------------------
    def start(self, tok: Tokenizer, system: str | None) -> list[int]:
        return lead_ids(_hf_tokenizer(tok, self.name)) + (tok.encode(system + "\n\n") if system else [])

    def query_ids(self, tok: Tokenizer, query: str, system: str | None = None) -> list[int]:
        """A round's prompt; `system` is given with the first round (families that put it there)."""
        return tok.encode(f"Human: {query}\n\nAssistant: ")

    def reply_ids(self, tok: Tokenizer, reply: str) -> list[int]:
        return tok.encode(reply) + [self.end_id(tok)]

    def history_ids(self, tok: Tokenizer, query: str, reply: str, system: str | None = None) -> list[int]:
        return self.query_ids(tok, query, system) + self.reply_ids(tok, reply)

    def chat_prompt(self, tok, history, query, system=None):
        ids = self.start(tok, system)
        for i, (q, a) in enumerate(history):
            ids += self.history_ids(tok, q, a, system if i == 0 else None)
        return ids + self.query_ids(tok, query, None if history else system)

    def training_example(self, tok, history, query, answer, system=None):
        prompt = self.chat_prompt(tok, history, query, system)
        target = self.reply_ids(tok, answer)
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    def conversation_example(self, tok, rounds, system=None):
        """Every reply learned in one sequence: each round as its query prompt, then the reply and
        its end id (learned), as the model saw and wrote them in the chat."""
        ids = self.start(tok, system)
        mask = [0] * len(ids)
        for i, (q, a) in enumerate(rounds):
            prompt, reply = self.query_ids(tok, q, system if i == 0 else None), self.reply_ids(tok, a)
            ids += prompt + reply
            mask += [0] * len(prompt) + [1] * len(reply)
        return ids, mask


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclasses.dataclass(frozen=True)
class Llama(CausalHF):
    """LLaMA: completions are plain continuations (<s> + text). Chat follows the tokenizer:
    LLaMA-3's header tokens when it has <|start_header_id|> (bos, then per message
    <|start_header_id|> role <|end_header_id|> "\\n\\n" content <|eot_id|>, ending with the
    assistant's header; replies end with <|eot_id|>, where generation also stops), else LLaMA-2
    chat's `<s>[INST] {query} [/INST] {reply} </s>` rounds, a system text as `<<SYS>>` inside the
    first query (Meta's chat_completion and transformers' chat templates build the same ids)."""

    name: str = "llama"

    @staticmethod
    def headers(tok: Tokenizer) -> tuple[int, int, int] | None:
        """(<|start_header_id|>, <|end_header_id|>, <|eot_id|>) of a LLaMA-3 tokenizer, else None."""
        got = tuple(_hf_tokenizer(tok, "llama").token_id(t) for t in HEADER_TOKENS)
        return None if None in got else got

    def stop_ids(self, tok):
        heads = self.headers(tok)
        return tuple(dict.fromkeys(super().stop_ids(tok) + ((heads[2],) if heads else ())))

    def end_id(self, tok):
        heads = self.headers(tok)
        return heads[2] if heads else tok.eos_id

    def message(self, tok: Tokenizer, role: str, content: str | None) -> list[int]:
        """LLaMA-3: a message's ids (content None: the header alone, where a reply begins)."""
        start, end, eot = self.headers(tok)
        header = [start] + tok.encode(role) + [end] + tok.encode("\n\n")
        return header if content is None else header + tok.encode(content.strip()) + [eot]

    def start(self, tok, system):
        if self.headers(tok) is None:
            return []  # LLaMA-2: every round starts with its own <s>
        return [_bos(tok, self.name)] + (self.message(tok, "system", system) if system else [])

    @staticmethod
    def _inst(query: str, system: str | None) -> str:
        content = f"{B_SYS}{system}{E_SYS}{query}" if system else query
        return f"{B_INST} {content.strip()} {E_INST}"

    def query_ids(self, tok, query, system=None):
        if self.headers(tok) is None:
            return [_bos(tok, self.name)] + tok.encode(self._inst(query, system))
        return self.message(tok, "user", query) + self.message(tok, "assistant", None)

    def reply_ids(self, tok, reply):
        return tok.encode(reply.strip()) + [self.end_id(tok)]

    def history_ids(self, tok, query, reply, system=None):
        if self.headers(tok) is None:  # Meta's reference encodes a past round as one text
            return [_bos(tok, self.name)] + tok.encode(f"{self._inst(query, system)} {reply.strip()} ") + [tok.eos_id]
        return super().history_ids(tok, query, reply, system)


HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _bos(tok: Tokenizer, family: str) -> int:
    bos = getattr(tok, "bos_id", None)
    if bos is None:
        raise FamilyError(f"the {family} family's prompts start with a bos token; {tok.model_file} has none")
    return bos


ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
INPUT_BLOCK = "\n\n### Input:\n"  # between an instruction and its input (the with-input template)
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


@dataclasses.dataclass(frozen=True)
class Alpaca(CausalHF):
    """Alpaca (Stanford Alpaca, Alpaca-LoRA) on LLaMA: `tokenizer(preamble + "### Instruction:\\n
    {instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:")`; a training example is the
    tokenized prompt + answer + eos with the prompt's ids unlearned (stanford_alpaca's train.py).
    A system text replaces the preamble. Alpaca is single-turn: earlier rounds are written as
    Instruction/Response blocks before the query, and a conversation trains its last reply."""

    name: str = "alpaca"

    @staticmethod
    def prompt_text(query: str, history=(), system: str | None = None) -> str:
        """query: an instruction, or `instruction_query`'s instruction with its Input block."""
        preamble = system.rstrip("\n") + "\n\n" if system else (ALPACA_INPUT if INPUT_BLOCK in query else ALPACA)
        blocks = "".join(f"### Instruction:\n{q}\n\n### Response:{a}\n\n" for q, a in history)
        return f"{preamble}{blocks}### Instruction:\n{query}\n\n### Response:"

    def instruction_query(self, instruction: str, input: str = "") -> str:
        """Alpaca's with-input template: the input as its own block after the instruction."""
        return instruction + (INPUT_BLOCK + input if input.strip() else "")

    def instruction_prompt(self, tok: Tokenizer, instruction: str, input: str = "") -> list[int]:
        """An Alpaca row (instruction, optional input) -> its prompt ids."""
        query = self.instruction_query(instruction, input)
        return _hf_tokenizer(tok, self.name).encode_with_specials(self.prompt_text(query))

    def chat_prompt(self, tok, history, query, system=None):
        return _hf_tokenizer(tok, self.name).encode_with_specials(self.prompt_text(query, history, system))

    def training_example(self, tok, history, query, answer, system=None):
        text = self.prompt_text(query, history, system)
        prompt = len(_hf_tokenizer(tok, self.name).encode_with_specials(text))
        ids = tok.encode_with_specials(text + answer) + [tok.eos_id]
        return ids, [0] * prompt + [1] * (len(ids) - prompt)

    def conversation_example(self, tok, rounds, system=None):
        return self.training_example(tok, rounds[:-1], *rounds[-1], system)


@dataclasses.dataclass(frozen=True)
class Belle(CausalHF):
    """BELLE (on BLOOMZ and LLaMA): bos + "Human: {query}\\n\\nAssistant: " (BELLE's README and
    generate.py), each reply followed by eos (its training code); a system text as a paragraph
    after the bos."""

    name: str = "belle"

    def start(self, tok, system):
        return [_bos(tok, self.name)] + (tok.encode(system + "\n\n") if system else [])


@dataclasses.dataclass(frozen=True)
class GLM10B(Family):
    """The original GLM (GLM-Large, GLM-10B of THUDM/GLM): a prefix LM on its GPT-2 tokenizer with
    [CLS] first. A completion is its HF tokenizer's `[CLS] text <|endoftext|>` with the blanks
    ([MASK] / [sMASK] / [gMASK] in the text; [gMASK] appended when there is none) and
    <|startofpiece|> after it (build_inputs_for_generation); the blank is generated until
    <|endofpiece|>. Chat and fine-tuning rows are THUDM/GLM's seq2seq layout
    `[CLS] source [gMASK] <|startofpiece|> target <|endofpiece|>`, the source in the
    "Human: ...\\n\\nAssistant:" text (GLM has no chat format), a system text as a paragraph first."""

    name: str = "glm-10b"
    tokenizer_kind: str = "hf"

    @staticmethod
    def cls(tok: Tokenizer) -> int:
        if getattr(tok, "cls_id", None) is None or not getattr(tok, "has_blanks", False):
            raise FamilyError(
                f"glm-10b needs THUDM/GLM's tokenizer ([CLS], [MASK], [gMASK], [sMASK], <|startofpiece|>, "
                f"<|endofpiece|>); {tok.model_file} lacks some"
            )
        return tok.cls_id

    def prompt_ids(self, tok, text_ids, mask=None):
        return [self.cls(tok)] + super().prompt_ids(tok, text_ids, mask)

    def generation_prompt(self, tok, text):
        ids = super().generation_prompt(tok, text)[:-1]  # the text with its blanks, without sop
        return [self.cls(tok)] + ids + [tok.eos_id, tok.sop_id]

    def chat_text(self, history, query):
        return "".join(f"Human: {q}\n\nAssistant: {a}\n\n" for q, a in history) + f"Human: {query}\n\nAssistant:"

    def chat_prompt(self, tok, history, query, system=None):
        """A system text is a paragraph before the first round."""
        text = (system + "\n\n" if system else "") + self.chat_text(history, query)
        return self.prompt_ids(tok, tok.encode(text))


FAMILIES = {
    f.name: f
    for f in (
        Family(),
        GLM130B(),
        ChatGLM6B(),
        ChatGLM2(),
        ChatGLM3(),
        GLM4(),
        Llama(),
        Alpaca(),
        Belle(),
        CausalHF(name="bloom"),
        CausalHF(name="opt"),
        GLM10B(),
    )
}


def get_family(name: str) -> Family:
    """The family `name`: glm (ours), glm-130b, chatglm-6b, chatglm2-6b, chatglm3-6b, glm-4, and the
    Hugging Face ones (tokenizer kind hf): llama, alpaca, belle, bloom, opt, glm-10b."""
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
