"""Evaluation metrics by name: accuracy, F1, Matthews corr., Pearson/Spearman, ROUGE, MC accuracy.

ROUGE uses the ``rouge-score`` package (F-measure, stemmed, as fractions in [0, 1]); nothing is
fetched from a hub.

Example:
    >>> compute(["accuracy", "f1"], [1, 0, 1, 1], [1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy import stats


def accuracy(preds, labels) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def _f1_for(preds, labels, positive) -> float:
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = np.sum(p & y)
    denom = np.sum(p) + np.sum(y)
    return float(2 * tp / denom) if denom else 0.0


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1."""
    return _f1_for(preds, labels, 1)


def f1_macro(preds, labels) -> float:
    classes = np.union1d(np.asarray(labels), np.asarray(preds))
    return float(np.mean([_f1_for(preds, labels, c) for c in classes]))


def mcc(preds, labels) -> float:
    """Matthews correlation (multi-class form); 0 when undefined."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(labels, preds)
    c = np.array([[np.sum((labels == a) & (preds == b)) for b in classes] for a in classes], float)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    num = np.trace(c) * n - t @ p
    den = np.sqrt((n**2 - p @ p) * (n**2 - t @ t))
    return float(num / den) if den else 0.0


def pearson(preds, labels) -> float:
    return float(stats.pearsonr(np.asarray(preds, float), np.asarray(labels, float))[0])


def spearman(preds, labels) -> float:
    return float(stats.spearmanr(np.asarray(preds, float), np.asarray(labels, float))[0])


def _rouge(kind: str) -> Callable:
    def score(preds: Sequence[str], refs: Sequence[str]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
        vals = [scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs, strict=True)]
        return float(np.mean(vals)) if vals else 0.0

    return score


METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "mc_accuracy": accuracy,
    "f1": f1,
    "f1_macro": f1_macro,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
    "rouge1": _rouge("rouge1"),
    "rouge2": _rouge("rouge2"),
    "rougeL": _rouge("rougeL"),
}


def compute(names: Iterable[str], preds, labels) -> dict[str, float]:
    out = {}
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}: accepted {sorted(METRICS)}")
        out[name] = round(METRICS[name](preds, labels), 6)
    return out
