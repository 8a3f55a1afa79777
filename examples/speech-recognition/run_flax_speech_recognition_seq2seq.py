#!/usr/bin/env python
"""Fine-tune a speech-to-text model (Whisper, or a speech encoder-decoder) with Flax.

Data: a CSV or JSON Lines file of audio file names (relative to that file's
folder) and transcripts (--audio_column_name, --text_column_name), or a hub
dataset with --dataset_name when online. Audio is decoded with soundfile
(WAV, FLAC, OGG; no ffmpeg, no torch), resampled to the feature extractor's
rate, and clips outside [--min_duration_in_seconds, --max_duration_in_seconds]
are skipped. With --predict_with_generate, evaluation transcribes (greedy, or
beam search with --num_beams) and scores the word error rate. Writes
eval_results.json with eval_wer and eval_loss (the upstream script wrote no
results file), and with --do_predict the transcripts to
generated_predictions.txt.

    python examples/speech-recognition/run_flax_speech_recognition_seq2seq.py \\
        --model_name_or_path fixtures/models/tiny-whisper --output_dir out \\
        --train_file fixtures/data/speech/train.csv --validation_file fixtures/data/speech/validation.csv \\
        --audio_column_name file_name --text_column_name transcript \\
        --do_train --do_eval --predict_with_generate
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from flax_finetune import scripts
from flax_finetune.arguments import DataArguments, ModelArguments, Seq2SeqArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli


@dataclasses.dataclass
class SpeechModelArguments(ModelArguments):
    """Model: which weights, config, tokenizer and feature extractor to start from."""

    feature_extractor_name: Optional[str] = arg(None, "Feature extractor folder or name, if not the model's own.")


@dataclasses.dataclass
class SpeechDataArguments(DataArguments):
    """Data: audio files and transcripts (or a hub dataset), durations and labels."""

    audio_column_name: str = arg("audio", "Column of the audio (file names relative to the data file).")
    text_column_name: str = arg("text", "Column of the transcripts.")
    train_split_name: str = arg("train", "Split of --dataset_name used for training.")
    eval_split_name: str = arg("validation", "Split of --dataset_name used for evaluation.")
    max_duration_in_seconds: float = arg(20.0, "Skip clips longer than this.")
    min_duration_in_seconds: float = arg(0.0, "Skip clips shorter than this.")
    max_label_length: int = arg(128, "Transcript tokens kept, and the generation limit.")
    do_lower_case: bool = arg(True, "Lower-case transcripts before tokenizing.")
    language: Optional[str] = arg(None, "Language of a multilingual Whisper model (e.g. english).")
    task: str = arg("transcribe", "Whisper task when --language is given: transcribe or translate.")


def main(argv=None):
    model_args, data_args, seq2seq_args, training_args = parse_args(
        (SpeechModelArguments, SpeechDataArguments, Seq2SeqArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(
        data_args, extensions=(".csv", ".json", ".jsonl"),
        hub_split_names={"train": data_args.train_split_name, "validation": data_args.eval_split_name},
    )

    from flax_finetune import audio, data, models, seq2seq, wer

    for split, dataset in splits.items():
        scripts.require_columns(dataset, [data_args.audio_column_name, data_args.text_column_name], data_args, split)
    tokenizer = run.tokenizer(model_args)
    if data_args.language:
        tokenizer.set_prefix_tokens(language=data_args.language, task=data_args.task)
    feature_extractor = models.load_feature_extractor(
        model_args.feature_extractor_name or model_args.model_name_or_path or model_args.tokenizer_name,
        hub=model_args.hub_options,
    )
    config = run.config(model_args, tokenizer)
    start_id = seq2seq.decoder_start_token_id(config)
    max_label_length = seq2seq.target_length_limit(data_args.max_label_length, config)
    rate = feature_extractor.sampling_rate
    input_name = feature_extractor.model_input_names[0]
    folders = {split: Path(path).parent for split, (_, path) in data_args.files().items() if path}

    def prepare(split, dataset):
        """Filter one split by duration and tokenize its transcripts; features are extracted per batch.

        Only the kept rows' numbers and labels are held: each clip is decoded, resampled and turned
        into features when a batch takes it (on --preprocessing_num_workers threads), from the
        file, or from the dataset's memory-mapped Arrow table for a hub dataset.
        """
        if data_args.dataset_name is not None:
            import datasets

            dataset = dataset.cast_column(data_args.audio_column_name, datasets.Audio(decode=False))
        base = folders.get(split)
        clips = dataset.select_columns([data_args.audio_column_name])
        durations = np.array([audio.duration(clip, base) for clip in clips[data_args.audio_column_name]])
        kept = np.flatnonzero((durations >= data_args.min_duration_in_seconds)
                              & (durations <= data_args.max_duration_in_seconds))
        if len(kept) < len(dataset):
            logging.getLogger("flax_finetune").warning(
                "%s: skipped %d clips outside the duration limits", split, len(dataset) - len(kept))
        if not len(kept):
            raise InputError(f"the {split} split has no clip within the duration limits")
        texts = [str(text) for text in dataset.select(kept)[data_args.text_column_name]]
        labels = tokenizer([text.lower() for text in texts] if data_args.do_lower_case else texts).input_ids
        labels = [label[:max_label_length] for label in labels]
        if all(label[0] == start_id for label in labels):  # the decoder start comes back through shift_right
            labels = [label[1:] for label in labels]
        width = -(-max(map(len, labels)) // 8) * 8
        label_array = np.full((len(labels), width), -100, np.int32)
        for index, label in enumerate(labels):
            label_array[index, : len(label)] = label

        def features(row: int) -> np.ndarray:
            """Log-mel features of kept clip `row`: [mel bins, frames]."""
            samples, source_rate = audio.read(clips[int(kept[row])][data_args.audio_column_name], base)
            return feature_extractor(audio.resample(samples, source_rate, rate), sampling_rate=rate)[input_name][0]

        columns = {"labels": label_array,
                   "decoder_input_ids": seq2seq.shift_right(label_array, start_id, tokenizer.pad_token_id)}
        return data.ComputedRows(columns, input_name, features, data_args.preprocessing_num_workers)

    rows = {split: prepare(split, dataset) for split, dataset in splits.items()}

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "speech-seq2seq", config)
    generation = seq2seq.generation_options(model, max_label_length, seq2seq_args.num_beams)
    if data_args.language:
        generation.update(language=data_args.language, task=data_args.task)

    def target_losses(params, batch, weights, **kwargs):
        """Per-example label-smoothed loss sums and transcript token counts, both [batch]."""
        logits = model(
            params, **{input_name: batch[input_name]}, decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["labels"] >= 0, **kwargs,
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
            outputs["generated"] = model.generate(params, {input_name: batch[input_name]}, **generation)
        return outputs

    def compute_metrics(outputs, split):
        scores = {"loss": float(outputs["loss_sum"].sum() / max(outputs["count"].sum(), 1))}
        if seq2seq_args.predict_with_generate:
            scores["wer"] = wer.word_error_rate(
                seq2seq.decode(tokenizer, outputs["generated"]), seq2seq.decode(tokenizer, outputs["labels"])
            )
        return scores

    def write_predictions(outputs, split):
        if split == "test" and seq2seq_args.predict_with_generate:
            text = "".join(line.replace("\n", " ") + "\n" for line in seq2seq.decode(tokenizer, outputs["generated"]))
            run.output.write_text("generated_predictions.txt", text)

    run.train_evaluate_predict(
        model, [tokenizer, feature_extractor], rows, loss_fn, predict_fn, compute_metrics, write_predictions
    )


if __name__ == "__main__":
    run_cli(main)
