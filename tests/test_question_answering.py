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
    offsets_start = np.array([-1, 0, 4, 8, 13, 16, 20, -1])
    offsets_end = np.array([-1, 3, 7, 12, 15, 19, 25, -1])
    start_logits = np.array([1.0, 0, 0, 5, 0, 0, 0, 0])
    end_logits = np.array([1.0, 0, 0, 4, 0, 0, 0, 0])
    window = (start_logits, end_logits, offsets_start, offsets_end, 0)
    args = script.QuestionAnsweringDataArguments(version_2_with_negative=True, n_best_size=3)
    answer, nbest, difference = script.best_answers({"context": context}, [window], args)
    assert answer == "Hugo" and difference == 2.0 - 9.0
    args.null_score_diff_threshold = -8.0  # a bar the span cannot clear: answer nothing
    assert script.best_answers({"context": context}, [window], args)[0] == ""
