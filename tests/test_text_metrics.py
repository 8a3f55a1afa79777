"""Offline text metrics against hand-worked values and the reference libraries
(rouge_score, seqeval, jiwer; skipped where missing) on many generated inputs."""

from __future__ import annotations

import random
import warnings

import pytest

from flax_finetune import entities, rouge, squad, wer

# --- ROUGE -------------------------------------------------------------------


def test_rouge_on_hand_worked_example():
    # tokens: the cat sat on the mat / the cat lay on the mat
    # unigrams shared: the x2, cat, on, mat = 5 of 6; bigrams shared: the-cat, on-the, the-mat = 3 of 5;
    # LCS "the cat on the mat" = 5 of 6.
    scores = rouge.rouge(["The cat sat on the mat."], ["the cat lay on the mat"])
    assert scores == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})


def test_rouge_stems_words_longer_than_three_characters():
    # running -> run, dogs -> dog; "run" and "dog" (3 chars) are left alone, and so is "its"
    # (which the stemmer would turn into "it").
    assert rouge.rouge(["running dogs"], ["run dog"])["rouge1"] == 1.0
    assert rouge.rouge(["running dogs"], ["run dog"], use_stemmer=False)["rouge1"] == 0.0
    assert rouge.rouge(["its"], ["it"])["rouge1"] == 0.0
    assert rouge.tokenize("Running, DOGS! it's its") == ["run", "dog", "it", "s", "its"]


def test_rouge_lsum_is_union_lcs_over_newline_separated_sentences():
    reference = "w1 w2 w3 w4 w5"
    # One text: LCS is 2 of 4 predicted and 5 reference tokens -> F = 2 * 0.5 * 0.4 / 0.9 = 4/9.
    # Two sentences: union of LCS(ref, "w4 w5") and LCS(ref, "w1 w2") covers 4 tokens -> P=1, R=0.8 -> 8/9.
    assert rouge.rouge(["w4 w5 w1 w2"], [reference])["rougeLsum"] == pytest.approx(4 / 9)
    scores = rouge.rouge(["w4 w5\nw1 w2"], [reference])
    assert scores["rougeL"] == pytest.approx(4 / 9)
    assert scores["rougeLsum"] == pytest.approx(8 / 9)
    # A token is counted at most as often as it occurs: "w1" twice in the reference, once predicted
    # -> 1 hit, P = 1, R = 1/2 -> 2/3.
    assert rouge.rouge(["w1"], ["w1\nw1"])["rougeLsum"] == pytest.approx(2 / 3)


def test_rouge_is_the_mean_over_pairs_and_handles_empty_text():
    scores = rouge.rouge(["a b", "", "x"], ["a b", "a", ""])
    assert scores == pytest.approx({"rouge1": 1 / 3, "rouge2": 1 / 3, "rougeL": 1 / 3, "rougeLsum": 1 / 3})
    with pytest.raises(ValueError):
        rouge.rouge(["a"], [])
    with pytest.raises(ValueError):
        rouge.rouge([], [])


def test_split_sentences():
    text = 'It rained. Then it stopped! Did it? "Yes." 42 people agree.\nNew line e.g. here. lower case stays'
    assert rouge.split_sentences(text) == [
        "It rained.",
        "Then it stopped!",
        "Did it?",
        '"Yes."',
        "42 people agree.",
        "New line e.g. here. lower case stays",
    ]
    assert rouge.split_sentences("  \n\n ") == []


def test_rouge_with_sentence_split_splits_only_for_lsum():
    scores = rouge.rouge_with_sentence_split(["W4 w5. W1 w2."], ["w1 w2 w3 w4 w5"])
    assert scores["rougeL"] == pytest.approx(4 / 9)
    assert scores["rougeLsum"] == pytest.approx(8 / 9)
    assert rouge.rouge(["W4 w5. W1 w2."], ["w1 w2 w3 w4 w5"])["rougeLsum"] == pytest.approx(4 / 9)


ROUGE_WORDS = (
    "the a of is was it its run runs running ran cat cats dog dogs happy happily happiness generous generously "
    "connect connected connection relational conditional 1990 2 x caresses ponies"
).split()


def random_summary(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 14)):
        word = rng.choice(ROUGE_WORDS)
        pieces.append(word.upper() if rng.random() < 0.1 else word)
        pieces.append(rng.choice([" ", " ", " ", ", ", ". ", "\n", " - ", "'s "]))
    return "".join(pieces)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_matches_rouge_score(use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(list(rouge.ROUGE_KEYS), use_stemmer=use_stemmer)
    rng = random.Random(0)
    predictions = [random_summary(rng) for _ in range(250)]
    references = [random_summary(rng) for _ in range(250)]
    expected_pairs = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    for prediction, reference, expected in zip(predictions, references, expected_pairs):
        scores = rouge.rouge([prediction], [reference], use_stemmer=use_stemmer)
        assert scores == pytest.approx({key: expected[key].fmeasure for key in rouge.ROUGE_KEYS}, abs=1e-12), (
            prediction,
            reference,
        )
    means = {key: sum(pair[key].fmeasure for pair in expected_pairs) / len(expected_pairs) for key in rouge.ROUGE_KEYS}
    assert rouge.rouge(predictions, references, use_stemmer=use_stemmer) == pytest.approx(means, abs=1e-12)


def dynamic_programming_lcs(reference: list[str], candidate: list[str]) -> tuple[int, set[int]]:
    """The LCS length and rouge_score's backtracked reference positions from the full
    table, as rouge.py computed them before its bit-parallel rows: the oracle."""
    table = [[0] * (len(candidate) + 1) for _ in range(len(reference) + 1)]
    for i, reference_token in enumerate(reference, start=1):
        for j, candidate_token in enumerate(candidate, start=1):
            if reference_token == candidate_token:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    positions, i, j = set(), len(reference), len(candidate)
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            positions.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return table[-1][-1], positions


def test_lcs_length_and_positions_match_the_full_table():
    """Bit-parallel LCS rows give the full table's length and the same backtracked positions,
    on short and long token lists over small vocabularies (many equal tokens, many tied paths)."""
    rng = random.Random(1)
    for _ in range(400):
        vocabulary = ROUGE_WORDS[: rng.randint(1, 6)]
        reference = [rng.choice(vocabulary) for _ in range(rng.choice([0, 1, 3, 15, 70, 130]))]
        candidate = [rng.choice(vocabulary) for _ in range(rng.choice([0, 1, 3, 15, 70, 130]))]
        length, positions = dynamic_programming_lcs(reference, candidate)
        assert rouge.lcs_length(reference, candidate) == length
        assert rouge.lcs_reference_positions(reference, candidate) == positions


# --- Entities (seqeval) --------------------------------------------------------


def test_entity_scores_on_hand_worked_example():
    references = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predictions = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    # The MISC chunk starts one token early: wrong. PER is right. 8 of 10 tags agree.
    assert entities.entity_scores(references, predictions) == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "accuracy": 0.8,
        "per_type": {
            "MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1},
            "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1},
        },
    }


def test_entity_scores_counts_predicted_only_types_and_partial_matches():
    references = [["B-PER", "I-PER", "O", "B-LOC"]]
    predictions = [["B-PER", "I-PER", "O", "B-ORG"]]
    scores = entities.entity_scores(references, predictions)
    # 1 of 2 predicted right, 1 of 2 actual found.
    assert (scores["precision"], scores["recall"], scores["f1"], scores["accuracy"]) == (0.5, 0.5, 0.5, 0.75)
    assert scores["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 0}
    assert scores["per_type"]["LOC"]["number"] == 1
    with pytest.raises(ValueError):
        entities.entity_scores([["O", "O"]], [["O"]])


def test_extract_entities_follows_conlleval_chunking():
    assert entities.extract_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O opens a chunk (IOB1); a type change closes one and opens another.
    assert entities.extract_entities(["O", "I-PER", "I-PER", "I-LOC"]) == [("PER", 1, 2), ("LOC", 3, 3)]
    assert entities.extract_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    # IOE: E- closes a chunk, the next I- opens one.
    assert entities.extract_entities(["I-ORG", "E-ORG", "I-ORG", "E-ORG", "S-LOC"]) == [
        ("ORG", 0, 1),
        ("ORG", 2, 3),
        ("LOC", 4, 4),
    ]
    # Sentences never share a chunk.
    scores = entities.entity_scores([["B-PER"], ["I-PER"]], [["B-PER"], ["I-PER"]])
    assert scores["per_type"]["PER"]["number"] == 2


ENTITY_TAGS = ["O"] * 6 + [f"{prefix}-{kind}" for prefix in "BIES" for kind in ("PER", "LOC", "ORG")]


def test_extract_entities_matches_seqeval_get_entities_even_on_odd_tags():
    sequence_labeling = pytest.importorskip("seqeval.metrics.sequence_labeling")
    odd_tags = ENTITY_TAGS + ["B", "I", "E", "S", ".", "X-PER", "B-PER-X", "I-", "BPER"]
    rng = random.Random(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about the odd tags
        for _ in range(1000):
            tags = [rng.choice(odd_tags) for _ in range(rng.randint(0, 12))]
            assert entities.extract_entities(tags) == sequence_labeling.get_entities(tags), tags


def test_entity_scores_match_seqeval():
    metrics = pytest.importorskip("seqeval.metrics")
    rng = random.Random(2)
    for _ in range(150):
        references, predictions = [], []
        for _ in range(rng.randint(1, 5)):
            length = rng.randint(0, 9)
            references.append([rng.choice(ENTITY_TAGS) for _ in range(length)])
            # Predictions mostly copy the reference so that chunks often match.
            predictions.append([tag if rng.random() < 0.7 else rng.choice(ENTITY_TAGS) for tag in references[-1]])
        if not any(references):
            continue
        scores = entities.entity_scores(references, predictions)
        assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(references, predictions))
        assert scores["precision"] == pytest.approx(metrics.precision_score(references, predictions, zero_division=0))
        assert scores["recall"] == pytest.approx(metrics.recall_score(references, predictions, zero_division=0))
        assert scores["f1"] == pytest.approx(metrics.f1_score(references, predictions, zero_division=0))
        if not scores["per_type"]:
            continue
        report = metrics.classification_report(references, predictions, output_dict=True, zero_division=0)
        assert scores["per_type"].keys() == {kind for kind in report if not kind.endswith(" avg")}
        for kind, row in scores["per_type"].items():
            expected = report[kind]
            assert row == pytest.approx(
                {
                    "precision": expected["precision"],
                    "recall": expected["recall"],
                    "f1": expected["f1-score"],
                    "number": expected["support"],
                }
            ), (references, predictions)


# --- SQuAD ---------------------------------------------------------------------


def test_normalize_answer():
    assert squad.normalize_answer("The Quick, Brown-fox!  an apple") == "quick brownfox apple"
    assert squad.normalize_answer("theatre An") == "theatre"  # articles only as whole words
    assert squad.normalize_answer(" The ") == ""


def test_squad_v1_takes_the_best_gold_answer():
    predictions = {"q1": "the Eiffel Tower", "q2": "Paris France", "q3": "anything"}
    references = {"q1": ["Eiffel Tower!", "tower"], "q2": ["in Paris", "France"], "q3": ["x"], "q4": ["y"]}
    # q1 exact. q2: vs "in paris" P=R=1/2 -> 1/2, vs "france" P=1/2 R=1 -> 2/3. q3 wrong. q4 unanswered -> 0.
    assert squad.squad_v1(predictions, references) == pytest.approx({"exact_match": 25.0, "f1": 100 * (1 + 2 / 3) / 4})
    # v1.1 gives no F1 credit when both sides normalise to nothing (v2.0 does).
    assert squad.squad_v1({"q": ""}, {"q": ["the"]}) == {"exact_match": 100.0, "f1": 0.0}


V2_REFERENCES = {"a": ["Denver Broncos"], "b": [], "c": ["1990"], "d": []}
V2_PREDICTIONS = {"a": "Broncos", "b": "", "c": "1990", "d": "something"}


def test_squad_v2_scores_answerable_and_unanswerable_questions():
    # a: EM 0, F1 2/3 (P=1, R=1/2). b: no answer, right -> 1, 1. c: 1, 1. d: answered an unanswerable -> 0, 0.
    # Best threshold with all probabilities 0: start at 2 (b, d right by answering nothing), then in
    # prediction order a (+0 / +2/3), b (0), c (+1), d (-1): peaks at 3 / 3 + 2/3 after c.
    assert squad.squad_v2(V2_PREDICTIONS, V2_REFERENCES) == pytest.approx(
        {
            "exact": 50.0,
            "f1": 100 * (2 / 3 + 2) / 4,
            "total": 4,
            "HasAns_exact": 50.0,
            "HasAns_f1": 100 * (2 / 3 + 1) / 2,
            "HasAns_total": 2,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
            "best_exact": 75.0,
            "best_exact_thresh": 0.0,
            "best_f1": 100 * (3 + 2 / 3) / 4,
            "best_f1_thresh": 0.0,
        }
    )


def test_squad_v2_best_thresholds_follow_no_answer_probabilities():
    probabilities = {"a": 0.9, "b": 0.8, "c": 0.1, "d": 0.95}
    # Answered in order c (+1 -> 3, best at 0.1), b (0), a (EM +0 / F1 +2/3 -> 3.67, best F1 at 0.9), d (-1).
    scores = squad.squad_v2(V2_PREDICTIONS, V2_REFERENCES, no_answer_probabilities=probabilities)
    assert scores["best_exact"] == pytest.approx(75.0)
    assert scores["best_exact_thresh"] == 0.1
    assert scores["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert scores["best_f1_thresh"] == 0.9
    # The default threshold 1.0 turns no prediction into "no answer".
    assert scores["exact"] == 50.0

    # Threshold 0.5: a, b and d become "no answer" -> a 0, b 1, d 1; c keeps its 1.
    thresholded = squad.squad_v2(V2_PREDICTIONS, V2_REFERENCES, no_answer_probabilities=probabilities, threshold=0.5)
    assert (thresholded["exact"], thresholded["f1"]) == (75.0, 75.0)
    assert (thresholded["HasAns_exact"], thresholded["NoAns_exact"], thresholded["NoAns_f1"]) == (50.0, 100.0, 100.0)

    # Threshold 0.05: every question becomes "no answer" -> a 0, b 1, c 0, d 1. The best-threshold
    # search still uses the scores of the predictions themselves.
    everything_unanswered = squad.squad_v2(
        V2_PREDICTIONS, V2_REFERENCES, no_answer_probabilities=probabilities, threshold=0.05
    )
    assert (everything_unanswered["exact"], everything_unanswered["f1"]) == (50.0, 50.0)
    assert {key: everything_unanswered[key] for key in ("best_exact", "best_exact_thresh", "best_f1_thresh")} == {
        "best_exact": 75.0,
        "best_exact_thresh": 0.1,
        "best_f1_thresh": 0.9,
    }


def test_squad_v2_edge_cases():
    # A gold list of answers that normalise to nothing is scored as "no answer", yet counts as answerable.
    scores = squad.squad_v2({"q": ""}, {"q": ["The"]})
    assert (scores["exact"], scores["f1"], scores["HasAns_total"]) == (100.0, 100.0, 1)
    assert "NoAns_total" not in scores
    # Gold answers that normalise to nothing are dropped when real ones remain.
    assert squad.squad_v2({"q": ""}, {"q": ["the", "Denver"]})["exact"] == 0.0
    with pytest.raises(ValueError, match="no prediction"):
        squad.squad_v2({}, {"q": ["x"]})
    with pytest.raises(ValueError, match="no-answer probability"):
        squad.squad_v2({"q": "x"}, {"q": ["x"]}, no_answer_probabilities={})


# --- Word error rate -------------------------------------------------------------


def test_word_error_rate_on_hand_worked_example():
    # "sat" -> "sit" and an inserted "down" (2 errors), "world" deleted (1 error); 5 reference words.
    assert wer.word_error_rate(["the cat sit down", "hello"], ["the cat sat", "hello world"]) == pytest.approx(0.6)
    assert wer.word_error_rate(["  a   b "], ["a b"]) == 0.0
    assert wer.word_error_rate(["x y z"], ["a"]) == 3.0  # one substitution, two insertions
    assert wer.word_edit_distance(["a", "b", "c", "d"], ["b", "c", "d", "a"]) == 2


def test_word_error_rate_splits_words_as_jiwer():
    # A lone tab is not a word boundary in jiwer's default transform; runs of 2+ whitespace are.
    assert wer.split_words(" a\tb  c \t d\n") == ["a\tb", "c", "d"]
    with pytest.raises(ValueError):
        wer.word_error_rate(["a"], ["  "])
    with pytest.raises(ValueError):
        wer.word_error_rate(["a"], ["a", "b"])


def random_transcript(rng: random.Random, min_words: int) -> str:
    words = [rng.choice("a b c d e the cat dog".split()) for _ in range(rng.randint(min_words, 10))]
    separators = [rng.choice([" ", " ", " ", "  ", "\t", " \n "]) for _ in words]
    return rng.choice(["", " "]) + "".join(word + separator for word, separator in zip(words, separators))


def test_word_error_rate_matches_jiwer():
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(3)
    for _ in range(200):
        count = rng.randint(1, 4)
        references = [random_transcript(rng, min_words=1) for _ in range(count)]
        predictions = [random_transcript(rng, min_words=0) for _ in range(count)]
        assert wer.word_error_rate(predictions, references) == pytest.approx(jiwer.wer(references, predictions)), (
            predictions,
            references,
        )
