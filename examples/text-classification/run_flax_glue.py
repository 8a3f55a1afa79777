#!/usr/bin/env python
"""Fine-tune a Flax model for sentence or sentence-pair classification (or regression).

Data: CSV or JSON Lines files with one or two text columns and a label column
(string or integer labels; float labels mean regression), or a GLUE task
from the hub with --task_name. Writes eval_results.json (eval_accuracy, plus
eval_f1 for two classes; eval_pearson / eval_spearmanr / eval_mse for
regression) and, with --do_predict, predict_results.txt.

    python examples/text-classification/run_flax_glue.py \\
        --model_name_or_path fixtures/models/tiny-bert --output_dir out \\
        --train_file fixtures/data/paraphrase/train.csv \\
        --validation_file fixtures/data/paraphrase/validation.csv

Without any --do_* flag it trains when a training file is given and
evaluates when a validation file is given, as the Transformers example did.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from flax_finetune import metrics, scripts
from flax_finetune.arguments import DataArguments, ModelArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli

GLUE_TEXT_COLUMNS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


@dataclasses.dataclass
class ClassificationModelArguments(ModelArguments):
    """Model: which weights, config and tokenizer to start from."""

    use_slow_tokenizer: bool = arg(False, "Use the Python tokenizer (same as --use_fast_tokenizer false).")


@dataclasses.dataclass
class ClassificationDataArguments(DataArguments):
    """Data: files or a GLUE task, columns and sequence length."""

    task_name: Optional[str] = arg(None, "GLUE task to load from the hub: " + ", ".join(GLUE_TEXT_COLUMNS) + ".")
    text_column_name: Optional[str] = arg(
        None, "Text column, or two comma-separated columns for pairs (default: sentence1,sentence2 "
        "when present, else the first one or two non-label columns)."
    )
    label_column_name: str = arg("label", "Label column.")
    max_seq_length: Optional[int] = arg(None, "Tokens per example after truncation (default: the tokenizer's maximum).")
    pad_to_max_length: bool = arg(
        False, "Pad every example to --max_seq_length (default: to the longest example of each split, "
        "rounded up to a multiple of 8: still one shape per split, less padding)."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in GLUE_TEXT_COLUMNS:
                raise InputError(f"--task_name {self.task_name}: use one of {', '.join(GLUE_TEXT_COLUMNS)}")
            self.dataset_name, self.dataset_config_name = "nyu-mll/glue", self.task_name
        elif not (self.train_file or self.validation_file or self.test_file):
            raise InputError("give --task_name or at least one of --train_file, --validation_file, --test_file")


def text_columns(column_names: list[str], data_args: ClassificationDataArguments) -> list[str]:
    """The one or two columns holding the text of an example."""
    if data_args.task_name:
        return [name for name in GLUE_TEXT_COLUMNS[data_args.task_name] if name]
    if data_args.text_column_name:
        return [name.strip() for name in data_args.text_column_name.split(",")]
    if "sentence1" in column_names and "sentence2" in column_names:
        return ["sentence1", "sentence2"]
    others = [name for name in column_names if name not in (data_args.label_column_name, "idx")]
    return others[:2]


def label_names(splits: dict, label_column: str, config_labels: Optional[dict]) -> Optional[list]:
    """Sorted class labels (None for regression), from the training split when there is one.

    Without training data the model's own label2id is used when it names real
    labels, else the labels of the evaluation split.
    """
    source = next(splits[split] for split in ("train", "validation", "test") if split in splits)
    feature = source.features[label_column]
    if getattr(feature, "names", None):
        return list(feature.names)
    if feature.dtype in ("float32", "float64"):
        return None
    if "train" not in splits and config_labels and not all(name.startswith("LABEL_") for name in config_labels):
        return sorted(config_labels, key=config_labels.get)
    return sorted(set(source[label_column]))


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ClassificationModelArguments, ClassificationDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = data_args.train_file is not None
        training_args.do_eval = data_args.validation_file is not None or data_args.task_name is not None
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=(".csv", ".json", ".jsonl"))

    reference = next(iter(splits.values()))
    columns = text_columns(reference.column_names, data_args)
    for split, dataset in splits.items():
        needed = columns + ([data_args.label_column_name] if split != "test" else [])
        scripts.require_columns(dataset, needed, data_args, split)
    model_args.use_fast_tokenizer = model_args.use_fast_tokenizer and not model_args.use_slow_tokenizer
    tokenizer = run.tokenizer(model_args)
    config = run.config(model_args, tokenizer)
    labels = label_names(
        {s: d for s, d in splits.items() if data_args.label_column_name in d.column_names},
        data_args.label_column_name,
        getattr(config, "label2id", None),
    )
    is_regression = labels is None
    label_to_id = None if is_regression else {label: index for index, label in enumerate(labels)}
    if not is_regression:
        scripts.require_known_labels(splits, data_args.label_column_name, set(label_to_id) | {-1})
        config.update(
            {"label2id": {str(k): v for k, v in label_to_id.items()},
             "id2label": {v: str(k) for k, v in label_to_id.items()}}
        )
    config.num_labels = 1 if is_regression else len(labels)
    config.problem_type = "regression" if is_regression else "single_label_classification"
    max_length = scripts.max_sequence_length(data_args.max_seq_length, tokenizer, config)
    input_names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]

    def tokenize(examples):
        texts = [examples[name] for name in columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded = {name: encoded[name] for name in input_names}
        if data_args.label_column_name in examples:
            raw = examples[data_args.label_column_name]
            encoded["labels"] = (
                [float(value) for value in raw] if is_regression else [label_to_id.get(value, -1) for value in raw]
            )
        return encoded

    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id}
    length = max_length if data_args.pad_to_max_length else None
    rows = {split: run.tokenize(dataset, tokenize, pad_values, length, data_args) for split, dataset in splits.items()}

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "sequence-classification", config)

    def losses_and_logits(params, batch, weights, **kwargs):
        """Loss sums and counts (both [batch] with per_example) and the logits [batch, num_labels]."""
        logits = model(params, **{name: batch[name] for name in input_names}, **kwargs).logits
        if is_regression:
            return (*losses.squared_error(logits[..., 0], batch["labels"], weights, per_example=True), logits)
        return (*losses.cross_entropy(logits, batch["labels"], weights, per_example=True), logits)

    def loss_fn(params, batch, dropout_rng):
        loss_sum, count, _ = losses_and_logits(params, batch, batch["example_mask"], dropout_rng=dropout_rng, train=True)
        return loss_sum.sum(), count.sum()

    def predict_fn(params, batch):
        if "labels" not in batch:  # an unlabelled test file: predictions only
            batch = {**batch, "labels": jnp.zeros(batch["example_mask"].shape, jnp.float32 if is_regression else jnp.int32)}
        loss, _, logits = losses_and_logits(params, batch, jnp.ones_like(batch["example_mask"]), train=False)
        predictions = logits[..., 0] if is_regression else jnp.argmax(logits, axis=-1)
        return {"predictions": predictions, "labels": batch["labels"], "loss": loss}

    def compute_metrics(outputs, split):
        predictions, references = outputs["predictions"], outputs["labels"]
        if is_regression:
            return {
                "loss": float(np.mean(outputs["loss"])),
                "pearson": metrics.pearson(predictions, references),
                "spearmanr": metrics.spearman(predictions, references),
                "mse": metrics.mean_squared_error(predictions, references),
            }
        scores = {"loss": float(np.mean(outputs["loss"])), "accuracy": metrics.accuracy(predictions, references)}
        if len(labels) == 2:
            scores["f1"] = metrics.binary_f1(predictions, references, positive=1)
        return scores

    def write_predictions(outputs, split):
        if split != "test":
            return
        names = outputs["predictions"] if is_regression else [labels[int(i)] for i in outputs["predictions"]]
        lines = "".join(f"{index}\t{name}\n" for index, name in enumerate(names))
        run.output.write_text("predict_results.txt", "index\tprediction\n" + lines)

    test_has_labels = "test" in splits and data_args.label_column_name in splits["test"].column_names
    run.train_evaluate_predict(
        model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics, write_predictions, test_has_labels
    )


if __name__ == "__main__":
    run_cli(main)
