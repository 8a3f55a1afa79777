#!/usr/bin/env python
"""Fine-tune a Flax model for token classification (named entities, POS or chunk tags).

Data: JSON Lines (or CSV) with a list of words and a list of string (IOB2) or
integer tags per example; the columns are `tokens` and `<task>_tags` when
present (else the first two), or --text_column_name / --label_column_name.
Each word's tag goes to its first sub-word token; the others are ignored, or
with --label_all_tokens get the tag too (B-X becoming I-X). Entity-level
precision, recall and F1 (seqeval's rules, computed offline) and tag accuracy
go to eval_results.json; --return_entity_level_metrics adds per-type scores.
--do_predict writes predictions.txt: one line of tags per example.

    python examples/token-classification/run_flax_ner.py \\
        --model_name_or_path fixtures/models/tiny-bert --output_dir out \\
        --train_file fixtures/data/entities/train.json --validation_file fixtures/data/entities/validation.json \\
        --do_train --do_eval
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax_finetune import scripts
from flax_finetune.arguments import DataArguments, ModelArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli

# Byte-level BPE tokenizers need a space before words given one by one.
PREFIX_SPACE_MODELS = ("roberta", "roberta-prelayernorm", "gpt2", "bart", "longformer", "deberta")


@dataclasses.dataclass
class TokenClassificationDataArguments(DataArguments):
    """Data: files (or a hub dataset), columns, tags and sequence length."""

    task_name: str = arg("ner", "The tag column is <task_name>_tags when present (ner, pos, chunk).")
    text_column_name: Optional[str] = arg(None, "Column of the word lists (default: tokens, else the first).")
    label_column_name: Optional[str] = arg(None, "Column of the tag lists (default: <task_name>_tags, else the second).")
    max_seq_length: Optional[int] = arg(None, "Tokens per example after truncation (default: the model's maximum).")
    pad_to_max_length: bool = arg(
        False, "Pad every example to --max_seq_length (default: to the longest of each split, rounded up to 8)."
    )
    label_all_tokens: bool = arg(False, "Tag every sub-word token of a word, not only the first.")
    return_entity_level_metrics: bool = arg(False, "Also report precision, recall, F1 and count per entity type.")


def tag_names(splits: dict, label_column: str) -> list:
    """Tag names: the dataset's class names, else the sorted tags of the training split (or the first split)."""
    source = splits["train"] if "train" in splits else next(iter(splits.values()))
    feature = source.features[label_column]
    names = getattr(getattr(feature, "feature", None), "names", None)
    if names:
        return list(names)
    return sorted({tag for tags in source[label_column] for tag in tags})


def align_labels(word_ids: list, word_labels: list[int], label_all_tokens: bool, inside_of: dict[int, int]) -> list[int]:
    """One label per token: the word's label on its first token, -100 on special tokens.

    Later tokens of a word get -100, or with `label_all_tokens` the word's
    label, turned from B-X into I-X (`inside_of`).
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(word_labels[word])
        else:
            labels.append(inside_of.get(word_labels[word], word_labels[word]) if label_all_tokens else -100)
        previous = word
    return labels


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, TokenClassificationDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=(".json", ".jsonl", ".csv"))

    from flax_finetune import entities

    columns = next(iter(splits.values())).column_names
    text_column = data_args.text_column_name or ("tokens" if "tokens" in columns else columns[0])
    tag_column = f"{data_args.task_name}_tags"
    label_column = data_args.label_column_name or (tag_column if tag_column in columns else columns[min(1, len(columns) - 1)])
    for split, dataset in splits.items():
        scripts.require_columns(dataset, [text_column] + ([label_column] if split != "test" else []), data_args, split)
    labelled = {split: dataset for split, dataset in splits.items() if label_column in dataset.column_names}
    names = tag_names(labelled or splits, label_column) if labelled else None
    if names is None:
        raise InputError("no split has tags: give a training or validation file with a tag column")
    label_to_id = {name: index for index, name in enumerate(names)}
    scripts.require_known_labels(splits, label_column, set(label_to_id), nested=True)
    inside_of = {
        index: label_to_id[f"I-{name[2:]}"]
        for name, index in label_to_id.items()
        if isinstance(name, str) and name.startswith("B-") and f"I-{name[2:]}" in label_to_id
    }

    tokenizer = run.tokenizer(model_args)
    config = run.config(model_args, tokenizer)
    if config.model_type in PREFIX_SPACE_MODELS:
        tokenizer = run.tokenizer(model_args, add_prefix_space=True)
    if not tokenizer.is_fast:
        raise InputError("token classification needs a fast tokenizer (it maps tokens back to words)")
    config.num_labels = len(names)
    config.label2id = {str(name): index for name, index in label_to_id.items()}
    config.id2label = {index: str(name) for name, index in label_to_id.items()}
    max_length = scripts.max_sequence_length(data_args.max_seq_length, tokenizer, config)
    input_names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]

    def tokenize(batch):
        """Tokens and aligned labels; a split without tags gets label 0 on each word's first token,
        which marks where predictions are read."""
        encoded = tokenizer(batch[text_column], is_split_into_words=True, truncation=True, max_length=max_length)
        word_labels = (
            [[label_to_id[tag] for tag in tags] for tags in batch[label_column]]
            if label_column in batch else [[0] * len(words) for words in batch[text_column]]
        )
        return {
            **{name: encoded[name] for name in input_names},
            "labels": [
                align_labels(encoded.word_ids(index), labels, data_args.label_all_tokens and label_column in batch, inside_of)
                for index, labels in enumerate(word_labels)
            ],
        }

    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
                  "token_type_ids": tokenizer.pad_token_type_id, "labels": -100}
    length = max_length if data_args.pad_to_max_length else None
    rows = {split: run.tokenize(dataset, tokenize, pad_values, length, data_args) for split, dataset in splits.items()}

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "token-classification", config)

    def token_losses(params, batch, weights, **kwargs):
        """Per-example loss sums and tagged-token counts ([batch]) and the logits [batch, length, tags]."""
        logits = model(params, **{name: batch[name] for name in input_names}, **kwargs).logits
        loss_sums, counts = losses.cross_entropy(
            logits, batch["labels"], losses.token_weights(weights, batch["labels"] >= 0), per_example=True
        )
        return loss_sums, counts, logits

    def loss_fn(params, batch, dropout_rng):
        loss_sums, counts, _ = token_losses(params, batch, batch["example_mask"], dropout_rng=dropout_rng, train=True)
        return loss_sums.sum(), counts.sum()

    def predict_fn(params, batch):
        loss_sums, counts, logits = token_losses(params, batch, jnp.ones_like(batch["example_mask"]), train=False)
        return {"loss_sum": loss_sums, "count": counts, "predictions": jnp.argmax(logits, -1), "labels": batch["labels"]}

    def tags(outputs) -> tuple[list[list[str]], list[list[str]]]:
        """(reference, predicted) tag names of every labelled token, per example."""
        references, predictions = [], []
        for labels, predicted in zip(outputs["labels"], outputs["predictions"]):
            kept = labels >= 0
            references.append([str(names[i]) for i in labels[kept]])
            predictions.append([str(names[i]) for i in predicted[kept]])
        return references, predictions

    def compute_metrics(outputs, split):
        scores = entities.entity_scores(*tags(outputs))
        results = {
            "loss": float(outputs["loss_sum"].sum() / max(outputs["count"].sum(), 1)),
            **{name: scores[name] for name in ("precision", "recall", "f1", "accuracy")},
        }
        if data_args.return_entity_level_metrics:
            for entity_type, values in scores["per_type"].items():
                results.update({f"{entity_type}_{name}": value for name, value in values.items()})
        return results

    def write_predictions(outputs, split):
        if split == "test":
            run.output.write_text("predictions.txt", "".join(" ".join(line) + "\n" for line in tags(outputs)[1]))

    test_has_labels = "test" in splits and label_column in splits["test"].column_names
    run.train_evaluate_predict(
        model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics, write_predictions, test_has_labels
    )


if __name__ == "__main__":
    run_cli(main)
