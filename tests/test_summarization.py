"""run_summarization_flax end to end (pretrained tiny T5): train, evaluate, predict with generate."""

from __future__ import annotations

import json

from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import rouge
from learning import Bar, assert_fine_tuning_learned

# ROUGE x100 on the test split.
BARS = [Bar("test_rouge1", 78), Bar("test_rouge2", 55), Bar("test_rougeL", 75), Bar("test_rougeLsum", 75)]
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
        "--num_train_epochs=20", "--warmup_steps=20", "--do_train", "--do_predict",
        "--learning_rate=2e-3", "--per_device_train_batch_size=8", "--per_device_eval_batch_size=4",
        "--predict_with_generate", "--disable_tqdm",
    ]


def rows(split) -> list[dict]:
    return [json.loads(line) for line in (SUMMARIES / f"{split}.json").read_text().splitlines()]


def trivial_summary_scores() -> dict:
    """The best test_ ROUGE any trivial summarizer reaches, metric by metric: lead-1 (each
    document's first sentence) and every constant summary (one training summary for every document)."""
    documents, references = zip(*((row["document"], row["summary"]) for row in rows("test")))
    candidates = [[rouge.split_sentences(document)[0] for document in documents]]
    candidates += [[summary] * len(references) for summary in sorted({row["summary"] for row in rows("train")})]
    best: dict[str, float] = {}
    for predictions in candidates:
        for name, value in rouge.rouge_with_sentence_split(list(predictions), list(references)).items():
            best[f"test_{name}"] = max(best.get(f"test_{name}", 0.0), 100 * value)
    return best


def test_fine_tuning_learns_to_summarize(tmp_path):
    starting = summarization_command(tmp_path / "start")
    starting.remove("--do_train")
    summarization().main(starting)
    summarization().main(summarization_command(tmp_path / "trained"))

    test = read_results(tmp_path / "trained", "test")
    assert_fine_tuning_learned(BARS, {"test_loss": 1.0, "test_rouge1": 20, "test_rouge2": 20},
                               baseline=trivial_summary_scores(), starting=read_results(tmp_path / "start", "test"),
                               trained=test)
    assert 5 <= test["test_gen_len"] <= 20
    predictions = (tmp_path / "trained" / "generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 16 and all(" met " in line for line in predictions)


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
