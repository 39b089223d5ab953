"""Tiny stand-ins for the released tokenizers of LLaMA-2, LLaMA-3, BLOOM, OPT and the original
GLM (none is available offline): a BPE trained with `tokenizers` on a few English and Chinese
lines, each style's special tokens at its released positions (the chat templates' too), its
pre-tokenizer, post-processor and decoder, and the sidecar files a released folder carries.

    path = write_tokenizer(folder, "llama2")    # folder/tokenizer.json + sidecars -> the json's path
    hf = AutoTokenizer.from_pretrained(folder)   # loads it as the released model's folder does

Styles (special ids, what the post-processor adds around a text's ids):
- llama2: <unk> 0, <s> 1, </s> 2; SentencePiece-like Metaspace pieces; <s> prepended;
  LLaMA-2 chat's template (`[INST]` text needs no special token).
- llama3: byte-level BPE with LLaMA-3's split regex; <|begin_of_text|> <|end_of_text|>
  <|start_header_id|> <|end_header_id|> <|eot_id|> after the vocabulary; <|begin_of_text|>
  prepended; LLaMA-3-Instruct's sidecars (eos <|eot_id|>; generation_config stops at both ends).
- bloom: byte-level; <unk> 0, <s> 1, </s> 2, <pad> 3; nothing added.
- opt: GPT-2 byte-level; <s> 0, <pad> 1, </s> 2, <unk> 3; </s> prepended (OPT's bos is </s>).
- glm: GLM-10B's GPT-2 byte-level tokenizer: <|endoftext|>, then [CLS] [MASK] [gMASK] [sMASK]
  <|startofpiece|> <|endofpiece|> after the vocabulary; `[CLS] text <|endoftext|>`
  (GLMGPT2Tokenizer.build_inputs_with_special_tokens).

`tokenizer_config.json` names `PreTrainedTokenizerFast`, so transformers uses the tokenizer.json as
written (its model-specific classes would rebuild the pipeline from their own defaults).
"""

from __future__ import annotations

import functools
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

STYLES = ("llama2", "llama3", "bloom", "opt", "glm")

TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\nName three colors.\n\n### Input:\nred\n\n### Response:\nRed, green and blue.",
    "Human: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help?",
    "system user assistant Tsinghua University is located in Beijing, China.",
    "The model generates text one token at a time, 1 2 3 4 5 6 7 8 9 10.",
    "你好，世界！清华大学位于北京。今天天气很好，我们去公园散步吧。",
    "请介绍一下你自己。我是一个人工智能助手，可以回答问题。",
]

# transformers' chat templates of the released models (tokenizer_config.json `chat_template`)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# style -> (specials trained first, at ids 0.., specials added after the vocabulary)
SPECIALS = {
    "llama2": (["<unk>", "<s>", "</s>"], []),
    "llama3": ([], ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "bloom": (["<unk>", "<s>", "</s>", "<pad>"], []),
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], []),
    "glm": (
        [],
        ["<|endoftext|>", "[CLS]", "[MASK]", "[gMASK]", "[sMASK]", "<|startofpiece|>", "<|endofpiece|>"],
    ),
}
# style -> (tokenizer_config.json fields, generation_config.json fields by token name)
SIDECARS = {
    "llama2": (
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None, chat_template=LLAMA2_CHAT_TEMPLATE),
        dict(bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<unk>"),
    ),
    "llama3": (
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE),
        dict(bos_token_id="<|begin_of_text|>", eos_token_id=["<|end_of_text|>", "<|eot_id|>"]),
    ),
    "bloom": (
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
        dict(bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"),
    ),
    "opt": (
        dict(bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>"),
        dict(bos_token_id="</s>", eos_token_id="</s>", pad_token_id="<pad>"),
    ),
    "glm": (
        dict(
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            cls_token="[CLS]",
            mask_token="[MASK]",
            additional_special_tokens=["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"],
        ),
        dict(eos_token_id="<|endoftext|>", pad_token_id="<|endoftext|>"),
    ),
}
# style -> the post-processor's template around one text ($A) and a pair ($A $B)
TEMPLATES = {
    "llama2": ("<s> $A", "<s> $A <s> $B"),
    "llama3": ("<|begin_of_text|> $A", "<|begin_of_text|> $A <|begin_of_text|> $B"),
    "opt": ("</s> $A", "</s> $A </s> $B"),
    "glm": ("[CLS] $A <|endoftext|>", None),
}


def _pipeline(style: str) -> tuple[Tokenizer, list[str]]:
    """An untrained BPE with the style's pre-tokenizer and decoder; -> (tokenizer, initial alphabet)."""
    if style == "llama2":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tok, [chr(c) for c in range(33, 127)] + ["▁"]
    tok = Tokenizer(models.BPE())
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(LLAMA3_SPLIT, behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's (OPT, GLM-10B) and BLOOM's byte-level split, no prefix space
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, pre_tokenizers.ByteLevel.alphabet()


def _post_processor(style: str, tok: Tokenizer):
    if style not in TEMPLATES:
        return processors.ByteLevel(trim_offsets=False)  # BLOOM: nothing added
    single, pair = TEMPLATES[style]
    names = {w for w in (single + " " + (pair or "")).split() if not w.startswith("$")}
    specials = [(n, tok.token_to_id(n)) for n in names]
    template = processors.TemplateProcessing(
        single=single, pair=pair or single.replace("$A", "$A $B"), special_tokens=specials
    )
    if style == "llama2":
        return template
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), template])


@functools.cache
def tokenizer_json(style: str, vocab_size: int = 400) -> str:
    """The style's trained tokenizer.json text (cached: the BPE is trained once per style)."""
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {STYLES}")
    first, after = SPECIALS[style]
    tok, alphabet = _pipeline(style)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=first, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in after])
    tok.post_processor = _post_processor(style, tok)
    return tok.to_str()


def _token_field(tok: Tokenizer, v):
    if isinstance(v, list):
        return [tok.token_to_id(t) for t in v]
    return tok.token_to_id(v)


def write_tokenizer(folder: str, style: str) -> str:
    """Write the style's tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json into `folder` (created). -> the tokenizer.json's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    text = tokenizer_json(style)
    with open(path, "w") as f:
        f.write(text)
    tok = Tokenizer.from_str(text)
    config, generation = SIDECARS[style]
    config = {
        **config,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "mask_token")
    special_map = {k: config[k] for k in names if config.get(k)}
    if "additional_special_tokens" in config:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    generation = {k: _token_field(tok, v) for k, v in generation.items()}
    for name, obj in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
        ("generation_config.json", {**generation, "transformers_version": "4.40.0"}),
    ):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
    return path


def token_id(folder_or_path: str, token: str) -> int:
    """The id of `token` in a written tokenizer (tests name specials by text)."""
    path = folder_or_path if folder_or_path.endswith(".json") else os.path.join(folder_or_path, "tokenizer.json")
    got = Tokenizer.from_file(path).token_to_id(token)
    if got is None:
        raise KeyError(f"{token!r} is not in {path}")
    return got
