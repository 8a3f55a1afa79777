"""run_t5_mlm_flax end to end (tiny T5), and span corruption."""

from __future__ import annotations

import numpy as np
import pytest

import math

from conftest import DATA, MODELS, load_script, read_results
from flax_finetune.errors import InputError
from learning import Bar, assert_fine_tuning_learned, evaluation_only, text_baselines

BARS = [Bar("eval_accuracy", 0.25), Bar("eval_loss", 3.5, lower_is_better=True)]
# Span-corruption pretraining starts from a new model, as the script is meant to be used: the
# fixture tiny-t5 has already been pretrained on this text (for the summarization test).
NEW_T5 = ("--model_type", "t5", "--config_name", str(MODELS / "tiny-t5"), "--tokenizer_name", str(MODELS / "tiny-t5"))


def t5():
    return load_script("language-modeling/run_t5_mlm_flax.py")


def t5_command(output_dir):
    return [
        *NEW_T5,
        "--train_file", str(DATA / "prose" / "train.txt"),
        "--validation_file", str(DATA / "prose" / "validation.txt"),
        "--do_train", "--do_eval", "--max_seq_length", "128",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--num_train_epochs", "3", "--learning_rate", "1e-2", "--warmup_steps", "20",
        "--logging_steps", "25", "--eval_steps", "100",
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--disable_tqdm",
    ]


def test_span_corruption_pretraining_learns(tmp_path):
    t5().main(evaluation_only(t5_command(tmp_path / "start")))
    t5().main(t5_command(tmp_path / "trained"))

    # Trivial predictors of the hidden tokens: always the most frequent token of the training
    # text (scored on all validation tokens, an upper bound of its accuracy on the spans), and a
    # unigram model of the training text (its cross-entropy, the loss to beat).
    accuracy, perplexity = text_baselines(MODELS / "tiny-t5", DATA / "prose" / "train.txt", DATA / "prose" / "validation.txt")
    baseline = {"eval_accuracy": accuracy, "eval_loss": math.log(perplexity)}
    assert_fine_tuning_learned(BARS, {"eval_loss": 2.0, "eval_accuracy": 0.15}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))


@pytest.mark.parametrize("inputs, expected", [(128, (141, 29)), (256, (284, 58)), (512, (568, 114))])
def test_lengths_make_inputs_exactly_max_seq_length(inputs, expected):
    assert t5().input_and_target_lengths(inputs, 0.15, 3.0) == expected


def test_noise_density_and_mean_span_length_over_many_draws():
    script = t5()
    rng = np.random.default_rng(0)
    masks = np.stack([script.noise_mask(rng, 141, 0.15, 3.0) for _ in range(2000)])
    assert masks.shape == (2000, 141)
    assert abs(masks.mean() - 0.15) < 0.002
    starts = masks & ~np.concatenate([np.zeros((2000, 1), bool), masks[:, :-1]], axis=1)
    assert abs(masks.sum() / starts.sum() - 3.0) < 0.05
    assert not masks[:, 0].any()  # spans alternate, starting with clean text


def test_corruption_hides_spans_behind_named_sentinels():
    tokens = np.arange(10, 20)
    mask = np.array([0, 1, 1, 0, 0, 0, 1, 0, 0, 0], bool)
    sentinels = np.array([90, 91])
    inputs, targets = t5().corrupt(tokens, mask, sentinels, eos_id=1)
    assert inputs.tolist() == [10, 90, 13, 14, 15, 91, 17, 18, 19, 1]
    assert targets.tolist() == [90, 11, 12, 91, 16, 1]


class FewSentinels:
    def get_vocab(self):
        return {"<extra_id_0>": 5, "<extra_id_1>": 3, "hello": 4}


def test_sentinels_are_looked_up_by_name_and_counted():
    assert t5().sentinel_ids(FewSentinels(), 2).tolist() == [5, 3]
    with pytest.raises(InputError, match="has 2 sentinel tokens .* needs 5"):
        t5().sentinel_ids(FewSentinels(), 5)
