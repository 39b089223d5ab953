"""The GLM family's tokenizers behind one interface, all on SentencePiece alone.

    tok = load_tokenizer("chatglm2-6b", "/path/tokenizer.model")
    ids = tok.encode("你好")            # text ids only: no special tokens are added
    tok.gmask_id, tok.sop_id, tok.eop_id, tok.eos_id, tok.pad_id, tok.user_id, ...
    text = tok.decode(ids)             # special ids (never text) are dropped

Kinds (docs/reference.md#3-special-tokens-and-positions, `../shared/data/tokenizers/README.md`):

- `glm` (ours): the committed bilingual model `assets/glm_sp32k.model` (32k BPE, byte
  fallback, `decode(encode(t)) == t`), specials at fixed ids
  `0 <pad> 1 <unk> 2 </s> 3 [MASK] 4 [gMASK] 5 [sMASK] 6 <sop> 7 <eop> 8 "\\n"`;
- `glm-130b`: icetk's text model (`ice_text.model`, 130,000 pieces); id = piece id + 20,000 (the
  image tokens come first), raw text straight into SentencePiece (its normalizer folds whitespace
  and full-width forms; unknown characters are 20000); [MASK] 150000 ... eop 150005, eos 20002;
- `chatglm-6b`: the slim `ice_text.model` (130,344 pieces, specials inside, no offset);
  `\\n` -> `<n>`, `\\t` -> `<|tab|>`, runs of 2-80 spaces -> `<|blank_N|>` before SentencePiece,
  undone on decode, then transformers' `clean_up_tokenization_spaces` rule;
- `chatglm2-6b` / `chatglm3-6b`: one `tokenizer.model` (64,789 BPE pieces) with [MASK] [gMASK]
  [sMASK] sop eop appended after it (ChatGLM3: then `<|system|> <|user|> <|assistant|>
  <|observation|>`); eos 2, pad = unk = 0;
- `glm-4`: a GLM-4 folder's `tokenizer.json` (through the `tokenizers` package; not in ../shared);
- `hf`: any Hugging Face folder's `tokenizer.json` (LLaMA-2/3, BLOOM, OPT, the original GLM), its
  bos / eos / pad and stop ids from the sidecar files beside it (`HFTokenizer`);
  `encode_with_specials(text)` is transformers' `tokenizer(text)` (post-processor included).

Text that spells a special token ("[gMASK]") is always encoded as text: prompt builders
(`families.py`) place special ids themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "glm_sp32k.model")
SHARED_TOKENIZERS = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers")
)

PAD, UNK, EOS, MASK, GMASK, SMASK, SOP, EOP, NEWLINE = range(9)  # ours (kind "glm")
SPECIAL_PIECES = {
    "<pad>": PAD,
    "<unk>": UNK,
    "</s>": EOS,
    "[MASK]": MASK,
    "[gMASK]": GMASK,
    "[sMASK]": SMASK,
    "<sop>": SOP,
    "<eop>": EOP,
    "\n": NEWLINE,
}
CONTROL_SYMBOLS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
USER_SYMBOLS = ["\n"]
ROLES = ("system", "user", "assistant", "observation")


class TokenizerError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The special token ids a tokenizer gives prompt builders, objectives and decoding.

    Role ids (ChatGLM3) are None where the tokenizer has none."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    eos: int
    pad: int
    system: int | None = None
    user: int | None = None
    assistant: int | None = None
    observation: int | None = None

    @property
    def mask_tokens(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)

    def role(self, name: str) -> int:
        got = getattr(self, name, None) if name in ROLES else None
        if got is None:
            raise TokenizerError(f"this tokenizer has no <|{name}|> role token")
        return got


GLM_IDS = SpecialIds(mask=MASK, gmask=GMASK, smask=SMASK, sop=SOP, eop=EOP, eos=EOS, pad=PAD)


def _load_sp(path: str, hint: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer model {path} not found; {hint}")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model file ({e})") from None


class Tokenizer:
    """encode/decode text <-> int ids over a SentencePiece model; the special ids as attributes
    (`mask_id`, `gmask_id`, `smask_id`, `sop_id`, `eop_id`, `eos_id`, `pad_id`, `unk_id` and, for
    ChatGLM3, `system_id`, `user_id`, `assistant_id`, `observation_id`).

    Subclasses set `offset` (piece id -> token id), `specials` and may pre/post-process text."""

    kind = "?"
    offset = 0
    specials: SpecialIds
    unk_id: int

    def __init__(self, model_file: str, hint: str = "pass the model's tokenizer file"):
        self.model_file = os.path.abspath(model_file)
        self.sp = _load_sp(self.model_file, hint)

    mask_id = property(lambda self: self.specials.mask)
    gmask_id = property(lambda self: self.specials.gmask)
    smask_id = property(lambda self: self.specials.smask)
    sop_id = property(lambda self: self.specials.sop)
    eop_id = property(lambda self: self.specials.eop)
    eos_id = property(lambda self: self.specials.eos)
    pad_id = property(lambda self: self.specials.pad)
    system_id = property(lambda self: self.specials.system)
    user_id = property(lambda self: self.specials.user)
    assistant_id = property(lambda self: self.specials.assistant)
    observation_id = property(lambda self: self.specials.observation)

    @property
    def vocab_size(self) -> int:
        """Every id this tokenizer can produce (text and special) is below this."""
        return max(
            self.offset + self.sp.get_piece_size(),
            1 + max(v for v in dataclasses.asdict(self.specials).values() if v is not None),
        )

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return -(-self.vocab_size // multiple) * multiple

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:  # decode (called per streamed token) reads it
        return frozenset(v for v in dataclasses.asdict(self.specials).values() if v is not None)

    # ---- text <-> ids ---------------------------------------------------------------------
    def preprocess(self, text: str) -> str:
        return text

    def postprocess(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self.sp.encode(self.preprocess(text))]

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        texts = [self.preprocess(t) for t in texts]
        return [[i + self.offset for i in ids] for ids in self.sp.encode(texts, num_threads=num_threads)]

    def decode(self, ids) -> str:
        """Text of ids; special and padding ids are dropped, as the released decoders drop them."""
        n = self.sp.get_piece_size()
        drop = self.special_ids
        pieces = [
            i - self.offset
            for i in (int(t) for t in np.asarray(ids).reshape(-1))
            if i not in drop and 0 <= i - self.offset < n
        ]
        return self.postprocess(self.sp.decode(pieces))

    def id_to_piece(self, i: int) -> str:
        """The piece of a text id, or the name of a special id."""
        i = int(i)
        if 0 <= i - self.offset < self.sp.get_piece_size():
            return self.sp.id_to_piece(i - self.offset)
        names = [k for k, v in dataclasses.asdict(self.specials).items() if v == i]
        return f"<{names[0]}>" if names else f"<id {i}>"

    def __repr__(self):
        return f"{type(self).__name__}(kind={self.kind!r}, model_file={self.model_file!r})"


class GLMTokenizer(Tokenizer):
    """Ours: the committed bilingual model with GLM's specials at fixed ids (control symbols)."""

    kind = "glm"
    specials = GLM_IDS
    unk_id = UNK

    def __init__(self, model_file: str | None = None):
        super().__init__(model_file or DEFAULT_MODEL, "build it with `python experiments/train_tokenizer.py`")
        for piece, want in SPECIAL_PIECES.items():
            got = self.sp.piece_to_id(piece)
            if got != want:
                raise TokenizerError(
                    f"{self.model_file}: special piece {piece!r} has id {got}, expected {want}; "
                    "was it built by experiments/train_tokenizer.py?"
                )


class IceTokenizer(Tokenizer):
    """GLM-130B: icetk's text model, ids after its 20,000 image tokens, no text preprocessing."""

    kind = "glm-130b"
    offset = 20000
    specials = SpecialIds(mask=150000, gmask=150001, smask=150002, sop=150004, eop=150005, eos=20002, pad=20003)
    unk_id = 20000
    eod_id = 150003
    PIECES = 130000

    def __init__(self, model_file: str):
        super().__init__(model_file, "GLM-130B's is icetk's ice_text.model (130,000 pieces)")
        if self.sp.get_piece_size() != self.PIECES:
            raise TokenizerError(
                f"{self.model_file} has {self.sp.get_piece_size()} pieces; GLM-130B's icetk text "
                f"model has {self.PIECES} (ChatGLM-6B's slim file is kind chatglm-6b)"
            )

    def postprocess(self, text: str) -> str:
        return text.replace("<n>", "\n")


_BLANKS = re.compile(" {2,80}")
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class ChatGLMTokenizer(Tokenizer):
    """ChatGLM-6B: the slim ice_text.model, specials inside it, whitespace encoded as pieces."""

    kind = "chatglm-6b"
    specials = SpecialIds(mask=130000, gmask=130001, smask=130002, sop=130004, eop=130005, eos=130005, pad=3)
    unk_id = 0
    end_id = 2  # </s>
    PIECES = 130344

    def __init__(self, model_file: str):
        super().__init__(model_file, "ChatGLM-6B's is its ice_text.model (130,344 pieces)")
        if self.sp.get_piece_size() != self.PIECES or self.sp.piece_to_id("[gMASK]") != self.specials.gmask:
            raise TokenizerError(
                f"{self.model_file} is not ChatGLM-6B's slim ice_text.model "
                f"({self.sp.get_piece_size()} pieces, want {self.PIECES} with [gMASK] at 130001)"
            )

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        # a run longer than 80 becomes <|blank_80|> then the rest, as the released longest-first replace does
        return _BLANKS.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    def postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        text = re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)
        for a, b in _CLEAN_UP:
            text = text.replace(a, b)
        return text


class ChatGLM2Tokenizer(Tokenizer):
    """ChatGLM2-6B / ChatGLM3-6B: BPE tokenizer.model, specials appended after its pieces."""

    kind = "chatglm2-6b"
    roles = False
    PIECES = 64789

    def __init__(self, model_file: str):
        super().__init__(model_file, "ChatGLM2/3-6B's is tokenizer.model (64,789 pieces)")
        n = self.sp.get_piece_size()
        if n != self.PIECES:
            raise TokenizerError(f"{self.model_file} has {n} pieces; ChatGLM2/3-6B's tokenizer.model has {self.PIECES}")
        names = ("mask", "gmask", "smask", "sop", "eop") + (ROLES if self.roles else ())
        self.specials = SpecialIds(
            eos=self.sp.eos_id(), pad=self.sp.unk_id(), **{name: n + i for i, name in enumerate(names)}
        )
        self.unk_id = self.sp.unk_id()


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    kind = "chatglm3-6b"
    roles = True


class JSONTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json behind our interface: `hf` (the loaded file) decodes and names
    pieces; `text_hf` encodes text (`hf` itself, or a copy that keeps spelled specials as text);
    decode drops our special ids (and, with `skip_special`, the file's own)."""

    skip_special = False
    hf = text_hf = None  # set by the subclass

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.text_hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self.text_hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        drop = self.special_ids
        kept = [i for i in (int(t) for t in np.asarray(ids).reshape(-1)) if i not in drop]
        return self.hf.decode(kept, skip_special_tokens=self.skip_special)

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(int(i)) or f"<id {int(i)}>"


class GLM4Tokenizer(JSONTokenizer):
    """GLM-4 (transformers' GlmForCausalLM checkpoints): the folder's `tokenizer.json` through the
    `tokenizers` package; special ids looked up by their names ([gMASK], <sop>, <|user|>, ...)."""

    kind = "glm-4"
    NAMES = dict(
        mask="[MASK]",
        gmask="[gMASK]",
        smask="[sMASK]",
        sop="<sop>",
        eop="<eop>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        system="<|system|>",
        user="<|user|>",
        assistant="<|assistant|>",
        observation="<|observation|>",
    )

    def __init__(self, model_file: str):
        self.model_file = os.path.abspath(model_file)
        self.hf = self.text_hf = _load_tokenizer_json(self.model_file, "GLM-4's is its tokenizer.json")
        found = {k: self.hf.token_to_id(v) for k, v in self.NAMES.items()}
        missing = [self.NAMES[k] for k in ("gmask", "sop", "eos", "user", "assistant") if found[k] is None]
        if missing:
            raise TokenizerError(f"{self.model_file} has no {', '.join(missing)}: not a GLM-4 tokenizer")
        self.specials = SpecialIds(
            **{
                k: (v if v is not None else found["eos"]) if k in ("mask", "smask", "eop") else v
                for k, v in found.items()
            }
        )
        self.unk_id = self.specials.pad


# the files beside a tokenizer.json that carry its special tokens and stop ids (copied with it)
HF_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")
GLM_BLANKS = dict(mask="[MASK]", gmask="[gMASK]", smask="[sMASK]", sop="<|startofpiece|>", eop="<|endofpiece|>")
BLANK_ERROR = (
    "the GLM objective (blank infilling with [MASK]/[sMASK]/[gMASK] and sop/eop) needs a tokenizer "
    "with those tokens; {what} has none (a LLaMA/BLOOM/OPT tokenizer): pretrain with --family glm "
    "(our tokenizer) or a GLM family's tokenizer, and fine-tune these models with experiments/finetune.py"
)


def sidecar_files(model_file: str) -> list[str]:
    """The sidecar files (`HF_SIDECARS`) that lie beside a tokenizer.json."""
    folder = os.path.dirname(os.path.abspath(model_file))
    return [p for p in (os.path.join(folder, name) for name in HF_SIDECARS) if os.path.isfile(p)]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not a JSON file ({e})") from None
    return got if isinstance(got, dict) else {}


class HFTokenizer(JSONTokenizer):
    """A Hugging Face folder's `tokenizer.json` (LLaMA, BLOOM, OPT, the original GLM) through the
    `tokenizers` package, its special tokens read from the sidecar files beside it:

    - bos / eos / pad / unk: tokenizer_config.json's `bos_token` ... (a string or an AddedToken
      dict), else special_tokens_map.json's, else generation_config.json's `bos_token_id` ..., else
      config.json's; pad falls back to eos (LLaMA has none);
    - `stop_ids`: generation_config.json's `eos_token_id` (an int or a list), else config.json's,
      else (eos,): where transformers' `generate` stops;
    - the GLM blank tokens [MASK] [gMASK] [sMASK] <|startofpiece|> <|endofpiece|> (THUDM/GLM's
      tokenizers) when all are present (`has_blanks`). A tokenizer without them (a causal LM's)
      maps mask, gmask, smask and sop to its bos (eos when it has none) and eop to its eos, so
      `specials` stays complete; the GLM objective refuses it (`check_blanks`).

    `encode` gives text ids only, a special token's spelling encoded as text; `encode_with_specials`
    is transformers' `tokenizer(text)`: the post-processor's specials added (LLaMA's <s>, OPT's </s>,
    GLM's [CLS] ... <|endoftext|>, nothing for BLOOM) and spelled specials matched."""

    kind = "hf"
    skip_special = True

    def __init__(self, model_file: str):
        self.model_file = os.path.abspath(model_file)
        self.hf = _load_tokenizer_json(self.model_file, "pass the folder's tokenizer.json")
        self.text_hf = _load_tokenizer_json(self.model_file, "")
        self.text_hf.encode_special_tokens = True  # spelled specials stay text
        folder = os.path.dirname(self.model_file)
        self.sidecars = {name: _read_json(os.path.join(folder, name)) for name in HF_SIDECARS}
        self.bos_id = self._special("bos")
        eos = self._special("eos")
        if eos is None:
            raise TokenizerError(
                f"{self.model_file}: no eos token found; put a tokenizer_config.json (eos_token) or "
                "generation_config.json (eos_token_id) beside it"
            )
        pad = self._special("pad")
        self.unk_id = self._special("unk")
        self.cls_id = self._special("cls")
        self.stop_ids = self._stop_ids(eos)
        blanks = {k: self.hf.token_to_id(v) for k, v in GLM_BLANKS.items()}
        self.has_blanks = all(v is not None for v in blanks.values())
        if not self.has_blanks:
            start = eos if self.bos_id is None else self.bos_id
            blanks = dict(mask=start, gmask=start, smask=start, sop=start, eop=eos)
        self.specials = SpecialIds(eos=eos, pad=eos if pad is None else pad, **blanks)

    def _id(self, value, where: str) -> int | None:
        """A token (string or AddedToken dict) or an id from a sidecar -> its id (None: unset)."""
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TokenizerError(f"{where} is {value!r}: expected a token string or an id")
        got = self.hf.token_to_id(value) if isinstance(value, str) else value
        if got is None or not 0 <= got < self.vocab_size:
            raise TokenizerError(f"{where} names {value!r}, which is not in {self.model_file}")
        return got

    def _special(self, name: str) -> int | None:
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            if self.sidecars[file].get(f"{name}_token") is not None:
                return self._id(self.sidecars[file][f"{name}_token"], f"{file} {name}_token")
        for file in ("generation_config.json", "config.json"):
            value = self.sidecars[file].get(f"{name}_token_id")
            if isinstance(value, list):  # eos_token_id as a list: the first is the eos
                value = value[0] if value else None
            if value is not None:
                return self._id(value, f"{file} {name}_token_id")
        return None

    def _stop_ids(self, eos: int) -> tuple[int, ...]:
        for file in ("generation_config.json", "config.json"):
            value = self.sidecars[file].get("eos_token_id")
            if value is not None:
                values = value if isinstance(value, list) else [value]
                return tuple(dict.fromkeys(self._id(v, f"{file} eos_token_id") for v in values))
        return (eos,)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return super().special_ids | frozenset(self.stop_ids)

    def token_id(self, token: str) -> int | None:
        """The id of a token (a special token's name: "<|eot_id|>"), None if it has none."""
        return self.hf.token_to_id(token)

    def encode_with_specials(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True).ids


def _load_tokenizer_json(path: str, hint: str):
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path} not found; {hint}")
    try:
        from tokenizers import Tokenizer as TokenizersFile
    except ImportError:
        raise TokenizerError("a tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from None
    try:
        return TokenizersFile.from_file(path)
    except Exception as e:
        raise TokenizerError(f"{path} is not a tokenizer.json ({e})") from None


def check_blanks(tokenizer: Tokenizer, what: str | None = None) -> None:
    """A clear error when the GLM objective is given a tokenizer without GLM's blank tokens."""
    if not getattr(tokenizer, "has_blanks", True):
        raise TokenizerError(BLANK_ERROR.format(what=what or f"the tokenizer {tokenizer.model_file}"))


KINDS = {
    "glm": GLMTokenizer,
    "glm-130b": IceTokenizer,
    "chatglm-6b": ChatGLMTokenizer,
    "chatglm2-6b": ChatGLM2Tokenizer,
    "chatglm3-6b": ChatGLM3Tokenizer,
    "glm-4": GLM4Tokenizer,
    "hf": HFTokenizer,
}
# where each kind's file lies in ../shared/data/tokenizers (the tests read them there)
SHARED_FILES = {
    "glm-130b": "glm130b-icetk/ice_text.model",
    "chatglm-6b": "chatglm-6b/ice_text.model",
    "chatglm2-6b": "chatglm2-6b/tokenizer.model",
    "chatglm3-6b": "chatglm3-6b/tokenizer.model",
}


def load_tokenizer(kind: str, model_file: str | None = None) -> Tokenizer:
    """The tokenizer of `kind` ("glm", "glm-130b", "chatglm-6b", "chatglm2-6b", "chatglm3-6b",
    "glm-4", "hf") from `model_file` (default: ours for "glm"; the released file in
    ../shared/data/tokenizers for the ChatGLM kinds, when it is there; "glm-4" and "hf" need a
    tokenizer.json, "hf" with its folder's sidecar files)."""
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {sorted(KINDS)}")
    if model_file is None and kind in ("glm-4", "hf"):
        raise TokenizerError(f"the {kind} tokenizer is not in ../shared: pass its tokenizer.json (--tokenizer FILE)")
    if model_file is None and kind != "glm":
        model_file = os.path.join(SHARED_TOKENIZERS, SHARED_FILES[kind])
        if not os.path.isfile(model_file):
            raise TokenizerError(f"the {kind} tokenizer needs its model file: pass it (--tokenizer FILE)")
    return KINDS[kind](model_file)


def check_fits(tokenizer: Tokenizer, rows: int, where: str = "the model") -> None:
    """A clear error when the tokenizer can produce ids the embedding has no row for."""
    if tokenizer.vocab_size > rows:
        raise TokenizerError(
            f"the {tokenizer.kind} tokenizer ({tokenizer.model_file}) produces ids up to "
            f"{tokenizer.vocab_size - 1}, but {where} has only {rows} embedding rows"
        )


def bundled_file(tokenizer: Tokenizer) -> str | None:
    """The file a checkpoint should carry for this tokenizer (None: ours, shipped in the package)."""
    return None if tokenizer.model_file == os.path.abspath(DEFAULT_MODEL) else tokenizer.model_file
