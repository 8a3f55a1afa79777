"""run_flax_speech_recognition_seq2seq end to end (pretrained tiny Whisper on the espeak-ng clips)."""

from __future__ import annotations

import numpy as np

import pytest

from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import audio

WER = 0.3  # after fine-tuning ~0.11; a random Whisper ~1
SPEECH = DATA / "speech"


def speech():
    return load_script("speech-recognition/run_flax_speech_recognition_seq2seq.py")


def speech_command(output_dir, *model):
    return [
        *(model or ("--model_name_or_path", str(MODELS / "tiny-whisper"))),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--num_train_epochs=2",
        "--max_train_samples", "10", "--max_eval_samples", "10", "--warmup_steps=8", "--do_train", "--do_eval",
        "--learning_rate=2e-4", "--per_device_train_batch_size=2", "--per_device_eval_batch_size=1",
        "--predict_with_generate",
        "--train_file", str(SPEECH / "train.csv"), "--validation_file", str(SPEECH / "validation.csv"),
        "--audio_column_name", "file_name", "--text_column_name", "transcript", "--disable_tqdm",
    ]


def test_fine_tuning_transcribes(tmp_path):
    speech().main(speech_command(tmp_path))
    results = read_results(tmp_path)
    assert results["eval_wer"] <= WER and results["eval_samples"] == 10
    assert "eval_loss" in results
    assert (tmp_path / "preprocessor_config.json").exists()  # the feature extractor is saved with the model


def test_untrained_model_fails_the_threshold(tmp_path):
    random_whisper = ("--model_type", "whisper", "--config_name", str(MODELS / "tiny-whisper"),
                      "--tokenizer_name", str(MODELS / "tiny-whisper"))
    args = speech_command(tmp_path, *random_whisper)
    args.remove("--do_train")
    speech().main(args)
    assert read_results(tmp_path)["eval_wer"] > WER


def test_a_22_khz_clip_is_resampled_to_16_khz():
    samples, rate = audio.read("clips/resample_22050.wav", SPEECH)
    assert rate == 22050
    resampled = audio.resample(samples, rate, 16000)
    assert abs(len(resampled) - len(samples) * 16000 / 22050) <= 1
    reference, reference_rate = audio.read(SPEECH / "clips" / "train_000.flac")
    assert reference_rate == 16000 and reference.dtype == np.float32


def test_clips_outside_the_duration_limits_are_skipped(tmp_path):
    speech().main([
        "--model_name_or_path", str(MODELS / "tiny-whisper"), "--output_dir", str(tmp_path), "--do_eval",
        "--validation_file", str(SPEECH / "validation.csv"), "--audio_column_name", "file_name",
        "--text_column_name", "transcript", "--max_duration_in_seconds", "1.5", "--disable_tqdm",
    ])
    durations = [len(audio.read(line.split(",")[0], SPEECH)[0]) / 16000
                 for line in (SPEECH / "validation.csv").read_text().splitlines()[1:]]
    assert read_results(tmp_path)["eval_samples"] == sum(duration <= 1.5 for duration in durations) < len(durations)


def test_audio_at_another_rate_is_resampled_not_refused(tmp_path):
    speech().main([
        "--model_name_or_path", str(MODELS / "tiny-whisper"), "--output_dir", str(tmp_path), "--do_eval",
        "--validation_file", str(SPEECH / "resample.csv"), "--audio_column_name", "file_name",
        "--text_column_name", "transcript", "--disable_tqdm",
    ])
    assert read_results(tmp_path)["eval_samples"] == 1
