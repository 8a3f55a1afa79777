"""run_qa end to end (tiny BERT, SQuAD v2 fixture), both JSON layouts, long contexts, answer search."""

from __future__ import annotations

import json

import numpy as np

import pytest

from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import squad
from learning import Bar, assert_fine_tuning_learned, evaluation_only

BARS = [Bar("eval_f1", 40), Bar("eval_exact", 40), Bar("eval_HasAns_f1", 25)]
SQUAD = DATA / "squad"


def qa():
    return load_script("question-answering/run_qa.py")


def qa_command(output_dir, *extra):
    return [
        "--model_name_or_path", str(MODELS / "tiny-bert"), "--version_2_with_negative",
        "--train_file", str(SQUAD / "train.json"), "--validation_file", str(SQUAD / "validation.json"),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--num_train_epochs=3", "--warmup_steps=2",
        "--do_train", "--do_eval", "--logging_steps", "50", "--eval_steps", "150", "--learning_rate=2e-4",
        "--per_device_train_batch_size=2", "--per_device_eval_batch_size=1", "--disable_tqdm", *extra,
    ]


def no_answer_scores(path) -> dict:
    """The SQuAD v2 scores (eval_ keys) of answering nothing to every question."""
    references = {record["id"]: record["answers"]["text"] for record in json.loads(path.read_text())["data"]}
    scores = squad.squad_v2(dict.fromkeys(references, ""), references)
    return {f"eval_{name}": value for name, value in scores.items()}


def test_fine_tuning_answers_questions(tmp_path):
    qa().main(evaluation_only(qa_command(tmp_path / "start")))
    qa().main(qa_command(tmp_path / "trained"))

    results = read_results(tmp_path / "trained")
    assert_fine_tuning_learned(BARS, {"eval_f1": 20, "eval_HasAns_f1": 20}, baseline=no_answer_scores(SQUAD / "validation.json"),
                               starting=read_results(tmp_path / "start"), trained=results)
    assert results["eval_HasAns_total"] == 16 and results["eval_NoAns_total"] == 8
    output = tmp_path / "trained"
    predictions = json.loads((output / "eval_predictions.json").read_text())
    nbest = json.loads((output / "eval_nbest_predictions.json").read_text())
    null_odds = json.loads((output / "eval_null_odds.json").read_text())
    assert len(predictions) == len(nbest) == len(null_odds) == 24
    first = next(iter(nbest.values()))
    assert abs(sum(candidate["probability"] for candidate in first) - 1) < 1e-6


def test_nested_and_flat_layouts_read_the_same(tmp_path):
    import datasets

    nested = datasets.load_dataset("json", data_files=str(SQUAD / "train.json"), field="data", split="train")
    flat_records = qa().flatten_squad(nested)
    (tmp_path / "flat.json").write_text(json.dumps({"data": flat_records.to_list()}))
    flat = qa().flatten_squad(datasets.load_dataset("json", data_files=str(tmp_path / "flat.json"), field="data", split="train"))
    assert flat_records.to_list() == flat.to_list()
    assert len(flat) == 300 and set(flat.column_names) == {"id", "title", "context", "question", "answers"}


def answerable_only(source, target):
    """A SQuAD v1 file: the flat records of `source` that have an answer."""
    records = [r for r in json.loads(source.read_text())["data"] if r["answers"]["text"]]
    target.write_text(json.dumps({"data": records}))
    return target


def test_long_contexts_split_into_windows_and_predict(tmp_path):
    """Short windows (64 tokens, stride 16) and --do_predict with SQuAD v1 semantics."""
    test_file = answerable_only(SQUAD / "validation.json", tmp_path / "v1.json")
    qa().main([
        "--model_name_or_path", str(MODELS / "tiny-bert"), "--train_file", str(test_file),
        "--test_file", str(test_file), "--output_dir", str(tmp_path / "out"), "--do_train", "--do_predict",
        "--max_seq_length", "64", "--doc_stride", "16", "--max_predict_samples", "6",
        "--num_train_epochs", "1", "--disable_tqdm",
    ])
    results = read_results(tmp_path / "out", "test")
    assert results["test_samples"] > 6  # windows, not questions: the contexts were split
    assert {"test_exact", "test_f1"} <= set(results) and "test_HasAns_f1" not in results
    assert len(json.loads((tmp_path / "out" / "test_predictions.json").read_text())) == 6


def test_best_answer_and_null_threshold():
    script = qa()
    context = "Ada met Hugo at the mill."
    features = {
        "example_index": np.array([0]), "cls_index": np.array([0]),
        "offset_start": np.array([[-1, 0, 4, 8, 13, 16, 20, -1]]),
        "offset_end": np.array([[-1, 3, 7, 12, 15, 19, 25, -1]]),
    }
    outputs = {"start_logits": np.array([[1.0, 0, 0, 5, 0, 0, 0, 0]]),
               "end_logits": np.array([[1.0, 0, 0, 4, 0, 0, 0, 0]])}
    args = script.QuestionAnsweringDataArguments(version_2_with_negative=True, n_best_size=3)
    answers, nbests, null_odds = script.answer_all(outputs, features, ["q"], [context], args)
    assert answers == {"q": "Hugo"} and null_odds == {"q": 2.0 - 9.0}
    # the other top-3 starts and ends (tokens 0 and 7) lie outside the context
    assert [candidate["text"] for candidate in nbests["q"]] == ["Hugo", ""]
    args.null_score_diff_threshold = -8.0  # a bar the span cannot clear: answer nothing
    assert script.answer_all(outputs, features, ["q"], [context], args)[0] == {"q": ""}


def loop_best_answers(context: str, windows: list, args) -> tuple:
    """The answer search run_qa.py had before it was vectorised, kept as the oracle: one question's
    (answer, n-best, null-score difference) from its windows' (start_logits, end_logits,
    offset_start, offset_end, cls_index), looping over the n_best_size x n_best_size pairs."""
    candidates, null_score = [], None
    for start_logits, end_logits, offset_start, offset_end, cls_index in windows:
        window_null = float(start_logits[cls_index] + end_logits[cls_index])
        null_score = window_null if null_score is None else min(null_score, window_null)
        starts = np.argsort(start_logits)[::-1][: args.n_best_size]
        ends = np.argsort(end_logits)[::-1][: args.n_best_size]
        for start in starts:
            for end in ends:
                if offset_start[start] < 0 or offset_end[end] < 0 or end < start:
                    continue
                if end - start + 1 > args.max_answer_length:
                    continue
                candidates.append({"text": context[offset_start[start] : offset_end[end]],
                                   "start_logit": float(start_logits[start]), "end_logit": float(end_logits[end])})
    candidates.sort(key=lambda candidate: candidate["start_logit"] + candidate["end_logit"], reverse=True)
    best_span = candidates[0] if candidates else None
    if args.version_2_with_negative:
        candidates.append({"text": "", "start_logit": null_score / 2, "end_logit": null_score / 2})
        candidates.sort(key=lambda candidate: candidate["start_logit"] + candidate["end_logit"], reverse=True)
    nbest = candidates[: args.n_best_size] or [{"text": "", "start_logit": 0.0, "end_logit": 0.0}]
    scores = np.array([c["start_logit"] + c["end_logit"] for c in nbest])
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    nbest = [{**candidate, "probability": float(p)} for candidate, p in zip(nbest, probabilities)]
    if not args.version_2_with_negative:
        return (best_span["text"] if best_span else ""), nbest, None
    if best_span is None:
        return "", nbest, None
    difference = null_score - (best_span["start_logit"] + best_span["end_logit"])
    return ("" if difference > args.null_score_diff_threshold else best_span["text"]), nbest, difference


def random_windows(rng, questions: int, length: int):
    """(ids, contexts, features, outputs) of 1-4 windows per question, shuffled between questions, with
    logits in steps of 0.5 (many exact ties, the null score's included), context tokens at varying
    places and a [CLS] at 0 or at the end, as left-padding tokenizers put it."""
    contexts = [" ".join(f"w{index}" for index in range(question, question + 60)) for question in range(questions)]
    example_index = rng.permutation(np.repeat(np.arange(questions), rng.integers(1, 5, questions)))
    windows = len(example_index)
    offset_start = np.full((windows, length), -1)
    offset_end = np.full((windows, length), -1)
    cls_index = np.where(rng.random(windows) < 0.8, 0, length - 1)
    for window in range(windows):
        first = int(rng.integers(1, length // 3))
        tokens = np.arange(first, int(rng.integers(first + 1, length - 1)))
        characters = np.sort(rng.choice(len(contexts[example_index[window]]) - 2, len(tokens), replace=False))
        offset_start[window, tokens], offset_end[window, tokens] = characters, characters + 2
    logits = {name: (np.round(rng.normal(size=(windows, length)) * 2) / 2).astype(np.float32)
              for name in ("start_logits", "end_logits")}
    features = {"example_index": example_index, "cls_index": cls_index,
                "offset_start": offset_start, "offset_end": offset_end}
    return [f"q{question}" for question in range(questions)], contexts, features, logits


@pytest.mark.parametrize("version_2, n_best_size, max_answer_length, threshold", [
    (True, 20, 30, 0.0), (True, 5, 3, -1.5), (True, 3, 1, 2.0), (False, 20, 30, 0.0), (False, 7, 4, 0.0),
])
def test_answer_search_gives_what_the_loop_over_pairs_gave(version_2, n_best_size, max_answer_length, threshold):
    """Answers, n-best lists (order, texts, logits, probabilities) and null-score differences are
    exactly the loop's, ties and all, on random windows of several questions."""
    script = qa()
    args = script.QuestionAnsweringDataArguments(
        version_2_with_negative=version_2, n_best_size=n_best_size, max_answer_length=max_answer_length,
        null_score_diff_threshold=threshold,
    )
    rng = np.random.default_rng(n_best_size * 100 + max_answer_length)
    ids, contexts, features, outputs = random_windows(rng, questions=25, length=48)
    answers, nbests, null_odds = script.answer_all(outputs, features, ids, contexts, args)
    for question, (question_id, context) in enumerate(zip(ids, contexts)):
        windows = [
            (outputs["start_logits"][window], outputs["end_logits"][window], features["offset_start"][window],
             features["offset_end"][window], int(features["cls_index"][window]))
            for window in np.flatnonzero(features["example_index"] == question)
        ]
        expected = loop_best_answers(context, windows, args)
        assert (answers[question_id], nbests[question_id], null_odds[question_id]) == expected
    if version_2:  # both outcomes occur: a span, and nothing
        assert 0 < sum(answer == "" for answer in answers.values()) < len(ids)
