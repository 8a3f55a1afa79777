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
    with pytest.raises(SystemExit):  # not a prefix of any flag either
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--learning_rates", "1"])
    assert "unrecognized arguments: --learning_rates" in capsys.readouterr().err


def test_an_unambiguous_prefix_stands_for_its_flag():
    """As with the original HfArgumentParser: the Transformers ASR test passes `--dataset_config clean`."""
    model, data, training = parse_args(
        TYPES,
        ["--model_name_or", "m", "--output_dir", "o", "--dataset_config", "clean", "--learning=1e-3",
         "--do_tr", "--per_device_train", "4"],
    )
    assert model.model_name_or_path == "m" and data.dataset_config_name == "clean"
    assert training.learning_rate == 1e-3 and training.do_train is True
    assert training.per_device_train_batch_size == 4 and training.per_device_eval_batch_size == 8


def test_a_full_flag_name_wins_over_longer_flags_it_is_a_prefix_of():
    @dataclasses.dataclass
    class Blocks:
        """Blocks."""

        block: int = arg(1, "Block.")
        block_size: int = arg(2, "Block size.")

    (blocks,) = parse_args((Blocks,), ["--block", "5"])
    assert blocks.block == 5 and blocks.block_size == 2


def test_an_ambiguous_prefix_is_an_error_naming_the_candidates(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(TYPES, ["--model_name_or_path", "m", "--output_dir", "o", "--do"])
    assert stop.value.code == 2
    assert "ambiguous option: --do could match --do_train, --do_eval, --do_predict" in capsys.readouterr().err


def test_json_keys_must_be_full_flag_names(tmp_path, capsys):
    """HfArgumentParser's JSON files took only exact field names: a prefix there is an unknown key."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "dataset_config": "clean"}))
    with pytest.raises(SystemExit) as stop:
        parse_args(TYPES, [str(path)])
    assert stop.value.code == 2
    assert "unrecognized arguments: --dataset_config clean" in capsys.readouterr().err


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
