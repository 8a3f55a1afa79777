#!/usr/bin/env python
"""Fine-tune (or train from scratch) a masked language model such as BERT or RoBERTa with Flax.

Data: plain text (.txt), or CSV / JSON Lines with a `text` column (else the
first column). By default all texts are tokenized, concatenated and cut into
blocks of --max_seq_length tokens (special tokens included); with
--line_by_line every non-empty line is one example. Each time a batch is
used, --mlm_probability of its real tokens are chosen (never special tokens
or padding): 80% become the mask token, 10% a random token, 10% stay. Writes
eval_results.json with eval_loss, eval_accuracy (of the chosen tokens) and
eval_perplexity.

    python examples/language-modeling/run_mlm_flax.py \\
        --model_name_or_path fixtures/models/tiny-roberta --output_dir out \\
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt \\
        --do_train --do_eval --max_seq_length 128
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from flax_finetune import metrics, scripts
from flax_finetune.arguments import ModelArguments, TextDataArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli


@dataclasses.dataclass
class MaskedLanguageModelingDataArguments(TextDataArguments):
    """Data: text files (or a hub dataset), sequence length and masking."""

    max_seq_length: Optional[int] = arg(None, "Tokens per example (default: the model's maximum, at most 512).")
    mlm_probability: float = arg(0.15, "Fraction of the real tokens chosen for prediction.")
    line_by_line: bool = arg(False, "One example per non-empty line instead of concatenated blocks.")
    pad_to_max_length: bool = arg(
        False, "With --line_by_line: pad every line to --max_seq_length (default: to the longest line, rounded up to 8)."
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise InputError(f"--mlm_probability {self.mlm_probability}: must be between 0 and 1")


def mask_tokens(rng, input_ids, special_tokens_mask, attention_mask, probability: float, mask_id: int, vocab_size: int):
    """Choose and corrupt tokens for masked language modelling (jax, one example).

    input_ids, special_tokens_mask, attention_mask: [length]. Returns
    (corrupted input_ids [length], labels [length]) where labels hold the
    original id at chosen positions and -100 elsewhere.
    """
    import jax
    import jax.numpy as jnp

    choose_key, mask_key, random_key, token_key = jax.random.split(rng, 4)
    eligible = (special_tokens_mask == 0) & (attention_mask == 1)
    chosen = jax.random.bernoulli(choose_key, probability, input_ids.shape) & eligible
    to_mask = chosen & jax.random.bernoulli(mask_key, 0.8, input_ids.shape)
    to_random = chosen & ~to_mask & jax.random.bernoulli(random_key, 0.5, input_ids.shape)
    random_ids = jax.random.randint(token_key, input_ids.shape, 0, vocab_size, dtype=input_ids.dtype)
    corrupted = jnp.where(to_mask, mask_id, jnp.where(to_random, random_ids, input_ids))
    return corrupted, jnp.where(chosen, input_ids, -100)


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer puts around one sequence, e.g. [CLS] / [SEP].

    Read off an encoded probe word, which works with every Transformers
    version (Transformers 5 dropped build_inputs_with_special_tokens).
    """
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    framed = tokenizer("hello")["input_ids"]
    start = next(i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain)
    return framed[:start], framed[start + len(plain) :]


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, MaskedLanguageModelingDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=scripts.TEXT_EXTENSIONS)

    from flax_finetune import data

    tokenizer = run.tokenizer(model_args)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no mask or padding token: masked language modelling needs both")
    config = run.config(model_args, tokenizer)
    max_length = scripts.max_sequence_length(data_args.max_seq_length, tokenizer, config)
    if data_args.max_seq_length is None:
        max_length = min(max_length, 512)

    def to_rows(dataset):
        text_column = scripts.text_column(dataset.column_names)
        if data_args.line_by_line:
            dataset = dataset.filter(lambda example: bool(str(example[text_column]).strip()))
            tokenize = lambda batch: tokenizer(
                batch[text_column], truncation=True, max_length=max_length, return_special_tokens_mask=True,
                return_token_type_ids=False,
            )
            pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "special_tokens_mask": 1}
            length = max_length if data_args.pad_to_max_length else None
            rows = run.tokenize(dataset, tokenize, pad_values, length, data_args)
        else:
            prefix, suffix = special_token_frame(tokenizer)
            stream = scripts.token_stream(dataset, tokenizer, data_args, add_special_tokens=False)
            rows = data.TokenBlocks(stream, max_length, tokenizer.pad_token_id, prefix, suffix,
                                    special_tokens_mask=True)
        return data.MappedRows(rows, lambda columns, indices, epoch: {**columns, "row_index": indices.astype(np.int32)})

    rows = {split: to_rows(dataset) for split, dataset in scripts.consume(splits)}

    import jax
    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "masked-lm", config)
    mask_one = jax.vmap(
        lambda key, *columns: mask_tokens(
            key, *columns, data_args.mlm_probability, tokenizer.mask_token_id, config.vocab_size
        )
    )

    def masked_losses(params, batch, rng, **kwargs):
        """Per-example (loss sum, chosen tokens, correct predictions), each [batch].

        Every example draws its mask from (rng, its row index), so the same
        example is masked the same way whatever the batch or device layout.
        """
        keys = jax.vmap(lambda index: jax.random.fold_in(rng, index))(batch["row_index"])
        input_ids, labels = mask_one(keys, batch["input_ids"], batch["special_tokens_mask"], batch["attention_mask"])
        logits = model(params, input_ids=input_ids, attention_mask=batch["attention_mask"], **kwargs).logits
        weights = losses.token_weights(batch["example_mask"], labels >= 0)
        loss_sums, counts = losses.cross_entropy(logits, labels, weights, per_example=True)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weights, axis=-1)
        return loss_sums, counts, correct

    def loss_fn(params, batch, dropout_rng):
        mask_rng, dropout_rng = jax.random.split(dropout_rng)
        loss_sums, counts, _ = masked_losses(params, batch, mask_rng, dropout_rng=dropout_rng, train=True)
        return loss_sums.sum(), counts.sum()

    evaluation_rng = jax.random.PRNGKey(training_args.seed)

    def predict_fn(params, batch):
        loss_sums, counts, correct = masked_losses(params, batch, evaluation_rng, train=False)
        return {"loss_sum": loss_sums, "count": counts, "correct": correct}

    def compute_metrics(outputs, split):
        count = max(float(outputs["count"].sum()), 1.0)
        loss = float(outputs["loss_sum"].sum()) / count
        return {"loss": loss, "accuracy": float(outputs["correct"].sum()) / count, "perplexity": metrics.perplexity(loss)}

    run.train_evaluate_predict(model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics)


if __name__ == "__main__":
    run_cli(main)
