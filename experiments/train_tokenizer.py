"""Rebuild the bilingual SentencePiece model (glm_jax/assets/glm_sp32k.model) reproducibly.

    python experiments/train_tokenizer.py [--data ../shared/data/corpus] [--vocab 32000] [--out PATH]

BPE over every line of corpus/{en,zh}.jsonl.gz, in file order, single-threaded (so the same
input gives the same model); byte fallback (no character is ever unknown), digits split, identity
normalisation and no dummy prefix (text round-trips exactly: whitespace runs, code, full-width
Chinese punctuation), whitespace-only pieces allowed (code indentation). GLM's special tokens
take fixed ids (see glm_jax/tokenizer.py).
"""

import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time

import sentencepiece as spm

from glm_jax.tokenizer import CONTROL_SYMBOLS, DEFAULT_MODEL, USER_SYMBOLS, GLMTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "corpus"))


def corpus_lines(path: str):
    """Every non-empty line of every document's text (newlines become sentence breaks)."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for raw in f:
            try:
                text = json.loads(raw).get("text")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(text, str):
                yield from (line for line in text.split("\n") if line.strip())


def train(text_file: str, vocab: int) -> bytes:
    """Train in the text file's folder with relative names (the model stores its trainer spec, and
    absolute temp paths would change its bytes from run to run); return the model's bytes."""
    cwd = os.getcwd()
    os.chdir(os.path.dirname(text_file))
    try:
        spm.SentencePieceTrainer.train(
            input=os.path.basename(text_file),
            model_prefix="sp",
            vocab_size=vocab,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=16384,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            pad_id=0,
            unk_id=1,
            eos_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            unk_piece="<unk>",
            eos_piece="</s>",
            control_symbols=CONTROL_SYMBOLS,
            user_defined_symbols=USER_SYMBOLS,
            minloglevel=2,
        )
        with open("sp.model", "rb") as f:
            return f.read()
    finally:
        os.chdir(cwd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with en.jsonl.gz and zh.jsonl.gz")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=DEFAULT_MODEL)
    args = ap.parse_args(argv)
    files = [os.path.join(args.data, n) for n in ("en.jsonl.gz", "zh.jsonl.gz")]
    for f in files:
        if not os.path.exists(f):
            sys.exit(f"error: corpus file {f} not found (pass --data DIR)")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        text_file = os.path.join(tmp, "lines.txt")
        n = 0
        with open(text_file, "w", encoding="utf-8") as out:
            for f in files:
                for line in corpus_lines(f):
                    out.write(line.replace("\r", " ") + "\n")
                    n += 1
        data = train(text_file, args.vocab)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(data)
    tok = GLMTokenizer(args.out)  # checks the special ids
    print(
        json.dumps(
            {
                "model": args.out,
                "vocab_size": tok.vocab_size,
                "lines": n,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "seconds": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
