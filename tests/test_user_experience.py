"""What users of training scripts expect: TensorBoard files, a model card, fast --help,
--push_to_hub (against a local stand-in for the hub), and progress output."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DATA, EXAMPLES, MODELS, load_script, read_log, read_results
from flax_finetune.errors import InputError
from hub_stand_in import LFS_THRESHOLD, HubStandIn

GLUE = "text-classification/run_flax_glue.py"
SCRIPTS = sorted(str(path.relative_to(EXAMPLES)) for path in EXAMPLES.glob("*/*.py"))


def glue_args(output_dir, *extra):
    return ["--model_name_or_path", str(MODELS / "tiny-bert"), "--output_dir", str(output_dir),
            "--train_file", str(DATA / "paraphrase" / "train.csv"),
            "--validation_file", str(DATA / "paraphrase" / "validation.csv"),
            "--max_train_samples", "64", "--learning_rate", "1e-3", "--logging_steps", "4", "--eval_steps", "8",
            "--disable_tqdm", *extra]


def test_tensorboard_events_hold_what_was_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    load_script(GLUE).main(glue_args(tmp_path, "--report_to", "jsonl", "tensorboard"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    log = read_log(tmp_path)
    losses = {r["step"]: r["train_loss"] for r in log if "train_loss" in r}
    scalars = {event.step: event.value for event in events.Scalars("train/loss")}
    assert sorted(scalars) == sorted(losses) and len(scalars) == 6  # 64 examples / 8 = 8 steps, 3 epochs, every 4th
    np.testing.assert_allclose([scalars[s] for s in sorted(scalars)], [losses[s] for s in sorted(losses)], rtol=1e-6)
    tags = set(events.Tags()["scalars"])
    assert {"learning_rate", "train/steps_per_second", "train/samples_per_second", "eval/accuracy", "eval/loss"} <= tags
    accuracies = {e.step: e.value for e in events.Scalars("eval/accuracy")}
    assert accuracies == {r["step"]: pytest.approx(r["eval_accuracy"]) for r in log if "eval_accuracy" in r}
    assert sorted(accuracies) == [8, 16, 24]  # every --eval_steps, the last one being the final evaluation
    assert accuracies[24] == pytest.approx(read_results(tmp_path)["eval_accuracy"])


def test_report_to_none_writes_no_log(tmp_path):
    load_script(GLUE).main(glue_args(tmp_path, "--report_to", "none"))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert "eval_accuracy" in read_results(tmp_path)


def test_unknown_report_destination_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="--report_to wandb: use none, or one or more of jsonl, tensorboard"):
        load_script(GLUE).main(glue_args(tmp_path, "--report_to", "wandb"))


def test_the_output_folder_is_a_model_with_a_card_that_reproduces_its_metrics(tmp_path):
    trained = tmp_path / "trained"
    load_script(GLUE).main(glue_args(trained, "--hub_token", "secret-token"))
    card = (trained / "README.md").read_text()
    results = read_results(trained)
    for expected in ("sequence-classification", str(MODELS / "tiny-bert"), "paraphrase/train.csv", "| train |",
                     f"| eval_accuracy | {results['eval_accuracy']:.4g} |", "python examples/text-classification/"
                     "run_flax_glue.py", "--hub_token '<hidden>'", "| transformers |", "| jax |"):
        assert expected in card, expected
    assert "secret-token" not in card

    again = tmp_path / "evaluated-again"
    load_script(GLUE).main(["--model_name_or_path", str(trained), "--output_dir", str(again), "--do_eval",
                            "--validation_file", str(DATA / "paraphrase" / "validation.csv"), "--disable_tqdm"])
    reloaded = read_results(again)
    assert reloaded["eval_accuracy"] == results["eval_accuracy"]
    assert reloaded["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)


@pytest.mark.spawns
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_grouped_and_imports_nothing_heavy(script):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", str(EXAMPLES / script), "--help"],
                            capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 0
    assert "Model:" in result.stdout and "Data:" in result.stdout and "Training:" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    heavy = {"jax", "flax", "optax", "transformers", "datasets", "orbax", "tensorboardX"}
    assert not heavy & imported, heavy & imported
    assert seconds < 2.0, seconds


@pytest.mark.spawns
def test_push_to_hub_uploads_the_model_at_each_save_and_at_the_end(tmp_path):
    with HubStandIn() as hub:
        output = tmp_path / "tiny-paraphrase"
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / GLUE), *glue_args(output, "--push_to_hub", "--hub_model_id",
                                                               "tester/tiny-paraphrase", "--hub_token", hub.token,
                                                               "--save_steps", "12")],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert hub.unknown == []
    assert [message for _, message in hub.commits] == ["Training in progress, step 12", "End of training"]
    files = hub.repos["tester/tiny-paraphrase"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "eval_results.json"} <= set(files)
    assert not any(name.startswith(("checkpoints/", "tensorboard/")) for name in files)
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()
    assert b"--hub_token '<hidden>'" in files["README.md"]


@pytest.mark.spawns
def test_an_unreachable_hub_stops_the_script_before_training(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / GLUE), *glue_args(output, "--push_to_hub", "--hub_model_id", "tester/x")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_OFFLINE": "0"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --push_to_hub: cannot create or reach tester/x")
    assert not output.exists()


@pytest.mark.spawns
def test_a_token_the_hub_refuses_stops_the_script_before_training(tmp_path):
    output = tmp_path / "out"
    with HubStandIn() as hub:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / GLUE), *glue_args(output, "--push_to_hub", "--hub_model_id", "tester/x",
                                                               "--hub_token", "hf_not_the_token")],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"},
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "hf_not_the_token" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] == [
        f"error: --push_to_hub: {hub.url} answered 401 Unauthorized: the token is missing or not valid; "
        "give a write token with --hub_token or HF_TOKEN"]
    writes = [request for request in hub.requests if request.startswith(("POST", "PUT"))]
    assert writes and hub.refused == writes  # the hub was asked, and no write got past the token check
    assert not output.exists()  # no training step, log, checkpoint or model was written


@pytest.mark.spawns
def test_a_file_over_the_lfs_threshold_is_pushed_through_lfs(tmp_path):
    folder = tmp_path / "large-model"
    folder.mkdir()
    weights = np.random.default_rng(0).bytes(LFS_THRESHOLD + 1)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    push = ("import sys; from flax_finetune.hub import Hub; "
            "hub = Hub(sys.argv[1], 'tester/large-model', sys.argv[2]); hub.connect(); hub.push('End of training')")
    with HubStandIn() as hub:
        result = subprocess.run(
            [sys.executable, "-c", push, str(folder), hub.token], capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.unknown == [] and hub.refused == []
    oid = hashlib.sha256(weights).hexdigest()
    assert hub.lfs_files == {"tester/large-model": {"model.safetensors": (oid, len(weights))}}  # an LFS pointer
    assert list(hub.lfs_objects) == [oid] and hub.lfs_objects[oid] == weights  # the bytes came by the LFS upload
    assert {"POST /tester/large-model.git/info/lfs/objects/batch", f"PUT /lfs-upload/{oid}",
            f"POST /lfs-verify/{oid}"} <= set(hub.requests)
    assert hub.repos["tester/large-model"] == {"model.safetensors": weights,
                                               "config.json": b'{"model_type": "bert"}'}  # the small file: inline
    assert hub.commits == [("tester/large-model", "End of training")]


@pytest.mark.spawns
def test_without_a_terminal_progress_is_log_lines_not_bars(tmp_path):
    args = [a for a in glue_args(tmp_path) if a != "--disable_tqdm"]
    result = subprocess.run([sys.executable, str(EXAMPLES / GLUE), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "it/s]" not in result.stderr and "█" not in result.stderr
    assert "step 4/24 (epoch 0.50): loss" in result.stderr and "steps/s" in result.stderr


@pytest.mark.spawns
def test_on_a_terminal_each_epoch_has_a_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    args = [a for a in glue_args(tmp_path) if a != "--disable_tqdm"]
    process = subprocess.Popen([sys.executable, str(EXAMPLES / GLUE), *args], stdout=subprocess.DEVNULL,
                               stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=600) == 0
    output = b"".join(chunks).decode(errors="replace")
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}: 100%" in output
    assert "loss=" in output and "lr=" in output


def test_the_upload_leaves_checkpoints_event_files_and_temporary_files_out(tmp_path):
    from flax_finetune.hub import uploaded_files

    for name in ("config.json", "model.safetensors", "notes/card.md", "partial.tmp", "checkpoints/checkpoint_12/position",
                 "tensorboard/events.out", "checkpoints/checkpoint_24.orbax-checkpoint-tmp-0/state"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [path.relative_to(tmp_path).as_posix() for path in uploaded_files(tmp_path)] == [
        "config.json", "model.safetensors", "notes/card.md"]
