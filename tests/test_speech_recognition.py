"""run_flax_speech_recognition_seq2seq end to end (pretrained tiny Whisper on the espeak-ng clips)."""

from __future__ import annotations

import numpy as np


from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import audio, wer
from learning import Bar, assert_fine_tuning_learned, evaluation_only

# The fixture Whisper was pretrained on part of the training clips only (fixtures/build_models.py):
# it has heard no validation clip, and none of the sentence templates "X ate Y ..." and "there was
# Y over Z". Fine-tuning on all training clips teaches it those.
# Transcripts are scored on 16 new sentences (91 words): one word is 0.011 of WER, and the trained
# WER measured 0.66-0.80 across the cells' jax versions (0.4.26 to 0.12); the loss falls further.
BARS = [Bar("eval_wer", 0.85, lower_is_better=True), Bar("eval_loss", 1.5, lower_is_better=True)]
SPEECH = DATA / "speech"


def speech():
    return load_script("speech-recognition/run_flax_speech_recognition_seq2seq.py")


def speech_command(output_dir):
    return [
        "--model_name_or_path", str(MODELS / "tiny-whisper"),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--num_train_epochs=15",
        "--warmup_steps=8", "--do_train", "--do_eval",
        "--learning_rate=2e-3", "--per_device_train_batch_size=8", "--per_device_eval_batch_size=4",
        "--predict_with_generate",
        "--train_file", str(SPEECH / "train.csv"), "--validation_file", str(SPEECH / "validation.csv"),
        "--audio_column_name", "file_name", "--text_column_name", "transcript", "--disable_tqdm",
    ]


def test_fine_tuning_transcribes(tmp_path):
    speech().main(evaluation_only(speech_command(tmp_path / "start")))
    speech().main(speech_command(tmp_path / "trained"))

    starting = read_results(tmp_path / "start")
    references = [line.split(",", 1)[1] for line in (SPEECH / "validation.csv").read_text().splitlines()[1:]]
    # Trivial transcribers: the starting model (its WER is measured above), and the empty transcript.
    baseline = {"eval_wer": min(starting["eval_wer"], wer.word_error_rate([""] * len(references), references))}
    results = read_results(tmp_path / "trained")
    assert_fine_tuning_learned(BARS, {"eval_loss": 1.0, "eval_wer": 0.03}, baseline=baseline, starting=starting,
                               trained=results)
    assert results["eval_samples"] == len(references) == 16
    assert (tmp_path / "trained" / "preprocessor_config.json").exists()  # the feature extractor is saved with the model


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
