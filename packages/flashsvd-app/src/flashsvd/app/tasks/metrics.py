"""Task metrics through scikit-learn and scipy: GLUE's definitions, no arithmetic of our own.

``evaluate``'s GLUE metric modules compute exactly these calls (accuracy, binary F1 and Matthews from
``sklearn.metrics``; Pearson and Spearman from ``scipy.stats``) but are fetched from the Hugging Face
hub on first use; calling the libraries directly keeps evaluation offline. The wrappers only check
the inputs (same length, not empty) and return Python floats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence


def _check(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and references ({len(gold)}) differ in length")
    if not len(pred):
        raise ValueError("no examples to score")


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    from sklearn.metrics import accuracy_score

    _check(pred, gold)
    return float(accuracy_score([int(g) for g in gold], [int(p) for p in pred]))


def f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class (GLUE's MRPC/QQP convention); 0 when nothing is positive."""
    from sklearn.metrics import f1_score

    _check(pred, gold)
    return float(f1_score([int(g) for g in gold], [int(p) for p in pred], pos_label=positive,
                          labels=[positive], average="micro", zero_division=0))  # fmt: skip


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation (CoLA); 0 when a margin is empty."""
    from sklearn.metrics import matthews_corrcoef as mcc

    _check(pred, gold)
    return float(mcc([int(g) for g in gold], [int(p) for p in pred]))


def _correlation(fn, x: Sequence[float], y: Sequence[float]) -> float:
    """``fn(x, y)``'s statistic; NaN (no warning) when either side is constant."""
    _check(x, y)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn([float(v) for v in x], [float(v) for v in y])[0])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, x, y)


def perplexity(total_nll: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        raise ValueError("perplexity of zero predicted tokens is undefined")
    return math.exp(total_nll / n_tokens)


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
