"""run_flax_ner end to end (tiny BERT) and label alignment."""

from __future__ import annotations

import json

from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import entities
from learning import Bar, assert_fine_tuning_learned, evaluation_only

BARS = [Bar("eval_f1", 0.7), Bar("eval_accuracy", 0.9)]
ENTITIES = DATA / "entities"


def ner():
    return load_script("token-classification/run_flax_ner.py")


def ner_command(output_dir, *extra):
    return [
        "--model_name_or_path", str(MODELS / "tiny-bert"),
        "--train_file", str(ENTITIES / "train.json"), "--validation_file", str(ENTITIES / "validation.json"),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--do_train", "--do_eval",
        "--warmup_steps=2", "--learning_rate=2e-4", "--logging_steps", "25", "--eval_steps", "75",
        "--per_device_train_batch_size=2", "--per_device_eval_batch_size=2", "--num_train_epochs=2",
        "--seed", "7", "--disable_tqdm", *extra,
    ]


def all_outside_scores(path) -> dict:
    """eval_f1 and eval_accuracy of tagging every word `O` (no entity at all)."""
    tags = [json.loads(line)["ner_tags"] for line in path.read_text().splitlines()]
    scores = entities.entity_scores(tags, [["O"] * len(sentence) for sentence in tags])
    return {"eval_f1": scores["f1"], "eval_accuracy": scores["accuracy"]}


def test_fine_tuning_finds_entities(tmp_path):
    command = ner_command(tmp_path / "trained", "--return_entity_level_metrics", "--do_predict",
                          "--test_file", str(ENTITIES / "validation.json"))
    ner().main(evaluation_only(ner_command(tmp_path / "start")))
    ner().main(command)

    results = read_results(tmp_path / "trained")
    assert_fine_tuning_learned(BARS, {"eval_loss": 0.5, "eval_f1": 0.5}, baseline=all_outside_scores(ENTITIES / "validation.json"),
                               starting=read_results(tmp_path / "start"), trained=results)
    for entity_type in ("PER", "LOC", "ORG"):
        assert results[f"eval_{entity_type}_number"] > 0 and f"eval_{entity_type}_f1" in results
    predictions = (tmp_path / "trained" / "predictions.txt").read_text().splitlines()
    assert len(predictions) == 40 and predictions[0].split()[0] in ("B-PER", "B-ORG", "O")


def test_labels_go_to_first_sub_tokens_or_all_of_them():
    word_ids = [None, 0, 1, 1, 1, 2, None]
    b_per, i_per, other = 0, 1, 2
    assert ner().align_labels(word_ids, [other, b_per, i_per], False, {b_per: i_per}) == [-100, 2, 0, -100, -100, 1, -100]
    assert ner().align_labels(word_ids, [other, b_per, i_per], True, {b_per: i_per}) == [-100, 2, 0, 1, 1, 1, -100]
