"""SQuAD v1.1 and v2.0 scores, with the semantics of the official evaluation scripts.

The question-answering scripts score offline: answers are compared after
normalisation (lowercase, no punctuation, no articles, single spaces), each
question takes its best score over the gold answers, and v2.0 adds
unanswerable questions, the no-answer threshold and the best-threshold search.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when the normalised answers are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """v1.1's F1 over the normalised answers' word bags (0 when no word is shared)."""
    prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(prediction_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1_v2(prediction: str, gold: str) -> float:
    """v2.0's F1: as v1.1, except that an empty answer scores 1 against an empty one, else 0."""
    if not normalize_answer(prediction) or not normalize_answer(gold):
        return float(normalize_answer(prediction) == normalize_answer(gold))
    return token_f1(prediction, gold)


def squad_v1(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 in percent over every referenced question (a missing prediction scores 0)."""
    if not references:
        raise ValueError("squad_v1 needs at least one reference")
    exact_total = f1_total = 0.0
    for question_id, gold_answers in references.items():
        if question_id in predictions:
            prediction = predictions[question_id]
            exact_total += max(exact_match(prediction, gold) for gold in gold_answers)
            f1_total += max(token_f1(prediction, gold) for gold in gold_answers)
    return {"exact_match": 100.0 * exact_total / len(references), "f1": 100.0 * f1_total / len(references)}


def _percentages(exact: dict[str, float], f1: dict[str, float], question_ids: list[str]) -> dict[str, float]:
    return {
        "exact": 100.0 * sum(exact[question_id] for question_id in question_ids) / len(question_ids),
        "f1": 100.0 * sum(f1[question_id] for question_id in question_ids) / len(question_ids),
        "total": len(question_ids),
    }


def _best_threshold(
    scores: dict[str, float],
    predictions: dict[str, str],
    no_answer_probabilities: dict[str, float],
    has_answer: dict[str, bool],
) -> tuple[float, float]:
    """Best score (percent) over no-answer thresholds, and the threshold reaching it.

    Starting from "answer nothing" (every unanswerable question right), questions
    are answered in increasing no-answer probability; the official script's
    order, ties included, and its first-best threshold are kept.
    """
    score = best_score = float(sum(not answerable for answerable in has_answer.values()))
    best_threshold = 0.0
    for question_id in sorted(no_answer_probabilities, key=no_answer_probabilities.__getitem__):
        if question_id not in scores:
            continue
        if has_answer[question_id]:
            score += scores[question_id]
        elif predictions[question_id]:
            score -= 1
        if score > best_score:
            best_score, best_threshold = score, no_answer_probabilities[question_id]
    return 100.0 * best_score / len(scores), best_threshold


def squad_v2(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    no_answer_probabilities: dict[str, float] | None = None,
    threshold: float = 1.0,
) -> dict[str, float]:
    """SQuAD v2.0 scores (percent) as evaluate-v2.0.py reports them.

    An empty gold list marks an unanswerable question and the prediction "" means
    "no answer". A question whose no-answer probability exceeds `threshold` counts
    as answered "no answer". Probabilities default to 0.0 for every prediction.
    """
    if not references:
        raise ValueError("squad_v2 needs at least one reference")
    missing = [question_id for question_id in references if question_id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions, e.g. {missing[:3]}")
    if no_answer_probabilities is None:
        no_answer_probabilities = dict.fromkeys(predictions, 0.0)
    missing = [question_id for question_id in references if question_id not in no_answer_probabilities]
    if missing:
        raise ValueError(f"no no-answer probability for {len(missing)} questions, e.g. {missing[:3]}")

    has_answer = {question_id: bool(answers) for question_id, answers in references.items()}
    raw_exact, raw_f1 = {}, {}
    for question_id, answers in references.items():
        gold_answers = [answer for answer in answers if normalize_answer(answer)] or [""]
        prediction = predictions[question_id]
        raw_exact[question_id] = max(exact_match(prediction, gold) for gold in gold_answers)
        raw_f1[question_id] = max(token_f1_v2(prediction, gold) for gold in gold_answers)

    def apply_threshold(scores: dict[str, float]) -> dict[str, float]:
        return {
            question_id: float(not has_answer[question_id])
            if no_answer_probabilities[question_id] > threshold
            else score
            for question_id, score in scores.items()
        }

    exact, f1 = apply_threshold(raw_exact), apply_threshold(raw_f1)
    results = _percentages(exact, f1, list(references))
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        question_ids = [question_id for question_id in references if has_answer[question_id] == answerable]
        if question_ids:
            results.update({f"{prefix}_{key}": value for key, value in _percentages(exact, f1, question_ids).items()})
    results["best_exact"], results["best_exact_thresh"] = _best_threshold(
        raw_exact, predictions, no_answer_probabilities, has_answer
    )
    results["best_f1"], results["best_f1_thresh"] = _best_threshold(
        raw_f1, predictions, no_answer_probabilities, has_answer
    )
    return results
