"""run_mlm_flax end to end (tiny RoBERTa and BERT), and the masking rule."""

from __future__ import annotations

import jax
import numpy as np


from conftest import DATA, MODELS, load_script, read_log, read_results
from learning import Bar, assert_fine_tuning_learned, evaluation_only, text_baselines

BARS = [Bar("eval_accuracy", 0.12), Bar("eval_perplexity", 75.0, lower_is_better=True)]


def mlm():
    return load_script("language-modeling/run_mlm_flax.py")


def mlm_command(output_dir, model="tiny-roberta"):
    return [
        "--model_name_or_path", str(MODELS / model),
        "--train_file", str(DATA / "prose" / "train.txt"),
        "--validation_file", str(DATA / "prose" / "validation.txt"),
        "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--max_seq_length", "128",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--logging_steps", "100", "--eval_steps", "300", "--learning_rate", "2e-3", "--warmup_steps", "100",
        "--do_train", "--do_eval", "--num_train_epochs=8", "--disable_tqdm",
    ]


def test_fine_tuning_predicts_masked_tokens(tmp_path):
    mlm().main(evaluation_only(mlm_command(tmp_path / "start")))
    mlm().main(mlm_command(tmp_path / "trained"))

    accuracy, perplexity = text_baselines(MODELS / "tiny-roberta", DATA / "prose" / "train.txt", DATA / "prose" / "validation.txt")
    baseline = {"eval_accuracy": accuracy, "eval_perplexity": perplexity}
    assert_fine_tuning_learned(BARS, {"eval_loss": 1.0, "eval_accuracy": 0.1}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))
    assert [r["step"] for r in read_log(tmp_path / "trained") if "eval_accuracy" in r][:2] == [300, 600]


def test_line_by_line_with_bert_and_default_length(tmp_path):
    """--line_by_line, and no --max_seq_length: the model's limit is used, not a crash."""
    args = mlm_command(tmp_path, model="tiny-bert")
    args[args.index("--max_seq_length"):args.index("--max_seq_length") + 2] = ["--line_by_line"]
    args += ["--max_train_samples", "40", "--max_eval_samples", "8"]
    mlm().main(args)
    results = read_results(tmp_path)
    assert results["eval_samples"] == 8 and 0 <= results["eval_accuracy"] <= 1


def test_masking_follows_80_10_10_and_spares_special_tokens_and_padding():
    script = mlm()
    length, batch = 64, 4000
    input_ids = np.full((batch, length), 7, np.int32)
    special = np.zeros((batch, length), np.int32)
    special[:, 0] = special[:, 40] = 1
    attention = np.ones((batch, length), np.int32)
    attention[:, 50:] = 0
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    masked, labels = jax.vmap(
        lambda key, ids, sp, at: script.mask_tokens(key, ids, sp, at, 0.15, mask_id=3, vocab_size=1000)
    )(keys, input_ids, special, attention)
    masked, labels = np.asarray(masked), np.asarray(labels)
    chosen = labels >= 0
    eligible = (special == 0) & (attention == 1)
    assert not chosen[~eligible].any()
    assert abs(chosen[eligible].mean() - 0.15) < 0.005
    assert abs((masked[chosen] == 3).mean() - 0.8) < 0.01
    replaced = (masked[chosen] != 3) & (masked[chosen] != 7)
    assert abs(replaced.mean() - 0.1) < 0.01  # random ids (a random id equal to 7 counts as kept)
    assert (masked[~chosen] == 7).all()
