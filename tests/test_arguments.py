"""Command-line parsing with the familiar flag names."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flax_finetune.arguments import DataArguments, ModelArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError

TYPES = (ModelArguments, DataArguments, TrainingArguments)


def test_both_flag_spellings_and_bare_booleans():
    model, data, training = parse_args(
        TYPES,
        ["--model_name_or_path", "m", "--output_dir=out", "--per_device_train_batch_size=2",
         "--learning_rate", "1e-4", "--do_train", "--do_eval", "false", "--train_file", "t.csv"],
    )
    assert model.model_name_or_path == "m" and data.train_file == "t.csv"
    assert training.per_device_train_batch_size == 2 and training.learning_rate == 1e-4
    assert training.do_train is True and training.do_eval is False
    assert training.num_train_epochs == 3.0 and training.seed == 42  # the upstream defaults


def test_unknown_flags_and_bad_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--no_such_flag"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--dtype", "float8"])
    with pytest.raises(SystemExit):  # no abbreviations: a typo never lands on another flag
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--learning", "1"])


def test_checks_on_values_raise_input_errors():
    with pytest.raises(InputError, match="--per_device_train_batch_size must be at least 1"):
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--per_device_train_batch_size", "0"])
    with pytest.raises(InputError, match="--tokenizer_name"):
        parse_args(TYPES, ["--model_type", "gpt2", "--output_dir", "o"])
    with pytest.raises(InputError, match="--model_name_or_path"):
        parse_args(TYPES, ["--output_dir", "o"])


def test_a_json_file_of_flags(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "do_train": True, "seed": 7}))
    model, _, training = parse_args(TYPES, [str(path)])
    assert model.model_name_or_path == "m" and training.do_train is True and training.seed == 7


def test_help_groups_flags_by_dataclass(capsys):
    @dataclasses.dataclass
    class Extra:
        """Extra: a group of its own."""

        block_size: int = arg(128, "Tokens per block.")

    with pytest.raises(SystemExit):
        parse_args((*TYPES, Extra), ["--help"])
    text = capsys.readouterr().out
    for title in ("Model:", "Data:", "Training:", "Extra: a group of its own."):
        assert title in text
    assert "--block_size BLOCK_SIZE" in text and "Tokens per block. (default: 128)" in text
