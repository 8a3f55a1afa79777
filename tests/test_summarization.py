"""run_summarization_flax end to end (pretrained tiny T5): train, evaluate, predict with generate."""

from __future__ import annotations

import pytest

from conftest import DATA, MODELS, load_script, read_results


# ROUGE x100 on the test split; the fine-tuned tiny T5 reaches about 66 / 35 / 62 / 62.
THRESHOLDS = {"rouge1": 40, "rouge2": 15, "rougeL": 35, "rougeLsum": 35}
SUMMARIES = DATA / "summaries"


def summarization():
    return load_script("summarization/run_summarization_flax.py")


def summarization_command(output_dir, *model):
    return [
        *(model or ("--model_name_or_path", str(MODELS / "tiny-t5"))),
        "--train_file", str(SUMMARIES / "train.json"),
        "--validation_file", str(SUMMARIES / "validation.json"),
        "--test_file", str(SUMMARIES / "test.json"),
        "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--num_train_epochs=3", "--warmup_steps=8", "--do_train", "--do_eval", "--do_predict",
        "--learning_rate=2e-4", "--per_device_train_batch_size=2", "--per_device_eval_batch_size=1",
        "--predict_with_generate", "--disable_tqdm",
    ]


def test_fine_tuning_learns_to_summarize(tmp_path):
    summarization().main(summarization_command(tmp_path))
    test = read_results(tmp_path, "test")
    for name, threshold in THRESHOLDS.items():
        assert test[f"test_{name}"] >= threshold, name
    assert 5 <= test["test_gen_len"] <= 20
    assert read_results(tmp_path)["eval_rouge1"] >= THRESHOLDS["rouge1"]
    predictions = (tmp_path / "generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 16 and all(" met " in line for line in predictions)


def test_untrained_model_fails_the_thresholds(tmp_path):
    random_t5 = ("--model_type", "t5", "--config_name", str(MODELS / "tiny-t5"), "--tokenizer_name", str(MODELS / "tiny-t5"))
    args = summarization_command(tmp_path, *random_t5)
    args.remove("--do_train")
    args.remove("--do_eval")
    summarization().main(args)
    test = read_results(tmp_path, "test")
    assert all(test[f"test_{name}"] < threshold for name, threshold in THRESHOLDS.items())


def test_beam_search_and_column_flags(tmp_path):
    """--num_beams 3 with explicit columns, a prefix and label smoothing, evaluation only."""
    summarization().main([
        "--model_name_or_path", str(MODELS / "tiny-t5"), "--output_dir", str(tmp_path),
        "--validation_file", str(SUMMARIES / "validation.json"), "--do_eval", "--predict_with_generate",
        "--num_beams", "3", "--text_column", "document", "--summary_column", "summary",
        "--source_prefix", "summarize: ", "--label_smoothing_factor", "0.1", "--max_eval_samples", "4",
        "--val_max_target_length", "24", "--disable_tqdm",
    ])
    results = read_results(tmp_path)
    assert results["eval_samples"] == 4 and 0 < results["eval_gen_len"] <= 24
