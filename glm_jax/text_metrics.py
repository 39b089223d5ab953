"""Generation metrics exactly as ChatGLM's ptuning `compute_metrics` computes them.

ROUGE-1/2/L: F-scores x 100 (rouge-chinese's `Rouge().get_scores`) over jieba-segmented,
space-joined text; BLEU-4: nltk's `sentence_bleu([list(reference)], list(prediction),
smoothing_function=SmoothingFunction().method3)` over characters, x 100. Each rounded to 4
places per row as the reference does, then averaged over rows. An empty prediction (which the
reference's rouge call cannot take) scores 0 on every metric.
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    import logging

    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    hypothesis = " ".join(jieba.cut(prediction))
    gold = " ".join(jieba.cut(reference))
    if not hypothesis.strip() or not gold.strip():
        return {k: 0.0 for k in METRICS}
    rouge = Rouge().get_scores(hypothesis, gold)[0]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    out = {f"rouge-{k[-1]}": round(rouge[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    return {"bleu-4": round(bleu * 100, 4), **out}


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Means over rows of `row_scores`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows = [row_scores(p, r) for p, r in zip(predictions, references)]
    return {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in METRICS}
