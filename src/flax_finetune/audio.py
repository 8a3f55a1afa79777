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


def _opened(source: Any, base: Optional[Path]) -> tuple[Any, Any]:
    """(name for messages, what soundfile opens) of a file path or a {"path", "bytes"} row."""
    if isinstance(source, dict) and source.get("bytes"):
        return source.get("path") or "audio bytes", io.BytesIO(source["bytes"])
    path = Path(source["path"] if isinstance(source, dict) else source)
    path = path if path.is_absolute() or base is None else base / path
    return path, path


def read(source: Any, base: Optional[Path] = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate) of a file path or a {"path", "bytes"} row.

    Relative paths are read from `base`. An unreadable file is an InputError
    naming it.
    """
    import soundfile

    name, handle = _opened(source, base)
    try:
        samples, rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for missing, truncated or foreign files
        raise InputError(f"cannot read audio {name}: {error}") from None
    return samples.mean(axis=1), int(rate)


def duration(source: Any, base: Optional[Path] = None) -> float:
    """Seconds of audio in a file path or {"path", "bytes"} row, from the file's header (nothing decoded)."""
    import soundfile

    name, handle = _opened(source, base)
    try:
        info = soundfile.info(handle)
    except Exception as error:
        raise InputError(f"cannot read audio {name}: {error}") from None
    return info.frames / info.samplerate


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """`samples` at `rate` Hz -> `target_rate` Hz (polyphase filter)."""
    if rate == target_rate:
        return samples
    from scipy.signal import resample_poly

    common = math.gcd(rate, target_rate)
    return resample_poly(samples, target_rate // common, rate // common).astype(np.float32)
