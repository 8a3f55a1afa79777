"""Offline metrics against known values and the reference implementations of scipy and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, mean_squared_error

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


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 257, 1000])
def test_binary_f1_matches_sklearn_on_random_cases(size):
    rng = np.random.default_rng(size)
    for _ in range(30):
        predicted_rate, actual_rate = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=2)  # 0 and 1: degenerate cases
        predictions = (rng.random(size) < predicted_rate).astype(np.int64)
        references = (rng.random(size) < actual_rate).astype(np.int64)
        for positive in (1, 0):
            expected = f1_score(references, predictions, pos_label=positive, zero_division=0)
            assert metrics.binary_f1(predictions, references, positive) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("predictions, references", [
    ([0, 0, 0, 0], [1, 0, 1, 0]),  # positives present, none predicted: precision undefined
    ([0, 0, 0], [0, 0, 0]),  # no positive on either side: precision and recall undefined
    ([1, 1, 0], [0, 0, 0]),  # predicted, never present: recall undefined
])
def test_binary_f1_is_0_where_sklearn_divides_by_zero(predictions, references):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the project's F1 stays quiet where scikit-learn would warn
        assert metrics.binary_f1(np.array(predictions), np.array(references)) == 0.0
    assert f1_score(references, predictions, zero_division=0) == 0.0


@pytest.mark.parametrize("size", [2, 3, 4, 7, 16, 50, 200, 1000])
def test_regression_metrics_match_scipy_and_sklearn_on_random_cases(size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        x = rng.normal(size=size) * 10.0 ** rng.uniform(-3, 3)
        y = rng.uniform(-2, 2) * x + rng.normal(size=size) * np.std(x) * rng.uniform(0, 2)
        x_ties = rng.integers(0, rng.integers(2, 6), size=size)  # few distinct values: many ties
        y_ties = x_ties + rng.integers(-1, 2, size=size)
        for a, b in ((x, y), (x_ties, y_ties), (x, y_ties)):
            if np.all(a == a[0]) or np.all(b == b[0]):  # constant: scipy gives nan, see below
                continue
            assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
            assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
        assert metrics.mean_squared_error(x, y) == pytest.approx(mean_squared_error(x, y), rel=1e-12)
        assert metrics.mean_squared_error(x_ties, y_ties) == pytest.approx(mean_squared_error(x_ties, y_ties), rel=1e-12)


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_pearson_matches_scipy_near_the_limits_of_float64(scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = x + rng.normal(size=20)
    expected = stats.pearsonr(x, y)[0]
    assert metrics.pearson(x * scale, y) == pytest.approx(expected, abs=1e-12)
    assert metrics.pearson(x * scale, y * scale) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("constant", [np.full(6, 0.1), np.full(6, 0.7), np.zeros(6), np.full(6, 3)])
def test_correlations_are_exactly_0_where_a_side_is_constant(constant):
    varying = np.array([0.0, 1.0, 5.0, 2.0, 9.0, 3.3])  # not symmetric about its mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that the correlation is undefined
        assert np.isnan(stats.pearsonr(constant, varying)[0]) and np.isnan(stats.spearmanr(constant, varying)[0])
    assert metrics.pearson(constant, varying) == metrics.pearson(varying, constant) == 0.0
    assert metrics.spearman(constant, varying) == metrics.spearman(varying, constant) == 0.0


def test_perplexity():
    assert metrics.perplexity(math.log(20)) == pytest.approx(20)
    assert metrics.perplexity(1e6) == math.inf
