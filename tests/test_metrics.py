"""Offline metrics against known values and scipy's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flax_finetune import metrics


def test_accuracy_and_binary_f1_on_known_values():
    predictions, references = np.array([1, 0, 1, 1, 0]), np.array([1, 1, 1, 0, 0])
    assert metrics.accuracy(predictions, references) == pytest.approx(0.6)
    # positive class 1: tp=2, predicted=3, actual=3 -> precision=recall=2/3
    assert metrics.binary_f1(predictions, references) == pytest.approx(2 / 3)
    assert metrics.binary_f1(np.zeros(3), np.zeros(3)) == 0.0


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    y[:10] = np.round(y[:10])  # some ties
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-9)
    assert metrics.spearman(x, np.round(y)) == pytest.approx(stats.spearmanr(x, np.round(y))[0], rel=1e-9)
    np.testing.assert_allclose(metrics.average_ranks([3, 1, 3, 2]), stats.rankdata([3, 1, 3, 2]))
    assert metrics.pearson(np.ones(4), np.arange(4)) == 0.0


def test_perplexity():
    assert metrics.perplexity(math.log(20)) == pytest.approx(20)
    assert metrics.perplexity(1e6) == math.inf
