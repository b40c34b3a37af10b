"""The metric wrappers against hand-computed values and scipy, edge cases included."""

import math
import random

import pytest
from scipy import stats

from flashsvd.app.tasks import metrics as M


def test_accuracy_and_f1():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert M.accuracy(pred, gold) == pytest.approx(0.6)
    # tp=2 fp=1 fn=1 → F1 = 4/6
    assert M.f1(pred, gold) == pytest.approx(2 / 3)
    assert M.f1([0, 0], [0, 0]) == 0.0
    assert M.f1([1, 0, 0], [0, 0, 1], positive=0) == pytest.approx(0.5)


def test_matthews_against_formula_and_degenerate():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(pred, gold) == pytest.approx(expected)
    assert M.matthews_corrcoef([1, 1], [1, 0]) == 0.0


def test_correlations_match_scipy_with_ties():
    rng = random.Random(0)
    x = [rng.choice([0.0, 1.0, 2.5, 3.0, 4.2]) for _ in range(200)]
    y = [v + rng.gauss(0, 1) for v in x]
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        M.pearson([], [])
    assert M.perplexity(0.0, 10) == 1.0
