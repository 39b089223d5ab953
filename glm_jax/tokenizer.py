"""SentencePiece tokenizer with GLM's special tokens at fixed ids.

The bilingual model (`glm_jax/assets/glm_sp32k.model`, ~32k pieces, byte fallback so no character
is ever unknown, whitespace and newlines kept exactly) is built by `experiments/train_tokenizer.py`
and loaded by default. Ids:

    0 <pad>   1 <unk>   2 </s> (eos)   3 [MASK]   4 [gMASK]   5 [sMASK]   6 <sop>   7 <eop>   8 "\\n"

The special tokens are SentencePiece control symbols: text that spells "[MASK]" is encoded as
ordinary characters, never as the special token.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "glm_sp32k.model")

PAD, UNK, EOS, MASK, GMASK, SMASK, SOP, EOP, NEWLINE = range(9)
SPECIAL_PIECES = {"<pad>": PAD, "<unk>": UNK, "</s>": EOS, "[MASK]": MASK, "[gMASK]": GMASK,
                  "[sMASK]": SMASK, "<sop>": SOP, "<eop>": EOP, "\n": NEWLINE}
CONTROL_SYMBOLS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
USER_SYMBOLS = ["\n"]


class TokenizerError(ValueError):
    pass


class GLMTokenizer:
    """encode/decode text <-> int ids; GLM's specials as attributes (`gmask_id`, `sop_id`, ...)."""

    pad_id, unk_id, eos_id = PAD, UNK, EOS
    mask_id, gmask_id, smask_id, sop_id, eop_id = MASK, GMASK, SMASK, SOP, EOP

    def __init__(self, model_file: str | None = None):
        path = model_file or DEFAULT_MODEL
        if not os.path.exists(path):
            raise TokenizerError(f"tokenizer model {path} not found; build it with "
                                 "`python experiments/train_tokenizer.py`")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.model_file = path
        for piece, want in SPECIAL_PIECES.items():
            got = self.sp.piece_to_id(piece)
            if got != want:
                raise TokenizerError(f"{path}: special piece {piece!r} has id {got}, expected {want}; "
                                     "was it built by experiments/train_tokenizer.py?")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return -(-self.vocab_size // multiple) * multiple

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Decode ids; GLM's special tokens (never text) are dropped, like SentencePiece's control ids."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))
