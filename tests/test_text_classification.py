"""End to end: run_flax_glue on the fixture data with the tiny fixture models."""

from __future__ import annotations

import csv

import pytest

from conftest import DATA, MODELS, load_script, read_log, read_results


# Thresholds the trained tiny models pass and the untrained ones fail (both shown below).
PAIR_ACCURACY = 0.8
SINGLE_ACCURACY = 0.8
REGRESSION_PEARSON = 0.8
REGRESSION_MSE = 1.0


def glue():
    return load_script("text-classification/run_flax_glue.py")


def paraphrase_command(output_dir, model="tiny-bert"):
    """The command line users of the Transformers example know, with fixture paths."""
    return [
        "--model_name_or_path", str(MODELS / model),
        "--output_dir", str(output_dir),
        "--train_file", str(DATA / "paraphrase" / "train.csv"),
        "--validation_file", str(DATA / "paraphrase" / "validation.csv"),
        "--per_device_train_batch_size=2",
        "--per_device_eval_batch_size=1",
        "--learning_rate=1e-4",
        "--eval_steps=50",
        "--warmup_steps=2",
        "--seed=42",
        "--max_seq_length=128",
        "--disable_tqdm",
    ]


def test_sentence_pairs_with_string_labels(tmp_path):
    glue().main(paraphrase_command(tmp_path))

    results = read_results(tmp_path)
    assert results["eval_accuracy"] >= PAIR_ACCURACY
    assert results["eval_f1"] >= PAIR_ACCURACY
    assert results["eval_samples"] == 24
    evaluations = [record for record in read_log(tmp_path) if "eval_accuracy" in record]
    assert [record["step"] for record in evaluations[:3]] == [50, 100, 150]  # --eval_steps=50 honoured
    config = (tmp_path / "config.json").read_text()
    assert '"not_equivalent"' in config and (tmp_path / "tokenizer.json").exists()


def test_max_samples_flags_cut_the_splits(tmp_path):
    args = paraphrase_command(tmp_path) + ["--max_train_samples", "10", "--max_eval_samples", "5", "--num_train_epochs", "1"]
    glue().main(args)
    assert read_results(tmp_path, "train")["train_samples"] == 10
    assert read_results(tmp_path, "train")["train_steps"] == 5  # 10 examples in batches of 2
    assert read_results(tmp_path)["eval_samples"] == 5


def test_untrained_model_fails_the_pair_threshold(tmp_path):
    args = paraphrase_command(tmp_path)
    args.remove("--train_file")
    args.remove(str(DATA / "paraphrase" / "train.csv"))
    glue().main(args + ["--do_eval"])
    assert read_results(tmp_path)["eval_accuracy"] < PAIR_ACCURACY


def test_predict_writes_label_names_with_distilbert(tmp_path):
    glue().main(
        paraphrase_command(tmp_path, model="tiny-distilbert")
        + ["--do_train", "--do_predict", "--test_file", str(DATA / "paraphrase" / "test.csv"), "--eval_steps=1000"]
    )
    lines = (tmp_path / "predict_results.txt").read_text().splitlines()
    with open(DATA / "paraphrase" / "test.csv", newline="") as stream:
        gold = [row["label"] for row in csv.DictReader(stream)]
    predicted = [line.split("\t")[1] for line in lines[1:]]
    assert lines[0] == "index\tprediction" and len(predicted) == len(gold)
    assert sum(p == g for p, g in zip(predicted, gold)) / len(gold) >= PAIR_ACCURACY
    assert read_results(tmp_path, "test")["test_accuracy"] >= PAIR_ACCURACY


def small_task_command(output_dir, task, extension, learning_rate, train, *extra):
    """A short run on the reviews or similarity fixture; `train` adds --do_train on its training file."""
    folder = DATA / task
    training = ["--do_train", "--train_file", str(folder / f"train.{extension}")] if train else []
    return [
        "--model_name_or_path", str(MODELS / "tiny-bert"),
        "--output_dir", str(output_dir),
        "--validation_file", str(folder / f"validation.{extension}"),
        "--per_device_train_batch_size=4",
        f"--learning_rate={learning_rate}",
        "--num_train_epochs=3",
        "--disable_tqdm",
        "--do_eval",
        *training,
        *extra,
    ]


@pytest.mark.parametrize("train", [True, False], ids=["trained", "untrained"])
def test_single_sentences_with_integer_labels_from_json_lines(tmp_path, train):
    glue().main(small_task_command(tmp_path, "reviews", "jsonl", 5e-4, train))
    results = read_results(tmp_path)
    if train:
        assert results["eval_accuracy"] >= SINGLE_ACCURACY and "eval_f1" in results
    else:
        assert results["eval_accuracy"] < SINGLE_ACCURACY


@pytest.mark.parametrize("train", [True, False], ids=["trained", "untrained"])
def test_float_labels_train_a_regression(tmp_path, train):
    glue().main(small_task_command(tmp_path, "similarity", "csv", 1e-3, train, "--label_column_name", "score"))
    results = read_results(tmp_path)
    assert "eval_accuracy" not in results
    if train:
        assert results["eval_mse"] <= REGRESSION_MSE and results["eval_pearson"] >= REGRESSION_PEARSON
    else:
        assert results["eval_mse"] > REGRESSION_MSE and results["eval_pearson"] < REGRESSION_PEARSON
