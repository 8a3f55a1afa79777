#!/usr/bin/env python
"""Fine-tune a sequence-to-sequence model (T5, BART, mBART, Pegasus, Marian) for summarization with Flax.

Data: CSV or JSON Lines with a document and a summary column (--text_column /
--summary_column; by default the first of document, text, article, dialogue
and of summary, highlights, else the first two columns). With
--predict_with_generate, evaluation and prediction generate summaries
(greedy, or beam search with --num_beams) and score them with ROUGE-1/2/L/Lsum
(x100, stemmed; Lsum on sentences split offline) and gen_len. Writes
eval_results.json and test_results.json, and with --do_predict the
summaries, one per line, to generated_predictions.txt. --source_lang / --target_lang set the
language codes of mBART and multi-target Marian tokenizers (see seq2seq.language_settings).

    python examples/summarization/run_summarization_flax.py \\
        --model_name_or_path fixtures/models/tiny-t5 --output_dir out \\
        --train_file fixtures/data/summaries/train.json --validation_file fixtures/data/summaries/validation.json \\
        --do_train --do_eval --predict_with_generate
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from flax_finetune import scripts
from flax_finetune.arguments import DataArguments, ModelArguments, Seq2SeqArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli

TEXT_COLUMNS = ("document", "text", "article", "dialogue")
SUMMARY_COLUMNS = ("summary", "highlights")


@dataclasses.dataclass
class SummarizationDataArguments(DataArguments):
    """Data: files (or a hub dataset), columns and lengths."""

    text_column: Optional[str] = arg(None, "Column of the documents (default: see above).")
    summary_column: Optional[str] = arg(None, "Column of the summaries (default: see above).")
    source_prefix: str = arg("", "Text put before every document, e.g. 'summarize: ' for T5.")
    max_source_length: int = arg(1024, "Document tokens kept (longer documents are truncated).")
    max_target_length: int = arg(128, "Summary tokens kept for training.")
    val_max_target_length: Optional[int] = arg(
        None, "Summary tokens kept for evaluation and prediction, and the generation limit (default: --max_target_length)."
    )
    source_lang: Optional[str] = arg(None, "Language code of the documents, for mBART tokenizers (e.g. en_XX).")
    target_lang: Optional[str] = arg(
        None, "Language code of the summaries: mBART (e.g. de_DE: the tokenizer's target language, the decoder "
        "start or the first generated token), Marian with several targets (e.g. fr: >>fr<< before each document)."
    )
    forced_bos_token: Optional[str] = arg(
        None, "Token forced as the first generated token (e.g. mBART-50's target language code)."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


def pick_column(requested: Optional[str], known: tuple[str, ...], columns: list[str], position: int) -> str:
    """The requested column, else the first known name present, else the column at `position`."""
    if requested:
        return requested
    return next((name for name in known if name in columns), columns[min(position, len(columns) - 1)])


def main(argv=None):
    model_args, data_args, seq2seq_args, training_args = parse_args(
        (ModelArguments, SummarizationDataArguments, Seq2SeqArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=(".csv", ".json", ".jsonl"))

    from flax_finetune import data, rouge, seq2seq

    columns = next(iter(splits.values())).column_names
    text_column = pick_column(data_args.text_column, TEXT_COLUMNS, columns, 0)
    summary_column = pick_column(data_args.summary_column, SUMMARY_COLUMNS, columns, 1)
    if text_column == summary_column:
        raise InputError(f"the data needs a document and a summary column; found only {', '.join(columns)}")
    for split, dataset in splits.items():
        scripts.require_columns(dataset, [text_column, summary_column], data_args, split)
    tokenizer = run.tokenizer(model_args)
    languages = seq2seq.language_settings(
        tokenizer, data_args.source_lang, data_args.target_lang, data_args.forced_bos_token
    )
    source_prefix = languages.pop("source_prefix", "") + data_args.source_prefix
    config = run.config(model_args, tokenizer)
    start_id = languages.get("decoder_start_token_id", None)
    start_id = seq2seq.decoder_start_token_id(config) if start_id is None else start_id
    target_lengths = {"train": data_args.max_target_length}

    def tokenizer_for(split):
        def tokenize(batch):
            documents = [source_prefix + str(text) for text in batch[text_column]]
            encoded = tokenizer(documents, truncation=True, max_length=data_args.max_source_length)
            targets = tokenizer(
                text_target=[str(text) for text in batch[summary_column]],
                truncation=True, max_length=target_lengths.get(split, data_args.val_max_target_length),
            )
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                    "labels": targets["input_ids"]}
        return tokenize

    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}

    def with_decoder_inputs(columns, indices, epoch):
        return {**columns, "decoder_input_ids": seq2seq.shift_right(columns["labels"], start_id, tokenizer.pad_token_id)}

    rows = {split: data.MappedRows(run.tokenize(dataset, tokenizer_for(split), pad_values, None, data_args),
                                   with_decoder_inputs) for split, dataset in splits.items()}

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "seq2seq-lm", config)
    generation = seq2seq.generation_options(
        model, seq2seq.target_length_limit(data_args.val_max_target_length, config), seq2seq_args.num_beams
    )
    generation.update(languages)

    def target_losses(params, batch, weights, **kwargs):
        """Per-example label-smoothed loss sums and target token counts, both [batch]."""
        logits = model(
            params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["labels"] >= 0, **kwargs,
        ).logits
        return losses.cross_entropy(
            logits, batch["labels"], losses.token_weights(weights, batch["labels"] >= 0),
            label_smoothing=seq2seq_args.label_smoothing_factor, per_example=True,
        )

    def loss_fn(params, batch, dropout_rng):
        loss_sums, counts = target_losses(params, batch, batch["example_mask"], dropout_rng=dropout_rng, train=True)
        return loss_sums.sum(), counts.sum()

    def predict_fn(params, batch):
        loss_sums, counts = target_losses(params, batch, jnp.ones_like(batch["example_mask"]), train=False)
        outputs = {"loss_sum": loss_sums, "count": counts, "labels": batch["labels"]}
        if seq2seq_args.predict_with_generate:
            outputs["generated"] = model.generate(
                params, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, **generation
            )
        return outputs

    def compute_metrics(outputs, split):
        scores = {"loss": float(outputs["loss_sum"].sum() / max(outputs["count"].sum(), 1))}
        if seq2seq_args.predict_with_generate:
            summaries = seq2seq.decode(tokenizer, outputs["generated"])
            scores.update({name: 100 * value for name, value in rouge.rouge_with_sentence_split(
                summaries, seq2seq.decode(tokenizer, outputs["labels"])).items()})
            scores["gen_len"] = float(np.mean(np.sum(outputs["generated"] != tokenizer.pad_token_id, axis=-1)))
        return scores

    def write_predictions(outputs, split):
        if split == "test" and seq2seq_args.predict_with_generate:
            text = "".join(line.replace("\n", " ") + "\n" for line in seq2seq.decode(tokenizer, outputs["generated"]))
            run.output.write_text("generated_predictions.txt", text)

    run.train_evaluate_predict(model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics, write_predictions)


if __name__ == "__main__":
    run_cli(main)
