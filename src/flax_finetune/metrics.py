"""Offline metrics in numpy (no metric hub): each returns plain floats."""

from __future__ import annotations

import math

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of predictions equal to the reference."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float(np.mean(predictions == references)) if references.size else 0.0


def binary_f1(predictions: np.ndarray, references: np.ndarray, positive: int = 1) -> float:
    """F1 of the `positive` class, 2 * true positives / (predicted + actual positives).

    0 when the class is never predicted (precision undefined, recall 0) and
    when it is neither predicted nor present: scikit-learn's
    `f1_score(..., zero_division=0)`, with no warning.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    true_positive = np.sum((predictions == positive) & (references == positive))
    predicted, actual = np.sum(predictions == positive), np.sum(references == positive)
    if predicted + actual == 0:
        return 0.0
    return float(2 * true_positive / (predicted + actual))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; exactly 0 when either side is constant (scipy.stats.pearsonr: nan).

    Constancy is checked on the values: their mean can differ from them by a
    rounding error, which would leave a spurious ~1e-17 correlation. The
    deviations are scaled to at most 1, as scipy does, so that their squares
    neither overflow nor underflow for very large or very small values.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    x, y = x / np.max(np.abs(x)), y / np.max(np.abs(y))
    return float(np.sum(x * y) / math.sqrt(float(np.sum(x * x) * np.sum(y * y))))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the average ranks (0 when either side is constant)."""
    return pearson(average_ranks(x), average_ranks(y))


def mean_squared_error(predictions: np.ndarray, references: np.ndarray) -> float:
    """Mean of the squared differences, in float64 (regression's eval_mse)."""
    difference = np.asarray(predictions, np.float64) - np.asarray(references, np.float64)
    return float(np.mean(difference ** 2))


def perplexity(mean_loss: float) -> float:
    """exp(loss), inf on overflow."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
