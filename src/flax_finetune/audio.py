"""Audio in, without ffmpeg or torch: soundfile decodes, scipy resamples.

`datasets` 5 decodes audio only through torchcodec, which does not load beside
the CPU torch of these machines; so audio columns are read here instead:
file paths (relative to the data file) or hub rows of {"path", "bytes"}.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from flax_finetune.errors import InputError


def read(source: Any, base: Optional[Path] = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate) of a file path or a {"path", "bytes"} row.

    Relative paths are read from `base`. An unreadable file is an InputError
    naming it.
    """
    import soundfile

    if isinstance(source, dict) and source.get("bytes"):
        name, handle = source.get("path") or "audio bytes", io.BytesIO(source["bytes"])
    else:
        path = Path(source["path"] if isinstance(source, dict) else source)
        name = handle = path if path.is_absolute() or base is None else base / path
    try:
        samples, rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for missing, truncated or foreign files
        raise InputError(f"cannot read audio {name}: {error}") from None
    return samples.mean(axis=1), int(rate)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """`samples` at `rate` Hz -> `target_rate` Hz (polyphase filter)."""
    if rate == target_rate:
        return samples
    from scipy.signal import resample_poly

    common = math.gcd(rate, target_rate)
    return resample_poly(samples, target_rate // common, rate // common).astype(np.float32)
