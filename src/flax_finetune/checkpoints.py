"""Resumable checkpoints through orbax: the train state plus where the run stood.

A checkpoint holds the TrainState (step, params, optimizer state) and a JSON
record of the data position (epoch, batch within the epoch, the seed the
shuffle and dropout keys derive from, the batch layout). Orbax writes each
checkpoint into a temporary folder and renames it when complete, so a crash
during a write leaves the previous checkpoint usable.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Optional

import jax

from flax_finetune.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "checkpoint"


def _orbax():
    import orbax.checkpoint as ocp

    _write_each_shard_from_one_replica(ocp)
    return ocp


@functools.lru_cache(maxsize=None)
def _write_each_shard_from_one_replica(ocp) -> None:
    """Turn off orbax's replica-parallel writing where it has the switch. It slices arrays that are
    replicated over part of the mesh (--mesh data:2,fsdp:4) inside `jax.sharding.set_mesh`, which
    jax 0.6 cannot enter (orbax 0.11.39: AttributeError __enter__); writing each shard from one of
    its replicas stores the same bytes."""
    handler = ocp.type_handlers.ArrayHandler
    if "use_replica_parallel" in inspect.signature(handler.__init__).parameters:
        ocp.type_handlers.register_type_handler(jax.Array, handler(use_replica_parallel=False), override=True)


class Checkpoints:
    """The checkpoints of one run, under `<output_dir>/checkpoints/checkpoint_<step>`."""

    def __init__(self, directory: Path, max_to_keep: Optional[int] = None):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._manager = None

    @property
    def manager(self):
        """The orbax manager, made (and orbax imported) on first use: a run that never saves never pays."""
        if self._manager is None:
            ocp = _orbax()
            self._manager = ocp.CheckpointManager(
                self.directory,
                item_names=("state", "position"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.max_to_keep, step_prefix=STEP_PREFIX, create=True
                ),
            )
        return self._manager

    def save(self, step: int, state: Any, position: dict) -> None:
        ocp = _orbax()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)),
        )

    def path(self, step: int) -> Path:
        """The folder of the checkpoint of `step`."""
        return self.directory / f"{STEP_PREFIX}_{step}"

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """The state at `step`, laid out like `target` (same tree, shardings), and its position record."""
        ocp = _orbax()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["position"])

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def find_checkpoint(path: str) -> tuple[Path, int]:
    """Resolve `--resume_from_checkpoint PATH` to (checkpoints folder, step).

    PATH may be one checkpoint folder (`.../checkpoint_40`), the checkpoints
    folder, or an output directory; the latter two mean its newest checkpoint.
    """
    candidate = Path(path)
    if candidate.name.startswith(f"{STEP_PREFIX}_") and candidate.name.split("_")[-1].isdigit():
        if not candidate.is_dir():
            raise InputError(f"--resume_from_checkpoint {path}: no such checkpoint")
        return candidate.parent, int(candidate.name.split("_")[-1])
    for folder in (candidate / CHECKPOINTS, candidate):
        steps = [
            int(child.name.split("_")[-1])
            for child in folder.glob(f"{STEP_PREFIX}_*")
            if child.is_dir() and child.name.split("_")[-1].isdigit()
        ]
        if steps:
            return folder, max(steps)
    raise InputError(f"--resume_from_checkpoint {path}: no checkpoint found there")
