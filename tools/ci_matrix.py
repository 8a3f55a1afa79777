#!/usr/bin/env python
"""The GitHub Actions job matrix, from `nox -l --json`: one job per test session.

    nox -l --json -t tests slow | python tools/ci_matrix.py

CPU sessions run on GitHub's hosted Linux runners. GPU and TPU sessions run on
self-hosted runners with the labels below, and are listed only where the
repository says such runners exist (the variables GPU_RUNNERS / TPU_RUNNERS
set to "true"): a job that waits forever for a runner is worse than none.
"""

from __future__ import annotations

import json
import os
import re
import sys

RUNNERS = {
    "cpu": "ubuntu-24.04",
    "cuda12": ["self-hosted", "linux", "x64", "gpu-cuda12"],
    "tpu": ["self-hosted", "linux", "x64", "tpu"],
}
AVAILABLE = {"cpu": lambda: True,
             "cuda12": lambda: os.environ.get("GPU_RUNNERS") == "true",
             "tpu": lambda: os.environ.get("TPU_RUNNERS") == "true"}


def job(session: dict) -> dict | None:
    """One matrix entry for a nox session, or None when its backend has no runner here."""
    backend = next(tag for tag in session["tags"] if tag in RUNNERS)
    if not AVAILABLE[backend]():
        return None
    cell = re.search(r"\((.*)\)", session["session"]).group(1)
    return {
        "session": session["session"],
        "id": re.sub(r"[^A-Za-z0-9-]+", "-", session["session"]).strip("-"),
        "python": session["python"],
        "runs-on": RUNNERS[backend],
        "constraints": f"constraints/{backend}-{cell}.txt",
    }


def matrix(sessions: list[dict]) -> dict:
    return {"include": [entry for entry in map(job, sessions) if entry is not None]}


if __name__ == "__main__":
    source = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    print(json.dumps(matrix(json.load(source)), separators=(",", ":")))
