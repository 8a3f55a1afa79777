"""The one exception a script raises for bad input, and the entry point that reports it."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class InputError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback.

    Raised before anything is written to the output directory, so a failed
    start leaves the directory exactly as it was.
    """


class TrainingStopped(Exception):
    """Training could not go on (the loss became non-finite): reported as one line, exit status 1."""


def run_cli(main: Callable[[Sequence[str] | None], object]) -> None:
    """Run a script's `main` as a command: an InputError becomes `error: ...` and exit 2,
    a TrainingStopped `error: ...` and exit 1."""
    try:
        main(None)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
