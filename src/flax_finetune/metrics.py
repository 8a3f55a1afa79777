"""Offline metrics in numpy (no metric hub): each returns plain floats."""

from __future__ import annotations

import math

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of predictions equal to the reference."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float(np.mean(predictions == references)) if references.size else 0.0


def binary_f1(predictions: np.ndarray, references: np.ndarray, positive: int = 1) -> float:
    """F1 of the `positive` class (0 when it is never predicted nor present)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    true_positive = np.sum((predictions == positive) & (references == positive))
    predicted, actual = np.sum(predictions == positive), np.sum(references == positive)
    if predicted + actual == 0:
        return 0.0
    return float(2 * true_positive / (predicted + actual))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (0 when either side is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


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
    """Spearman rank correlation: Pearson of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def perplexity(mean_loss: float) -> float:
    """exp(loss), inf on overflow."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
