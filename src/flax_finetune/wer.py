"""Word error rate computed offline, with jiwer's default semantics.

The speech-recognition script reports WER without jiwer: each text is cut into
words as jiwer's default transform does, and the word-level edit distances of
all pairs are summed and divided by the total number of reference words.
"""

from __future__ import annotations

import re

import numpy as np

_WHITESPACE_RUN = re.compile(r"\s\s+")


def split_words(text: str) -> list[str]:
    """jiwer's default WER transform: runs of 2+ whitespace become one space, strip, split on spaces."""
    return [word for word in _WHITESPACE_RUN.sub(" ", text).strip().split(" ") if word]


def word_edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Fewest word substitutions, deletions and insertions turning `reference` into `hypothesis`."""
    vocabulary: dict[str, int] = {}
    reference_ids = np.array([vocabulary.setdefault(word, len(vocabulary)) for word in reference], np.int64)
    rows = np.arange(len(reference) + 1)
    distances = rows  # row i: distance from reference[:i] to the hypothesis words seen so far
    for column, word in enumerate(hypothesis, start=1):
        kept_or_substituted = distances[:-1] + (reference_ids != vocabulary.get(word, -1))
        best_without_deletion = np.minimum(kept_or_substituted, distances[1:] + 1)
        # Deleting reference words chains down the column, d[i] = min(best[i], d[i-1] + 1),
        # which is i + the running minimum of best[k] - k (with best[0] = column).
        distances = np.minimum.accumulate(np.concatenate(([column], best_without_deletion - rows[1:]))) + rows
    return int(distances[-1])


def word_error_rate(predictions: list[str], references: list[str]) -> float:
    """(substitutions + deletions + insertions) over all pairs / number of reference words."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    reference_words = [split_words(reference) for reference in references]
    reference_word_count = sum(map(len, reference_words))
    if not reference_word_count:
        raise ValueError("word error rate needs at least one reference word")
    errors = sum(
        word_edit_distance(words, split_words(prediction)) for words, prediction in zip(reference_words, predictions)
    )
    return errors / reference_word_count
