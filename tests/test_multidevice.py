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
