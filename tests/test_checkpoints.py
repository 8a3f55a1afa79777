"""Resumable checkpoints: save, restore, and a resumed run that matches an uninterrupted one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flax_finetune.checkpoints import find_checkpoint
from flax_finetune.errors import InputError
from flax_finetune.outputs import OutputDir
from flax_finetune.trainer import Trainer
from test_training import args, toy_loss, toy_params, toy_rows


def train(folder, **overrides):
    output = OutputDir(str(folder), overwrite=True)
    output.create()
    trainer = Trainer(args(folder, **overrides), output, toy_loss, lambda params, batch: {})
    params = trainer.train(toy_params(), toy_rows(10))
    losses = {record["step"]: record["train_loss"] for record in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}
    return jax.device_get(params), losses


def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    full_params, full_losses = train(tmp_path / "full", save_steps=2)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [
        "checkpoint_2", "checkpoint_4", "checkpoint_6"
    ]
    resumed_params, resumed_losses = train(
        tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoints" / "checkpoint_4")
    )
    assert sorted(resumed_losses) == [5, 6]
    assert [resumed_losses[step] for step in (5, 6)] == [full_losses[step] for step in (5, 6)]
    for a, b in zip(jax.tree_util.tree_leaves(full_params), jax.tree_util.tree_leaves(resumed_params)):
        np.testing.assert_array_equal(a, b)


def test_save_total_limit_keeps_the_newest(tmp_path):
    train(tmp_path, save_steps=1, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_5", "checkpoint_6"]


def test_resume_finds_the_newest_checkpoint_of_an_output_dir(tmp_path):
    train(tmp_path, save_steps=2)
    folder, step = find_checkpoint(str(tmp_path))
    assert (folder.name, step) == ("checkpoints", 6)
    with pytest.raises(InputError, match="no checkpoint found"):
        find_checkpoint(str(tmp_path / "nowhere"))


def test_resume_with_another_batch_layout_is_refused(tmp_path):
    train(tmp_path / "first", save_steps=2)
    with pytest.raises(InputError, match="global_batch_size"):
        train(tmp_path / "second", per_device_train_batch_size=2,
              resume_from_checkpoint=str(tmp_path / "first"))
