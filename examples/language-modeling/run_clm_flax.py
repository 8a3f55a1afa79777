#!/usr/bin/env python
"""Fine-tune (or train from scratch) a causal language model such as GPT-2 with Flax.

Data: plain text (.txt), or CSV / JSON Lines with a `text` column (else the
first column). All texts are tokenized, concatenated and cut into
--block_size blocks; the last, shorter block is padded and masked, so every
token counts once. Writes eval_results.json with eval_loss and
eval_perplexity (and test_results.json with --do_predict).

    python examples/language-modeling/run_clm_flax.py \\
        --model_name_or_path fixtures/models/tiny-gpt2 --output_dir out \\
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt \\
        --do_train --do_eval --block_size 128

Train from scratch with --model_type gpt2 (or --config_name) and --tokenizer_name.
With --streaming (and --max_steps) the training data is read as a stream and
tokenized as training goes, for corpora too large to prepare up front.

Instruction data: JSON Lines (or CSV) with `prompt` and `completion` columns, or
JSON Lines with a `messages` column (chat turns, rendered with the tokenizer's chat
template). The loss, eval_loss and eval_perplexity count only the completion (or
assistant) tokens (--completion_only_loss); examples are packed into --block_size
blocks without attention across examples (--packing; see flax_finetune.instructions):

    python examples/language-modeling/run_clm_flax.py \\
        --model_name_or_path fixtures/models/tiny-gpt2 --output_dir out \\
        --train_file fixtures/data/instructions/train.jsonl \\
        --validation_file fixtures/data/instructions/validation.jsonl \\
        --do_train --do_eval --block_size 64 --learning_rate 5e-3 --num_train_epochs 4
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax_finetune import instructions, metrics, scripts
from flax_finetune.arguments import ModelArguments, TextDataArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import run_cli


@dataclasses.dataclass
class LanguageModelingDataArguments(TextDataArguments):
    """Data: text files (or a hub dataset) and the block length."""

    block_size: Optional[int] = arg(None, "Tokens per training block (default: the model's maximum, at most 1024).")
    streaming: bool = arg(
        False, "Read the training text as a stream (datasets' iterable datasets), tokenized as training goes, for "
        "corpora too large to prepare on disk; needs --max_steps. Evaluation and test splits are read in full "
        "(limit them with --max_eval_samples / --max_predict_samples)."
    )
    shuffle_buffer_size: int = arg(10_000, "With --streaming: texts in the buffer that shuffles the stream.")
    completion_only_loss: bool = arg(
        True, "Instruction data: loss on the completion (or assistant turn) tokens only; False: on every token."
    )
    packing: bool = arg(
        True, "Instruction data: pack several examples into each block (each attends only to itself); False: "
        "one example per block."
    )


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, LanguageModelingDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=scripts.TEXT_EXTENSIONS)

    from flax_finetune import data

    tokenizer = run.tokenizer(model_args)
    config = run.config(model_args, tokenizer)
    block_size = scripts.max_sequence_length(data_args.block_size, tokenizer, config)
    if data_args.block_size is None:
        block_size = min(block_size, 1024)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    row_format = instructions.splits_format(splits)

    def to_blocks(split, dataset):
        if split == "train" and data_args.streaming:
            return scripts.streamed_blocks(dataset, tokenizer, data_args, training_args, block_size)
        if row_format is not None:
            tokenized = instructions.tokenized_split(dataset, row_format, tokenizer, data_args.completion_only_loss,
                                                     data_args)
            return instructions.PackedRows(tokenized, block_size, pad_id, data_args.packing)
        return data.TokenBlocks(scripts.token_stream(dataset, tokenizer, data_args, True), block_size, pad_id)

    rows = {split: to_blocks(split, dataset) for split, dataset in scripts.consume(splits)}

    from flax_finetune import losses

    model = run.model(model_args, "causal-lm", config)
    # instruction blocks also carry segment_ids, position_ids and loss_mask (the targets)
    model_inputs = ("input_ids", "attention_mask") + (() if row_format is None else ("segment_ids", "position_ids"))
    targets = "attention_mask" if row_format is None else "loss_mask"

    def token_losses(params, batch, **kwargs):
        """Next-token loss sum and count per block: ([batch], [batch])."""
        logits = model(params, **{name: batch[name] for name in model_inputs}, **kwargs).logits
        weights = losses.token_weights(batch["example_mask"], batch[targets][:, 1:])
        return losses.cross_entropy(logits[:, :-1], batch["input_ids"][:, 1:], weights, per_example=True)

    def loss_fn(params, batch, dropout_rng):
        loss_sums, counts = token_losses(params, batch, dropout_rng=dropout_rng, train=True)
        return loss_sums.sum(), counts.sum()

    def predict_fn(params, batch):
        loss_sums, counts = token_losses(params, batch, train=False)
        return {"loss_sum": loss_sums, "count": counts}

    def compute_metrics(outputs, split):
        loss = float(outputs["loss_sum"].sum() / max(outputs["count"].sum(), 1))
        return {"loss": loss, "perplexity": metrics.perplexity(loss)}

    run.train_evaluate_predict(model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics)


if __name__ == "__main__":
    run_cli(main)
