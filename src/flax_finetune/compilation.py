"""The persistent JAX compilation cache every script run uses, so a rerun does not compile again.

Where it lives, first match wins: `--compilation_cache_dir PATH`; `$JAX_COMPILATION_CACHE_DIR`;
`$XDG_CACHE_HOME/flax-finetune/jax`; else the platform's user cache folder (`~/.cache` on Linux,
`~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows) + `flax-finetune/jax`.
`--compilation_cache_dir none` (or an empty value) turns it off; on jax 0.4 it is off.

Which programs are cached: those slower to compile than `min_compile_seconds(jax version)`, unless
`$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise. The cache is trusted code: keep it in a
folder only you can write to.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

logger = logging.getLogger("flax_finetune")

DIRECTORY_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
THRESHOLD_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
OFF = ("", "none")


def user_cache_root(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> Path:
    """The user's cache folder: $XDG_CACHE_HOME where set, else the platform's convention."""
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"])
    if platform == "win32" and environ.get("LOCALAPPDATA"):
        return Path(environ["LOCALAPPDATA"])
    if platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path.home() / ".cache"


def cache_directory(requested: Optional[str], environ: Mapping[str, str] = os.environ,
                    platform: str = sys.platform) -> Optional[Path]:
    """The cache folder for a `--compilation_cache_dir` value (None: not given); None when turned off."""
    if requested is None:
        requested = environ.get(DIRECTORY_VARIABLE)
        if requested is None:
            return user_cache_root(environ, platform) / "flax-finetune" / "jax"
    if requested.strip().lower() in OFF:
        return None
    return Path(requested).expanduser()


def min_compile_seconds(jax_version: str) -> float:
    """The compile time from which a program is cached: every program where that is safe.

    jax 0.4 (jaxlib 0.4.26 on CPU) runs some programs read back from the cache wrongly: a LoRA
    train step read back crashed (segfault, abort) or computed other numbers than the same step
    compiled afresh, in the tf440 and minimums cells. So nothing is cached there (infinity). Below
    jax 0.9 only programs slower than 0.5 s to compile are cached.
    """
    major, minor = (int(part) for part in jax_version.split(".")[:2])
    if (major, minor) < (0, 5):
        return math.inf
    return 0.0 if (major, minor) >= (0, 9) else 0.5


def enable(requested: Optional[str]) -> Optional[Path]:
    """Point JAX's persistent compilation cache at `cache_directory(requested)` (or turn it off), and
    log where it is. Call before the first compilation of the process: JAX settles its cache then."""
    import jax

    directory = cache_directory(requested)
    if directory is not None and THRESHOLD_VARIABLE not in os.environ and math.isinf(
            min_compile_seconds(jax.__version__)):
        logger.info("compilation cache: off on jax %s (it runs some cached programs wrongly)", jax.__version__)
        directory = None
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        logger.info("compilation cache: off")
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if THRESHOLD_VARIABLE not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds(jax.__version__))
    logger.info("compilation cache: %s", directory)
    return directory
