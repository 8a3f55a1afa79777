"""Where logged metrics go (--report_to): JSON Lines in metrics.jsonl, TensorBoard event files.

TensorBoard files are written by tensorboardX, a small writer that needs no
TensorFlow (the upstream scripts silently logged nothing without it). Each
numeric value of a record becomes a scalar at the record's step:
train_loss -> train/loss, eval_accuracy -> eval/accuracy, learning_rate as is.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from flax_finetune.errors import InputError

METRICS_LOG = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
DESTINATIONS = ("none", "jsonl", "tensorboard")


def tensorboard_writer_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


def resolve_report_to(requested: Sequence[str] | None) -> list[str]:
    """The destinations to use: the requested ones (checked), or jsonl plus tensorboard when its writer is installed."""
    if requested is None:
        return ["jsonl", "tensorboard"] if tensorboard_writer_available() else ["jsonl"]
    unknown = [name for name in requested if name not in DESTINATIONS]
    if unknown:
        raise InputError(f"--report_to {' '.join(unknown)}: use none, or one or more of jsonl, tensorboard")
    if "none" in requested:
        if len(requested) > 1:
            raise InputError("--report_to none cannot be combined with other destinations")
        return []
    if "tensorboard" in requested and not tensorboard_writer_available():
        raise InputError("--report_to tensorboard needs tensorboardX (pip install 'flax-finetune[tensorboard]')")
    return list(dict.fromkeys(requested))


def plain(value: Any) -> Any:
    """numpy / jax scalars -> Python numbers; non-finite floats as strings (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def scalar_tag(key: str) -> str:
    for split in ("train", "eval", "test"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key[len(split) + 1:]}"
    return key


class JsonLinesLog:
    """metrics.jsonl: one JSON object per record."""

    def __init__(self, folder: Path):
        self.path = folder / METRICS_LOG

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({key: plain(value) for key, value in record.items()}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLog:
    """Scalar event files under <output_dir>/tensorboard/."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder / TENSORBOARD_FOLDER))

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            value = plain(value)
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_logs(folder: Path, destinations: Sequence[str]) -> list:
    sinks = {"jsonl": JsonLinesLog, "tensorboard": TensorBoardLog}
    return [sinks[name](folder) for name in destinations]
