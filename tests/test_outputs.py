"""The output directory: refused when not empty, other files kept, results written whole."""

from __future__ import annotations

import json

import pytest

from flax_finetune.errors import InputError
from flax_finetune.outputs import OutputDir


def test_a_non_empty_directory_needs_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite_output_dir"):
        OutputDir(str(tmp_path), overwrite=False)
    output = OutputDir(str(tmp_path), overwrite=True)
    output.create()
    output.write_results("eval", {"accuracy": 0.5})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_results_keys_carry_the_split_and_plain_numbers(tmp_path):
    import numpy as np

    output = OutputDir(str(tmp_path / "run"), overwrite=False)
    output.create()
    output.write_results("test", {"accuracy": np.float32(0.25), "test_f1": 1.0, "perplexity": float("inf")})
    assert json.loads((tmp_path / "run" / "test_results.json").read_text()) == {
        "test_accuracy": 0.25, "test_f1": 1.0, "test_perplexity": "inf"
    }
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the temporary file was renamed away


def test_nothing_is_written_before_create(tmp_path):
    OutputDir(str(tmp_path / "new"), overwrite=False)
    assert not (tmp_path / "new").exists()
