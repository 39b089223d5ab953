"""A small preference set from the instruction demos, for tests and the DPO / reward benchmarks.

    python experiments/make_preference_set.py --out pref.jsonl [--lang en|zh|both] [--seed 0]
        [--rejected other-language|truncated] [--limit N]

Reads ../shared/data/instructions/alpaca_{en,zh}_demo.json (never copied into the repo) and writes
JSON lines {"prompt", "chosen", "rejected"} (trl's format; `glm_jax.preference` reads it):
the prompt is the row's query (instruction, then its input on a new line), chosen its reference
answer, rejected a worse one: another row's answer in the OTHER language (drawn seeded; a tiny model
cannot tell two same-language answers apart), or with --rejected truncated the reference cut to its
first quarter of characters. Rows are shuffled with the seed; the output is a pure function of
(files, arguments). Prints one JSON summary line.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "instructions"))
LANGS = ("en", "zh")


def load(data: str, lang: str) -> list[dict]:
    path = os.path.join(data, f"alpaca_{lang}_demo.json")
    if not os.path.exists(path):
        sys.exit(f"{path} not found; pass --data DIR holding alpaca_en_demo.json and alpaca_zh_demo.json")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [r for r in rows if r.get("instruction", "").strip() and r.get("output", "").strip()]


def query(row: dict) -> str:
    extra = row.get("input") or ""
    return row["instruction"] + ("\n" + extra if extra.strip() else "")


def truncated(answer: str) -> str:
    return answer[: max(1, len(answer) // 4)]


def make_rows(sets: dict[str, list[dict]], langs: list[str], rejected: str, seed: int) -> list[dict]:
    """Preference rows of the languages `langs`; `sets` holds the rows of both languages (the other
    language's answers are the rejected ones)."""
    out = []
    for k, lang in enumerate(langs):
        rows = sets[lang]
        other = sets[LANGS[1 - LANGS.index(lang)]]
        draws = np.random.default_rng([seed, k]).integers(0, len(other), len(rows))
        for row, j in zip(rows, draws):
            bad = truncated(row["output"]) if rejected == "truncated" else other[int(j)]["output"]
            if bad != row["output"]:
                out.append({"prompt": query(row), "chosen": row["output"], "rejected": bad})
    order = np.random.default_rng([seed, 0x51]).permutation(len(out))
    return [out[i] for i in order]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--lang", choices=("en", "zh", "both"), default="both")
    p.add_argument("--rejected", choices=("other-language", "truncated"), default="other-language")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many rows (after shuffling)")
    p.add_argument("--data", default=DATA, help="folder of alpaca_en_demo.json and alpaca_zh_demo.json")
    args = p.parse_args(argv)
    sets = {lang: load(args.data, lang) for lang in LANGS}
    langs = list(LANGS) if args.lang == "both" else [args.lang]
    rows = make_rows(sets, langs, args.rejected, args.seed)[: args.limit]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    by_lang = {lang: len(sets[lang]) for lang in langs}
    summary = dict(out=args.out, rows=len(rows), source_rows=by_lang, rejected=args.rejected, seed=args.seed)
    print(json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
