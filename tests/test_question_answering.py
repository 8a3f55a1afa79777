"""run_qa end to end (tiny BERT, SQuAD v2 fixture), both JSON layouts, long contexts, answer search."""

from __future__ import annotations

import json

import numpy as np

import pytest

from conftest import DATA, MODELS, load_script, read_results

F1, HAS_ANSWER_F1 = 40, 25  # trained: ~54 / 38; untrained: ~6 / 9. Answering nothing scores HasAns 0.
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


def test_fine_tuning_answers_questions(tmp_path):
    qa().main(qa_command(tmp_path))
    results = read_results(tmp_path)
    assert results["eval_f1"] >= F1 and results["eval_HasAns_f1"] >= HAS_ANSWER_F1
    assert results["eval_HasAns_total"] == 16 and results["eval_NoAns_total"] == 8
    predictions = json.loads((tmp_path / "eval_predictions.json").read_text())
    nbest = json.loads((tmp_path / "eval_nbest_predictions.json").read_text())
    null_odds = json.loads((tmp_path / "eval_null_odds.json").read_text())
    assert len(predictions) == len(nbest) == len(null_odds) == 24
    first = next(iter(nbest.values()))
    assert abs(sum(candidate["probability"] for candidate in first) - 1) < 1e-6


def test_untrained_model_fails_the_thresholds(tmp_path):
    args = qa_command(tmp_path)
    args.remove("--do_train")
    qa().main(args)
    results = read_results(tmp_path)
    assert results["eval_f1"] < F1 and results["eval_HasAns_f1"] < HAS_ANSWER_F1


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
