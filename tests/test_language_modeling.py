"""End to end: run_clm_flax on the fixture prose with the tiny fixture GPT-2."""

from __future__ import annotations

import json

from conftest import DATA, MODELS, load_script, read_log, read_results
from learning import Bar, assert_fine_tuning_learned, evaluation_only, text_baselines

BARS = [Bar("eval_perplexity", 10.0, lower_is_better=True)]


def clm():
    return load_script("language-modeling/run_clm_flax.py")


def clm_command(output_dir):
    return [
        "--model_name_or_path", str(MODELS / "tiny-gpt2"),
        "--train_file", str(DATA / "prose" / "train.txt"),
        "--validation_file", str(DATA / "prose" / "validation.txt"),
        "--do_train", "--do_eval",
        "--block_size", "128",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--num_train_epochs", "2",
        "--learning_rate", "3e-3",
        "--warmup_steps", "10",
        "--logging_steps", "10",
        "--eval_steps", "50",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        "--disable_tqdm",
    ]


def test_fine_tuning_lowers_perplexity(tmp_path):
    clm().main(evaluation_only(clm_command(tmp_path / "start")))
    clm().main(clm_command(tmp_path / "trained"))

    _, unigram = text_baselines(MODELS / "tiny-gpt2", DATA / "prose" / "train.txt", DATA / "prose" / "validation.txt")
    assert_fine_tuning_learned(BARS, {"eval_loss": 2.0}, baseline={"eval_perplexity": unigram},
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))
    log = read_log(tmp_path / "trained")
    train_losses = [record["train_loss"] for record in log if "train_loss" in record]
    assert train_losses[-1] < train_losses[0]
    assert [record["step"] for record in log if "train_loss" in record][:2] == [10, 20]  # --logging_steps 10
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["model_type"] == "gpt2"


def test_training_from_scratch_with_model_type(tmp_path):
    """--model_type + --tokenizer_name train a new model; the vocabulary follows the tokenizer.

    The data comes as JSON Lines with a `text` column, and the validation split
    is held out of the training file.
    """
    lines = (DATA / "prose" / "validation.txt").read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": index, "text": line}) + "\n" for index, line in enumerate(lines)))
    clm().main([
        "--model_type", "gpt2",
        "--config_overrides", "n_embd=32,n_layer=1,n_head=2,n_positions=64",
        "--tokenizer_name", str(MODELS / "tiny-gpt2"),
        "--train_file", str(train),
        "--do_train", "--do_eval",
        "--validation_split_percentage", "20",
        "--block_size", "64",
        "--per_device_train_batch_size", "4",
        "--num_train_epochs", "1",
        "--output_dir", str(tmp_path / "out"),
        "--disable_tqdm",
    ])
    results = read_results(tmp_path / "out")
    assert results["eval_samples"] >= 1 and results["eval_perplexity"] > 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["vocab_size"]) == (32, 1, 500)


def test_bfloat16_parameters_halve_the_state_and_still_train(tmp_path):
    """--param_dtype bfloat16: parameters and both AdamW moments in bfloat16 (2 bytes each, so 6 bytes a
    parameter where float32 takes 12), the loss falls, and the saved model holds bfloat16 weights."""
    from safetensors.numpy import load_file

    output = tmp_path / "bf16"
    clm().main([
        "--model_name_or_path", str(MODELS / "tiny-gpt2"), "--train_file", str(DATA / "prose" / "train.txt"),
        "--do_train", "--block_size", "32", "--max_train_samples", "8", "--per_device_train_batch_size", "8",
        "--max_steps", "20", "--learning_rate", "1e-2", "--logging_steps", "1", "--output_dir", str(output),
        "--param_dtype", "bfloat16", "--report_to", "jsonl", "--disable_tqdm",
    ])
    losses = [record["train_loss"] for record in read_log(output) if "train_loss" in record]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    weights = load_file(str(output / "model.safetensors"))
    assert {array.dtype.itemsize for array in weights.values()} == {2}
    parameters = sum(array.size for array in weights.values())
    state_bytes = read_results(output, "train")["train_state_bytes"]
    assert 6 * parameters <= state_bytes <= 6 * parameters + 64, (state_bytes, parameters)


def streaming_command(output_dir, *extra):
    return ["--model_name_or_path", str(MODELS / "tiny-gpt2"), "--train_file", str(DATA / "prose" / "train.txt"),
            "--do_train", "--streaming", "--max_steps", "12", "--block_size", "32", "--shuffle_buffer_size", "64",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
            "--output_dir", str(output_dir), "--overwrite_output_dir", "--disable_tqdm", *extra]


def test_streaming_trains_in_the_seed_order_and_resumes_at_its_step(tmp_path):
    """--streaming: the same seed gives the same losses, another seed another order, and a run resumed
    from its step-6 checkpoint logs the uninterrupted run's losses for steps 7-12."""
    clm().main(streaming_command(tmp_path / "whole", "--save_steps", "6"))
    whole = [record["train_loss"] for record in read_log(tmp_path / "whole") if "train_loss" in record]
    assert len(whole) == 12 and whole[-1] < whole[0]
    clm().main(streaming_command(tmp_path / "other-seed", "--seed", "7"))
    other = [record["train_loss"] for record in read_log(tmp_path / "other-seed") if "train_loss" in record]
    assert other != whole

    step_6 = tmp_path / "whole" / "checkpoints" / "checkpoint_6"
    # jaxlib 0.4.26 can crash running a resumed step read back from the persistent cache
    clm().main(streaming_command(tmp_path / "whole", "--resume_from_checkpoint", str(step_6),
                                 "--compilation_cache_dir", "none"))
    again = [record["train_loss"] for record in read_log(tmp_path / "whole") if "train_loss" in record]
    assert len(again) == 12
    assert [round(loss, 5) for loss in again[6:]] == [round(loss, 5) for loss in whole[6:]]
