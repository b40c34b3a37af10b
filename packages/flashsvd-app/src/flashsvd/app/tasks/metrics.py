"""Task metrics, implemented here (small, exact, tested) so evaluation never needs a network.

All functions take plain sequences of numbers and return Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and references ({len(gold)}) differ in length")
    if not len(pred):
        raise ValueError("no examples to score")


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    _check(pred, gold)
    return sum(int(p) == int(g) for p, g in zip(pred, gold)) / len(gold)


def f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class (GLUE's MRPC/QQP convention); 0 when nothing is positive."""
    _check(pred, gold)
    tp = sum(int(p) == positive and int(g) == positive for p, g in zip(pred, gold))
    fp = sum(int(p) == positive and int(g) != positive for p, g in zip(pred, gold))
    fn = sum(int(p) != positive and int(g) == positive for p, g in zip(pred, gold))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation for binary labels (CoLA); 0 when a margin is empty, as scikit-learn does."""
    _check(pred, gold)
    tp = sum(int(p) == 1 and int(g) == 1 for p, g in zip(pred, gold))
    tn = sum(int(p) == 0 and int(g) == 0 for p, g in zip(pred, gold))
    fp = sum(int(p) == 1 and int(g) == 0 for p, g in zip(pred, gold))
    fn = sum(int(p) == 0 and int(g) == 1 for p, g in zip(pred, gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _check(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def rankdata(values: Sequence[float]) -> list[float]:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks."""
    _check(x, y)
    return pearson(rankdata(x), rankdata(y))


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
