import numpy as np
import pytest
from scipy import stats

from aroma_jax.data import scores


def test_classification_metrics_by_hand():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    assert scores.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert scores.f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    mcc = (2 * 2 - 1 * 1) / np.sqrt((2 + 1) * (2 + 1) * (2 + 1) * (2 + 1))
    assert scores.mcc(preds, labels) == pytest.approx(mcc)
    assert scores.mcc([1, 1, 1], [1, 0, 1]) == 0.0  # undefined -> 0


def test_macro_f1_multiclass():
    preds, labels = [0, 1, 2, 2], [0, 1, 1, 2]
    f = [1.0, 2 * 1 / (1 + 2), 2 * 1 / (2 + 1)]
    assert scores.f1_macro(preds, labels) == pytest.approx(np.mean(f))


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    assert scores.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert scores.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_rouge():
    got = scores.compute(["rouge1", "rouge2", "rougeL"], ["the cat sat"], ["the cat sat down"])
    assert got["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75, rel=1e-4)
    assert got["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3), rel=1e-4)
    assert 0 < got["rougeL"] <= 1


def test_unknown_metric():
    with pytest.raises(ValueError, match="accepted"):
        scores.compute(["bleu"], [1], [1])
