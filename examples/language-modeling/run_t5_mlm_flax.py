#!/usr/bin/env python
"""Pretrain (or keep pretraining) a T5 model with span corruption, in Flax.

Data: plain text (.txt), or CSV / JSON Lines with a `text` column (else the
first column). Texts are tokenized, concatenated and cut into chunks just
long enough that, after corruption, every input is exactly --max_seq_length
tokens. In each chunk --mlm_probability of the tokens, in spans of
--mean_noise_span_length on average, are replaced in the input by one
sentinel per span (the tokenizer's <extra_id_0>, <extra_id_1>, ...); the
target lists each sentinel followed by the tokens it hid; both end with EOS.
Spans are drawn anew each epoch from (seed, epoch, chunk). Writes
eval_results.json with eval_loss and eval_accuracy (of target tokens).

    python examples/language-modeling/run_t5_mlm_flax.py \\
        --model_name_or_path fixtures/models/tiny-t5 --output_dir out \\
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt \\
        --do_train --do_eval --max_seq_length 128
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from flax_finetune import scripts
from flax_finetune.arguments import ModelArguments, TextDataArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli


@dataclasses.dataclass
class SpanCorruptionDataArguments(TextDataArguments):
    """Data: text files (or a hub dataset) and the span corruption."""

    max_seq_length: Optional[int] = arg(None, "Tokens per corrupted input (default: the tokenizer's maximum, at most 512).")
    mlm_probability: float = arg(0.15, "Noise density: the fraction of tokens hidden.")
    mean_noise_span_length: float = arg(3.0, "Mean length of a hidden span.")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise InputError(f"--mlm_probability {self.mlm_probability}: must be between 0 and 1")
        if self.mean_noise_span_length < 1:
            raise InputError("--mean_noise_span_length must be at least 1")


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 computes them."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    spans = max(int(round(min(noise, length - noise) / mean_span)), 1)
    return noise, spans


def input_and_target_lengths(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(raw chunk length, target length) so a corrupted chunk is exactly `inputs_length` tokens.

    A chunk of t tokens with n noise tokens in s spans becomes an input of
    t - n + s + 1 tokens (one sentinel per span, EOS) and a target of
    n + s + 1. Returns the largest t whose input fits, and its target length.
    """

    def lengths(raw: int) -> tuple[int, int]:
        noise = int(round(raw * density))
        spans = int(round(noise / mean_span))
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    targets = lengths(raw)[1]
    if density == 0.5 and targets > lengths(raw)[0]:  # T5's adjustment for density one half
        raw -= 1
        targets -= 1
    return raw, targets


def random_segmentation(rng: np.random.Generator, items: int, segments: int) -> np.ndarray:
    """Split `items` into `segments` random positive lengths (summing to `items`)."""
    cuts = np.sort(rng.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate(([0], cuts, [items])))


def noise_mask(rng: np.random.Generator, length: int, density: float, mean_span: float) -> np.ndarray:
    """[length] booleans: alternating clean and noise spans, starting clean."""
    noise, spans = span_counts(length, density, mean_span)
    noise_lengths = random_segmentation(rng, noise, spans)
    clean_lengths = random_segmentation(rng, length - noise, spans)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), interleaved)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one chunk, both ending with EOS.

    tokens, mask: [length]. In the input each noise span becomes its
    sentinel (the i-th span the i-th sentinel); the target is every sentinel
    followed by the tokens its span hid.
    """
    span_starts = mask & ~np.concatenate(([False], mask[:-1]))
    span_index = np.maximum(np.cumsum(span_starts) - 1, 0)
    inputs = np.where(span_starts, sentinels[span_index], tokens)[~mask | span_starts]
    hidden = tokens[mask]
    targets = np.insert(hidden, np.flatnonzero(span_starts[mask]), sentinels[: span_starts.sum()])
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def sentinel_ids(tokenizer, needed: int) -> np.ndarray:
    """Ids of <extra_id_0>, <extra_id_1>, ... looked up by name; an error if fewer than `needed` exist."""
    vocabulary = tokenizer.get_vocab()
    ids = []
    while f"<extra_id_{len(ids)}>" in vocabulary:
        ids.append(vocabulary[f"<extra_id_{len(ids)}>"])
    if len(ids) < needed:
        raise InputError(
            f"the tokenizer has {len(ids)} sentinel tokens (<extra_id_0>, ...) but span corruption of "
            f"these inputs needs {needed}: use a T5 tokenizer, or a shorter --max_seq_length"
        )
    return np.asarray(ids[:needed], dtype=np.int32)


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, SpanCorruptionDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=scripts.TEXT_EXTENSIONS)

    from flax_finetune import data

    tokenizer = run.tokenizer(model_args)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no end-of-sequence token: span corruption appends one to every chunk")
    config = run.config(model_args, tokenizer)
    input_length = data_args.max_seq_length or min(tokenizer.model_max_length, 512)
    raw_length, target_length = input_and_target_lengths(
        input_length, data_args.mlm_probability, data_args.mean_noise_span_length
    )
    _, spans = span_counts(raw_length, data_args.mlm_probability, data_args.mean_noise_span_length)
    sentinels = sentinel_ids(tokenizer, spans)

    def to_chunks(dataset):
        stream = scripts.token_stream(dataset, tokenizer, data_args, add_special_tokens=False)
        if len(stream) < raw_length:
            raise InputError(f"the text has {len(stream)} tokens, fewer than one chunk of {raw_length}")
        return data.TokenBlocks(stream, raw_length, pad_id=0, drop_last=True)  # the last partial chunk dropped: no padding

    def corrupt_rows(columns, indices, epoch):
        inputs, labels = [], []
        for tokens, index in zip(columns["input_ids"], indices):
            rng = np.random.default_rng([training_args.seed, epoch, int(index)])
            mask = noise_mask(rng, raw_length, data_args.mlm_probability, data_args.mean_noise_span_length)
            corrupted, target = corrupt(tokens, mask, sentinels, tokenizer.eos_token_id)
            inputs.append(corrupted)
            labels.append(target)
        labels = np.stack(labels)
        decoder_inputs = np.concatenate([np.full((len(labels), 1), config.decoder_start_token_id), labels[:, :-1]], 1)
        return {"input_ids": np.stack(inputs), "labels": labels, "decoder_input_ids": decoder_inputs.astype(np.int32)}

    rows = {split: data.MappedRows(to_chunks(dataset), corrupt_rows) for split, dataset in scripts.consume(splits)}

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "seq2seq-lm", config)

    def target_losses(params, batch, **kwargs):
        """Per-example (loss sum, target tokens, correct predictions), each [batch]."""
        logits = model(params, input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"], **kwargs).logits
        weights = losses.token_weights(batch["example_mask"], jnp.ones_like(batch["labels"]))
        loss_sums, counts = losses.cross_entropy(logits, batch["labels"], weights, per_example=True)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["labels"]) * weights, axis=-1)
        return loss_sums, counts, correct

    def loss_fn(params, batch, dropout_rng):
        loss_sums, counts, _ = target_losses(params, batch, dropout_rng=dropout_rng, train=True)
        return loss_sums.sum(), counts.sum()

    def predict_fn(params, batch):
        loss_sums, counts, correct = target_losses(params, batch, train=False)
        return {"loss_sum": loss_sums, "count": counts, "correct": correct}

    def compute_metrics(outputs, split):
        count = max(float(outputs["count"].sum()), 1.0)
        return {"loss": float(outputs["loss_sum"].sum()) / count, "accuracy": float(outputs["correct"].sum()) / count}

    run.train_evaluate_predict(model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics)


if __name__ == "__main__":
    run_cli(main)
