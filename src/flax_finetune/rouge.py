"""ROUGE-1/2/L/Lsum computed offline, with the semantics of Google's `rouge_score`.

The summarization scripts report ROUGE without the metric hub or the
`rouge_score` package: tokens are lowercased alphanumeric runs, words longer
than three characters are Porter-stemmed (nltk's stemmer, the only optional
dependency, imported on first use), rougeL is the LCS of the whole texts and
rougeLsum the summary-level union LCS over newline-separated sentences.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
# End punctuation (with any closing quotes/brackets), then whitespace, then what
# starts a sentence: an uppercase letter, a digit, or an opening quote/bracket.
_SENTENCE_BOUNDARY = re.compile(r"([.!?][\"'”’)\]]*)\s+(?=[A-Z0-9\"'“‘(\[])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences offline: at newlines and at . ! ? before a new sentence."""
    sentences = []
    for line in text.splitlines():
        sentences.extend(_SENTENCE_BOUNDARY.sub("\\1\n", line).split("\n"))
    return [sentence.strip() for sentence in sentences if sentence.strip()]


@functools.cache
def _porter_stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(token: str) -> str:
    """Porter stem of one token, cached: a corpus repeats its words, and stemming is most of tokenising."""
    return _porter_stemmer().stem(token)


def tokenize(text: str, use_stemmer: bool = True) -> list[str]:
    """rouge_score's default tokenizer: lowercase alphanumeric runs, stemming words over 3 chars."""
    tokens = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [_stem(token) if len(token) > 3 else token for token in tokens]
    return tokens


def _f_measure(hits: int, prediction_count: int, reference_count: int) -> float:
    precision = hits / prediction_count if prediction_count else 0.0
    recall = hits / reference_count if reference_count else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngram_f_measure(prediction: list[str], reference: list[str], n: int) -> float:
    prediction_ngrams = Counter(zip(*(prediction[i:] for i in range(n))))
    reference_ngrams = Counter(zip(*(reference[i:] for i in range(n))))
    hits = sum((prediction_ngrams & reference_ngrams).values())
    return _f_measure(hits, sum(prediction_ngrams.values()), sum(reference_ngrams.values()))


def _lcs_rows(reference: list[str], candidate: list[str]) -> list[int]:
    """The LCS table's rows as bit masks (Hyyro's bit-parallel LCS), one per reference prefix.

    Bit j of rows[i] is 0 where the LCS of reference[:i] and candidate[:j + 1] is one
    longer than that of reference[:i] and candidate[:j]: each row costs a few integer
    operations instead of a loop over the candidate.
    """
    matches: dict[str, int] = {}
    for position, token in enumerate(candidate):
        matches[token] = matches.get(token, 0) | 1 << position
    every = (1 << len(candidate)) - 1
    rows = [every]
    for token in reference:
        row = rows[-1]
        matched = row & matches.get(token, 0)
        rows.append(((row + matched) | (row - matched)) & every)
    return rows


def _lcs_table_entry(rows: list[int], i: int, j: int) -> int:
    """LCS length of reference[:i] and candidate[:j]: the 0 bits of rows[i] below bit j."""
    return j - (rows[i] & ((1 << j) - 1)).bit_count()


def lcs_length(reference: list[str], candidate: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    return len(candidate) - _lcs_rows(reference, candidate)[-1].bit_count()


def lcs_reference_positions(reference: list[str], candidate: list[str]) -> set[int]:
    """Positions in `reference` of one LCS, chosen by rouge_score's backtracking order."""
    rows = _lcs_rows(reference, candidate)
    positions = set()
    i, j = len(reference), len(candidate)
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            positions.add(i - 1)
            i, j = i - 1, j - 1
        elif _lcs_table_entry(rows, i, j - 1) > _lcs_table_entry(rows, i - 1, j):
            j -= 1
        else:
            i -= 1
    return positions


def _lcs_f_measure(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return 0.0
    return _f_measure(lcs_length(reference, prediction), len(prediction), len(reference))


def _summary_lcs_f_measure(prediction_sentences: list[list[str]], reference_sentences: list[list[str]]) -> float:
    """Summary-level LCS: per reference sentence, the union of its LCS with every
    predicted sentence; a token counts at most as often as it occurs on both sides."""
    unused_prediction = Counter(token for sentence in prediction_sentences for token in sentence)
    unused_reference = Counter(token for sentence in reference_sentences for token in sentence)
    prediction_count, reference_count = unused_prediction.total(), unused_reference.total()
    if not prediction_count or not reference_count:
        return 0.0
    hits = 0
    for reference_sentence in reference_sentences:
        union = set().union(*(lcs_reference_positions(reference_sentence, s) for s in prediction_sentences))
        for token in (reference_sentence[position] for position in sorted(union)):
            if unused_prediction[token] > 0 and unused_reference[token] > 0:
                hits += 1
                unused_prediction[token] -= 1
                unused_reference[token] -= 1
    return _f_measure(hits, prediction_count, reference_count)


def _newline_sentences(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def _mean_scores(
    predictions: list[str],
    references: list[str],
    use_stemmer: bool,
    lsum_sentences: Callable[[str], list[str]],
) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("ROUGE needs at least one prediction/reference pair")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        prediction_tokens, reference_tokens = tokenize(prediction, use_stemmer), tokenize(reference, use_stemmer)
        totals["rouge1"] += _ngram_f_measure(prediction_tokens, reference_tokens, 1)
        totals["rouge2"] += _ngram_f_measure(prediction_tokens, reference_tokens, 2)
        totals["rougeL"] += _lcs_f_measure(prediction_tokens, reference_tokens)
        totals["rougeLsum"] += _summary_lcs_f_measure(
            [tokenize(sentence, use_stemmer) for sentence in lsum_sentences(prediction)],
            [tokenize(sentence, use_stemmer) for sentence in lsum_sentences(reference)],
        )
    return {key: total / len(references) for key, total in totals.items()}


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE F-measures (0..1) as rouge_score computes them; rougeLsum splits at newlines."""
    return _mean_scores(predictions, references, use_stemmer, _newline_sentences)


def rouge_with_sentence_split(
    predictions: list[str], references: list[str], use_stemmer: bool = True
) -> dict[str, float]:
    """`rouge`, with rougeLsum over `split_sentences` (what the summarization example
    gets by newline-joining nltk.sent_tokenize); the other scores use the text as is."""
    return _mean_scores(predictions, references, use_stemmer, split_sentences)
