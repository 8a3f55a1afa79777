"""Data parallelism: 8 emulated CPU devices give the metrics of 1 device for the same global batch.

The 8-device runs happen in a subprocess (XLA reads the device count at
start-up); the 1-device runs in this process. Tolerance: losses and metrics
equal to a relative 1e-5; only the order of floating-point sums differs
(measured: at most 2e-7 apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import numpy as np
import pytest

from conftest import DATA, EXAMPLES, MODELS, load_script, read_log, read_results


RELATIVE_TOLERANCE = 1e-5


def glue_args(output_dir, per_device_batch):
    return ["--model_name_or_path", str(MODELS / "tiny-bert"), "--output_dir", str(output_dir),
            "--train_file", str(DATA / "paraphrase" / "train.csv"),
            "--validation_file", str(DATA / "paraphrase" / "validation.csv"),
            "--max_train_samples", "64", "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", str(16 // per_device_batch), "--per_device_eval_batch_size", "1",
            "--logging_steps", "1", "--disable_tqdm"]


def clm_args(output_dir, per_device_batch):
    return ["--model_name_or_path", str(MODELS / "tiny-gpt2"), "--output_dir", str(output_dir),
            "--train_file", str(DATA / "prose" / "train.txt"),
            "--validation_file", str(DATA / "prose" / "validation.txt"),
            "--max_train_samples", "60", "--num_train_epochs", "1", "--learning_rate", "1e-3",
            "--block_size", "64", "--do_train", "--do_eval",
            "--per_device_train_batch_size", str(8 // per_device_batch), "--per_device_eval_batch_size", "1",
            "--logging_steps", "1", "--disable_tqdm"]


def train_losses(output_dir):
    return np.array([record["train_loss"] for record in read_log(output_dir) if "train_loss" in record])


RUNS = {
    "run_flax_glue": (glue_args, "text-classification/run_flax_glue.py"),
    "run_clm_flax": (clm_args, "language-modeling/run_clm_flax.py"),
}
PROGRAM = """
import importlib.util, json, sys
import jax
assert jax.device_count() == 8, jax.devices()
path, args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("script", path)
module = sys.modules["script"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main(args)
"""


@pytest.mark.parametrize("name", list(RUNS))
def test_eight_devices_match_one(tmp_path, name):
    make_args, script = RUNS[name]
    one, eight = tmp_path / "one-device", tmp_path / "eight-devices"
    load_script(script).main(make_args(one, per_device_batch=1))
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    job = json.dumps([str(EXAMPLES / script), make_args(eight, per_device_batch=8)])
    result = subprocess.run([sys.executable, "-c", PROGRAM, job], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    np.testing.assert_allclose(train_losses(eight), train_losses(one), rtol=RELATIVE_TOLERANCE)
    results_one, results_eight = read_results(one), read_results(eight)
    assert set(results_one) == set(results_eight)
    for key, value in results_one.items():
        if not key.endswith("_runtime"):
            np.testing.assert_allclose(results_eight[key], value, rtol=RELATIVE_TOLERANCE, err_msg=key)


def fsdp_clm_args(output_dir, mesh, *extra):
    """10 steps of tiny-gpt2 on 8 devices x 1 row, losses logged every step."""
    return ["--model_name_or_path", str(MODELS / "tiny-gpt2"), "--output_dir", str(output_dir),
            "--train_file", str(DATA / "prose" / "train.txt"), "--block_size", "32", "--do_train",
            "--max_train_samples", "80", "--max_steps", "10", "--learning_rate", "1e-3", "--warmup_steps", "2",
            "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_steps", "5", "--seed", "0",
            "--report_to", "jsonl", "--disable_tqdm", "--mesh", mesh, *extra,
            # jaxlib 0.4.26 can crash running a resumed step read back from the persistent cache
            "--compilation_cache_dir", "none"]


FSDP_PROGRAM = """
import importlib.util, json, sys
import jax
assert jax.device_count() == 8, jax.devices()
path, runs = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("script", path)
module = sys.modules["script"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for args in runs:
    module.main(args)
"""


def test_fsdp_shards_the_state_and_trains_like_data_parallel(tmp_path):
    """fsdp:8 holds 1/8 of the parameters and optimizer state per device (+5%) and logs the losses of
    data:8 (relative 1e-5); its step-5 checkpoint, resumed under data:2,fsdp:4, ends where it ended."""
    data, fsdp, resumed = tmp_path / "data8", tmp_path / "fsdp8", tmp_path / "resumed"
    runs = [fsdp_clm_args(data, "data:8"), fsdp_clm_args(fsdp, "fsdp:8"),
            fsdp_clm_args(resumed, "data:2,fsdp:4", "--resume_from_checkpoint", str(fsdp / "checkpoints" / "checkpoint_5"))]
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    job = json.dumps([str(EXAMPLES / "language-modeling/run_clm_flax.py"), runs])
    result = subprocess.run([sys.executable, "-c", FSDP_PROGRAM, job], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    replicated, sharded = read_results(data, "train"), read_results(fsdp, "train")
    assert replicated["train_state_bytes_per_device"] == replicated["train_state_bytes"]
    assert sharded["train_state_bytes"] == replicated["train_state_bytes"]
    assert sharded["train_state_bytes_per_device"] <= sharded["train_state_bytes"] / 8 * 1.05, sharded
    assert len(train_losses(fsdp)) == 10
    np.testing.assert_allclose(train_losses(fsdp), train_losses(data), rtol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(train_losses(resumed), train_losses(fsdp)[5:], rtol=RELATIVE_TOLERANCE)
    assert read_results(resumed, "train")["train_state_bytes_per_device"] <= sharded["train_state_bytes"] / 4 * 1.05
