"""Entity-level precision/recall/F1 for token classification, as seqeval computes them.

The NER script scores chunks, not tokens, without seqeval: chunks are read the
conlleval way (seqeval's default, non-strict mode), so IOB2, IOB1 and IOE tags
all work and an I- tag after O or after another type opens a new chunk.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from typing import Optional

Entity = tuple[str, int, int]

# Tag letters outside any chunk: a type change next to them neither ends nor starts one.
_OUTSIDE = ("O", ".")


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); a tag without a type ('O', 'B') gets the type '_'."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(previous_letter: str, letter: str, previous_type: str, entity_type: str) -> bool:
    return (
        previous_letter in ("E", "S")
        or (previous_letter in ("B", "I") and letter in ("B", "S", "O"))
        or (previous_letter not in _OUTSIDE and previous_type != entity_type)
    )


def _chunk_starts(previous_letter: str, letter: str, previous_type: str, entity_type: str) -> bool:
    return (
        letter in ("B", "S")
        or (previous_letter in ("E", "S", "O") and letter in ("E", "I"))
        or (letter not in _OUTSIDE and previous_type != entity_type)
    )


@functools.lru_cache(maxsize=1 << 12)
def _boundary(previous_tag: Optional[str], tag: str) -> tuple[Optional[str], bool]:
    """(type of the chunk that ends before `tag`, else None; whether a chunk starts at `tag`)
    after `previous_tag` (None at a sequence's start). Cached: a tag set has few pairs."""
    previous_letter, previous_type = _split_tag(previous_tag) if previous_tag is not None else ("O", "")
    letter, entity_type = _split_tag(tag)
    ends = _chunk_ends(previous_letter, letter, previous_type, entity_type)
    return (previous_type if ends else None), _chunk_starts(previous_letter, letter, previous_type, entity_type)


def extract_entities(tags: list[str]) -> list[Entity]:
    """(type, first index, last index) of every chunk in a tag sequence, as seqeval's get_entities."""
    entities = []
    previous, start = None, 0
    for index, tag in enumerate([*tags, "O"]):
        ended_type, starts = _boundary(previous, tag)
        if ended_type is not None:
            entities.append((ended_type, start, index - 1))
        if starts:
            start = index
        previous = tag
    return entities


def _scores(correct: int, predicted: int, actual: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(references: list[list[str]], predictions: list[list[str]]) -> dict:
    """Micro-averaged entity precision/recall/F1, token accuracy, and scores per entity type.

    Returns {"precision", "recall", "f1", "accuracy", "per_type": {TYPE: {"precision",
    "recall", "f1", "number"}}} where "number" is the count of reference entities.
    """
    if len(references) != len(predictions) or any(
        len(reference) != len(prediction) for reference, prediction in zip(references, predictions)
    ):
        raise ValueError("references and predictions must have the same number of sentences and tags")
    token_count = sum(map(len, references))
    if not token_count:
        raise ValueError("entity_scores needs at least one tag")
    # As seqeval: sentences are joined with an "O" between them, so no chunk spans two.
    reference_tags = [tag for sentence in references for tag in [*sentence, "O"]]
    predicted_tags = [tag for sentence in predictions for tag in [*sentence, "O"]]
    reference_entities, predicted_entities = set(extract_entities(reference_tags)), set(extract_entities(predicted_tags))
    correct_entities = reference_entities & predicted_entities

    def count_by_type(entities: set[Entity]) -> Counter[str]:
        return Counter(entity_type for entity_type, _, _ in entities)

    correct, predicted, actual = map(count_by_type, (correct_entities, predicted_entities, reference_entities))
    per_type = {
        entity_type: {
            **_scores(correct[entity_type], predicted[entity_type], actual[entity_type]),
            "number": actual[entity_type],
        }
        for entity_type in sorted(predicted.keys() | actual.keys())
    }
    matching_tags = sum(map(operator.eq, reference_tags, predicted_tags)) - len(references)  # less the joining "O"s
    return {
        **_scores(len(correct_entities), len(predicted_entities), len(reference_entities)),
        "accuracy": matching_tags / token_count,
        "per_type": per_type,
    }
