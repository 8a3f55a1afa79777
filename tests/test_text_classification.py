"""End to end: run_flax_glue on the fixture data with the tiny fixture models."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np

from conftest import DATA, MODELS, load_script, read_log, read_results
from flax_finetune import metrics
from learning import Bar, assert_fine_tuning_learned


PAIR_BARS = [Bar("eval_accuracy", 0.8), Bar("eval_f1", 0.8)]
SINGLE_BARS = [Bar("eval_accuracy", 0.8), Bar("eval_f1", 0.8)]
REGRESSION_BARS = [Bar("eval_pearson", 0.8), Bar("eval_mse", 2.0, lower_is_better=True)]


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


def labels(path, column="label") -> list:
    """The label column of a CSV or JSON Lines fixture."""
    if path.suffix == ".csv":
        with open(path, newline="") as stream:
            return [row[column] for row in csv.DictReader(stream)]
    return [json.loads(line)[column] for line in path.read_text().splitlines()]


def majority_class_scores(train, validation) -> dict:
    """eval_accuracy and eval_f1 of always predicting the training split's most frequent label
    (classes in sorted order, the second one positive, as the script scores them)."""
    classes = sorted(set(train))
    majority = classes.index(Counter(train).most_common(1)[0][0])
    references = np.array([classes.index(label) for label in validation])
    predictions = np.full_like(references, majority)
    return {"eval_accuracy": metrics.accuracy(predictions, references),
            "eval_f1": metrics.binary_f1(predictions, references, positive=1)}


def assert_paraphrase_learned(tmp_path, model: str = "tiny-bert", learning_rate: str = "1e-4") -> dict:
    """Run the paraphrase command from `model` (fixture name) and show that it learned: the majority
    class and the starting checkpoint (evaluated without a training file) fail PAIR_BARS, the trained
    run passes them with margins. Every model family's learning check uses it. Returns the trained results."""
    starting_command = paraphrase_command(tmp_path / "start", model)
    del starting_command[starting_command.index("--train_file"):starting_command.index("--train_file") + 2]
    glue().main(starting_command + ["--do_eval"])  # without a training file: evaluation only
    trained_command = paraphrase_command(tmp_path / "trained", model)
    trained_command[trained_command.index("--learning_rate=1e-4")] = f"--learning_rate={learning_rate}"
    glue().main(trained_command)

    baseline = majority_class_scores(labels(DATA / "paraphrase" / "train.csv"), labels(DATA / "paraphrase" / "validation.csv"))
    trained = read_results(tmp_path / "trained")
    assert_fine_tuning_learned(PAIR_BARS, {"eval_loss": 0.1, "eval_accuracy": 0.25}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=trained)
    return trained


def test_fine_tuning_learns_sentence_pairs_with_string_labels(tmp_path):
    trained = assert_paraphrase_learned(tmp_path)
    assert trained["eval_samples"] == 24
    evaluations = [record for record in read_log(tmp_path / "trained") if "eval_accuracy" in record]
    assert [record["step"] for record in evaluations[:3]] == [50, 100, 150]  # --eval_steps=50 honoured
    config = (tmp_path / "trained" / "config.json").read_text()
    assert '"not_equivalent"' in config and (tmp_path / "trained" / "tokenizer.json").exists()


def test_max_samples_flags_cut_the_splits(tmp_path):
    args = paraphrase_command(tmp_path) + ["--max_train_samples", "10", "--max_eval_samples", "5", "--num_train_epochs", "1"]
    glue().main(args)
    assert read_results(tmp_path, "train")["train_samples"] == 10
    assert read_results(tmp_path, "train")["train_steps"] == 5  # 10 examples in batches of 2
    assert read_results(tmp_path)["eval_samples"] == 5


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
    assert sum(p == g for p, g in zip(predicted, gold)) / len(gold) >= PAIR_BARS[0].threshold
    assert read_results(tmp_path, "test")["test_accuracy"] >= PAIR_BARS[0].threshold


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


def test_fine_tuning_learns_single_sentences_with_integer_labels_from_json_lines(tmp_path):
    glue().main(small_task_command(tmp_path / "start", "reviews", "jsonl", 5e-4, False))
    glue().main(small_task_command(tmp_path / "trained", "reviews", "jsonl", 5e-4, True))
    reviews = DATA / "reviews"
    baseline = majority_class_scores(labels(reviews / "train.jsonl"), labels(reviews / "validation.jsonl"))
    assert_fine_tuning_learned(SINGLE_BARS, {"eval_loss": 0.1, "eval_accuracy": 0.25}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))


def test_fine_tuning_learns_a_regression_from_float_labels(tmp_path):
    glue().main(small_task_command(tmp_path / "start", "similarity", "csv", 1e-3, False, "--label_column_name", "score"))
    glue().main(small_task_command(tmp_path / "trained", "similarity", "csv", 1e-3, True, "--label_column_name", "score"))
    train = np.array(labels(DATA / "similarity" / "train.csv", "score"), float)
    validation = np.array(labels(DATA / "similarity" / "validation.csv", "score"), float)
    constant = np.full_like(validation, train.mean())  # the training mean: the best constant guess
    baseline = {"eval_mse": metrics.mean_squared_error(constant, validation), "eval_pearson": metrics.pearson(constant, validation)}
    trained = read_results(tmp_path / "trained")
    assert "eval_accuracy" not in trained
    assert_fine_tuning_learned(REGRESSION_BARS, {"eval_mse": 2.0, "eval_pearson": 0.3}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=trained)
