"""Progress bars: one per epoch, quiet under --disable_tqdm."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def progress_bar(total: int, initial: int, description: str, disable: bool, leave: bool = True) -> Iterator:
    """A tqdm bar of `total` steps starting at `initial`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=description, disable=disable, leave=leave, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
