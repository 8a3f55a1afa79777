"""The output directory: safety checks, results files, the per-step metrics log.

Nothing is written until `OutputDir.create()`, which a script calls only once
its inputs have been checked, so a failed start leaves the directory as it
was. Files are written atomically (temporary file, then rename): a crash never
leaves a half-written results file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from flax_finetune import reporting
from flax_finetune.errors import InputError
from flax_finetune.reporting import METRICS_LOG


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class OutputDir:
    """The folder a run writes to: results, metrics log, checkpoints, the exported model."""

    def __init__(self, path: str, overwrite: bool, is_writer: bool = True, report_to: Optional[Sequence[str]] = None):
        self.path = Path(path)
        self.is_writer = is_writer
        self.destinations = reporting.resolve_report_to(report_to)
        self.logs: list = []
        if not is_writer:  # process 0 checks and writes; the others only compute
            return
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--output_dir {path}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise InputError(
                f"--output_dir {path}: the directory is not empty; "
                "pass --overwrite_output_dir to write into it (only files this script writes are replaced)"
            )

    def create(self, keep_log: bool = False) -> None:
        """Make the folder; called once the inputs are known to be good.

        A new run starts a new metrics log; a resumed one keeps it (see `truncate_log`).
        """
        if self.is_writer:
            self.path.mkdir(parents=True, exist_ok=True)
            if not keep_log:
                (self.path / METRICS_LOG).unlink(missing_ok=True)
            self.logs = reporting.open_logs(self.path, self.destinations)

    def truncate_log(self, step: int) -> None:
        """Drop log lines past `step`: a resumed run logs those steps again, as they happen."""
        log = self.path / METRICS_LOG
        if self.is_writer and log.exists():
            lines = [line for line in log.read_text(encoding="utf-8").splitlines(keepends=True)
                     if json.loads(line).get("step", 0) <= step]
            write_atomically(log, "".join(lines))

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        path = self.path / name
        if self.is_writer:
            clean = {key: reporting.plain(value) for key, value in data.items()}
            write_atomically(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
        return path

    def write_results(self, split: str, metrics: Mapping[str, Any]) -> Path:
        """`{split}_results.json`, keys prefixed with the split (eval_accuracy, ...)."""
        prefixed = {key if key.startswith(f"{split}_") else f"{split}_{key}": value for key, value in metrics.items()}
        return self.write_json(f"{split}_results.json", prefixed)

    def log(self, record: Mapping[str, Any]) -> None:
        """One record (a step's metrics) to every --report_to destination."""
        for log in self.logs:
            log.write(record)

    def close(self) -> None:
        for log in self.logs:
            log.close()
        self.logs = []

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        if self.is_writer:
            write_atomically(path, text)
        return path
