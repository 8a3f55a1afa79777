"""Reliability: resuming after a hard kill, determinism, the divergence stop, several processes.

These run scripts as separate processes and take a minute or two: they are
marked `reliability` and run by `nox -s reliability` (which .ci/run runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, EXAMPLES, MODELS, load_script, read_log, read_results
from flax_finetune.errors import TrainingStopped

pytestmark = pytest.mark.reliability

CLM = "language-modeling/run_clm_flax.py"
GLUE = "text-classification/run_flax_glue.py"


def without_timings(records):
    """Results or log records with the wall-clock fields removed (the only thing allowed to differ)."""
    drop = ("runtime", "samples_per_second", "steps_per_second")
    if isinstance(records, dict):
        return {key: value for key, value in records.items() if not key.endswith(drop)}
    return [without_timings(record) for record in records]


@pytest.fixture(scope="module")
def gpt2_with_dropout(tmp_path_factory) -> Path:
    """The tiny GPT-2 with dropout on, so a resumed run must also replay the dropout keys."""
    folder = tmp_path_factory.mktemp("gpt2-dropout")
    shutil.copytree(MODELS / "tiny-gpt2", folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def clm_args(model, output_dir, *extra):
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--train_file", str(DATA / "prose" / "train.txt"), "--validation_file", str(DATA / "prose" / "validation.txt"),
            "--max_train_samples", "200", "--do_train", "--do_eval", "--block_size", "64",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--eval_steps", "25", "--seed", "3", "--disable_tqdm", *extra]


def start(script, args, **env):
    return subprocess.Popen([sys.executable, str(EXAMPLES / script), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def kill_when(process, condition, timeout=300.0) -> bool:
    """SIGKILL `process` as soon as `condition()` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    process.kill()
    raise TimeoutError("the condition never held")


def assert_same_run(resumed: Path, reference: Path):
    assert without_timings(read_results(resumed)) == without_timings(read_results(reference))
    assert without_timings(read_log(resumed)) == without_timings(read_log(reference))
    assert read_results(resumed, "train")["train_steps"] == read_results(reference, "train")["train_steps"]


@pytest.fixture(scope="module")
def reference_run(gpt2_with_dropout, tmp_path_factory) -> Path:
    """The same command, never interrupted."""
    output = tmp_path_factory.mktemp("uninterrupted")
    load_script(CLM).main(clm_args(gpt2_with_dropout, output, "--save_steps", "10"))
    return output


def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(gpt2_with_dropout, reference_run, tmp_path):
    output = tmp_path / "out"
    args = clm_args(gpt2_with_dropout, output, "--save_steps", "10", "--save_total_limit", "2")
    process = start(CLM, args)
    assert kill_when(process, lambda: (output / "checkpoints" / "checkpoint_30").is_dir()), process.stderr.read()
    assert not (output / "eval_results.json").exists()  # it really died mid-training
    load_script(CLM).main(args + ["--resume_from_checkpoint"])  # no path: the newest in --output_dir
    assert_same_run(output, reference_run)
    steps = read_results(reference_run, "train")["train_steps"]
    newest = steps // 10 * 10
    kept = sorted((path.name for path in (output / "checkpoints").iterdir()), key=lambda name: int(name.split("_")[1]))
    assert kept == [f"checkpoint_{newest - 10}", f"checkpoint_{newest}"]  # --save_total_limit 2


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(gpt2_with_dropout, reference_run, tmp_path):
    for attempt in range(5):  # the kill must land while a write is under way
        output = tmp_path / f"attempt-{attempt}"
        args = clm_args(gpt2_with_dropout, output, "--save_steps", "10")
        process = start(CLM, args)
        folder = output / "checkpoints"

        def writing_after_a_complete_one() -> bool:
            names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
            return any(".orbax-checkpoint-tmp" in name for name in names) and "checkpoint_10" in names

        assert kill_when(process, writing_after_a_complete_one), process.stderr.read()
        if any(".orbax-checkpoint-tmp" in path.name for path in folder.iterdir()):
            break
    else:
        pytest.fail("no kill landed during a checkpoint write in 5 attempts")
    load_script(CLM).main(args + ["--resume_from_checkpoint", str(folder)])
    assert_same_run(output, reference_run)


def test_two_runs_with_one_seed_write_identical_results(tmp_path):
    args = lambda out: ["--model_name_or_path", str(MODELS / "tiny-bert"), "--output_dir", str(out),
                        "--train_file", str(DATA / "paraphrase" / "train.csv"),
                        "--validation_file", str(DATA / "paraphrase" / "validation.csv"),
                        "--max_train_samples", "64", "--learning_rate", "1e-3", "--logging_steps", "1",
                        "--seed", "11", "--disable_tqdm"]
    for name in ("first", "second"):
        load_script(GLUE).main(args(tmp_path / name))
    assert_same_run(tmp_path / "second", tmp_path / "first")


def test_a_non_finite_loss_stops_training_and_saves_nothing_after_it(tmp_path):
    output = tmp_path / "out"
    args = clm_args(MODELS / "tiny-gpt2", output, "--save_steps", "1")
    args[args.index("--learning_rate") + 1] = "1e9"
    with pytest.raises(TrainingStopped) as stopped:
        load_script(CLM).main(args)
    message = str(stopped.value)
    assert re.search(r"the loss became (nan|inf) at step 2 of \d+;", message), message
    assert f"the last good checkpoint is {output / 'checkpoints' / 'checkpoint_1'}" in message
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint_1"]
    assert not (output / "model.safetensors").exists() and not (output / "eval_results.json").exists()
    result = subprocess.run([sys.executable, str(EXAMPLES / CLM), *map(str, args), "--overwrite_output_dir"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: training stopped")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("script", [GLUE, CLM])
def test_two_processes_train_like_one(script, tmp_path):
    """Two processes on localhost (jax.distributed, one CPU device each) against one process with the
    same global batch: losses and metrics equal to a relative 1e-5."""
    if script == GLUE:
        common = ["--model_name_or_path", str(MODELS / "tiny-bert"), "--train_file", str(DATA / "paraphrase" / "train.csv"),
                  "--validation_file", str(DATA / "paraphrase" / "validation.csv"), "--max_train_samples", "96",
                  "--learning_rate", "1e-3", "--per_device_eval_batch_size", "2"]
    else:
        common = ["--model_name_or_path", str(MODELS / "tiny-gpt2"), *clm_args(MODELS / "tiny-gpt2", "unused")[4:]]
        common[common.index("--max_train_samples") + 1] = "100"
    common += ["--logging_steps", "1", "--seed", "5", "--disable_tqdm", "--save_steps", "0"]
    single = tmp_path / "single"
    load_script(script).main(["--output_dir", single, *common, "--per_device_train_batch_size", "4"])

    shared = tmp_path / "two-processes"
    address = f"127.0.0.1:{free_port()}"
    processes = [start(script, ["--output_dir", shared, *common, "--per_device_train_batch_size", "2",
                                "--coordinator_address", address, "--num_processes", "2", "--process_id", index],
                       JAX_PLATFORMS="cpu") for index in (0, 1)]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "process 1 loads 2 of the 4 rows of every batch" in errors[1]

    ours, theirs = read_log(shared), read_log(single)
    losses = lambda log: np.array([record["train_loss"] for record in log if "train_loss" in record])
    np.testing.assert_allclose(losses(ours), losses(theirs), rtol=1e-5)
    for key, value in without_timings(read_results(single)).items():
        np.testing.assert_allclose(read_results(shared)[key], value, rtol=1e-5, err_msg=key)


def emulated_cpu_devices(count: int) -> dict:
    """The environment of a process that sees `count` CPU devices (XLA reads it at start-up)."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


def test_fsdp_across_two_processes_trains_like_one_process(tmp_path):
    """--mesh fsdp:8 over 2 processes x 4 emulated CPU devices (the fsdp axis spans both) against 1 process
    x 8 devices, on the tiny Llama: the 10 logged losses and the eval metrics equal to a relative 1e-5,
    the saved weights equal (measured: 3.5e-8 apart at most), each device holding 1/8 of the parameters
    and optimizer state (+5%)."""
    common = ["--model_name_or_path", MODELS / "tiny-llama", "--train_file", DATA / "prose" / "train.txt",
              "--validation_file", DATA / "prose" / "validation.txt", "--block_size", "32", "--do_train", "--do_eval",
              "--max_train_samples", "80", "--max_eval_samples", "16", "--max_steps", "10", "--learning_rate", "1e-3",
              "--warmup_steps", "2", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
              "--logging_steps", "1", "--save_steps", "0", "--seed", "0", "--disable_tqdm", "--mesh", "fsdp:8"]
    single, shared = tmp_path / "one-process", tmp_path / "two-processes"
    address = f"127.0.0.1:{free_port()}"
    processes = [start(CLM, ["--output_dir", single, *common], **emulated_cpu_devices(8))] + [
        start(CLM, ["--output_dir", shared, *common, "--coordinator_address", address, "--num_processes", "2",
                    "--process_id", index], **emulated_cpu_devices(4)) for index in (0, 1)]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], "\n".join(error[-2000:] for error in errors)
    assert "process 1 loads 4 of the 8 rows of every batch" in errors[2]

    losses = lambda output: np.array([record["train_loss"] for record in read_log(output) if "train_loss" in record])
    assert len(losses(shared)) == 10
    np.testing.assert_allclose(losses(shared), losses(single), rtol=1e-5)
    for key, value in without_timings(read_results(single)).items():
        np.testing.assert_allclose(read_results(shared)[key], value, rtol=1e-5, err_msg=key)
    train = read_results(shared, "train")
    assert train["train_state_bytes_per_device"] <= train["train_state_bytes"] / 8 * 1.05, train

    from safetensors.numpy import load_file

    ours, theirs = load_file(shared / "model.safetensors"), load_file(single / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, weight in theirs.items():
        np.testing.assert_allclose(ours[name], weight, rtol=1e-5, atol=1e-6, err_msg=name)
