"""The eight scripts accept the exact command lines of the original Transformers Flax example tests.

Source: huggingface/transformers, examples/flax/test_flax_examples.py (the version with
test_run_flax_speech_recognition_seq2seq). Each list below keeps the original flags and values
in their original order; only paths are swapped: hub model names for this repo's fixture models,
the original test files for fixture files. Where the original test read one file for every
split, so does its list here.

Every list is parsed through its script's own `main` (stopped right after parsing), and every
flag must land in its field, abbreviations included (`--dataset_config clean` ->
`dataset_config_name`). Only the cheapest lists are also run to the end (RUN_TO_THE_END): the
originals train for whole epochs and evaluate every 2 steps. Each `main`, measured twice on 2
shared CPU cores, took in CPU seconds: clm 6.1-6.6, ner 8.7-9.3, t5_mlm 9.2-9.6, mlm 9.2-9.5,
qa 9.3-10.3, summarization 11.9-12.1, speech 12.7-13.4, glue 13.4-14.4 (600 steps, 300
evaluations); about 85 s for all eight, and more in wall time (clm: 9 s). The three cheapest
run, about 25 CPU seconds together (35 s of wall time with the cores busy with other jobs); the
other five, speech included (its end-to-end test runs nearly this list), are parsed only.
"""

from __future__ import annotations

import math

import pytest

from conftest import DATA, MODELS, load_script, read_results

SCRIPTS = {
    "glue": "text-classification/run_flax_glue.py",
    "clm": "language-modeling/run_clm_flax.py",
    "summarization": "summarization/run_summarization_flax.py",
    "mlm": "language-modeling/run_mlm_flax.py",
    "t5_mlm": "language-modeling/run_t5_mlm_flax.py",
    "ner": "token-classification/run_flax_ner.py",
    "qa": "question-answering/run_qa.py",
    "speech": "speech-recognition/run_flax_speech_recognition_seq2seq.py",
}

# {models}, {data} and {output_dir} stand for fixtures/models, fixtures/data and the test's folder.
UPSTREAM_COMMAND_LINES = {
    # distilbert/distilbert-base-uncased -> tiny-distilbert; MRPC/train.csv, MRPC/dev.csv -> paraphrase/
    "glue": """
        --model_name_or_path {models}/tiny-distilbert
        --output_dir {output_dir}
        --train_file {data}/paraphrase/train.csv
        --validation_file {data}/paraphrase/validation.csv
        --per_device_train_batch_size=2
        --per_device_eval_batch_size=1
        --learning_rate=1e-4
        --eval_steps=2
        --warmup_steps=2
        --seed=42
        --max_seq_length=128
    """,
    # distilbert/distilgpt2 -> tiny-gpt2; sample_text.txt -> prose/validation.txt
    "clm": """
        --model_name_or_path {models}/tiny-gpt2
        --train_file {data}/prose/validation.txt
        --validation_file {data}/prose/validation.txt
        --do_train
        --do_eval
        --block_size 128
        --per_device_train_batch_size 4
        --per_device_eval_batch_size 4
        --num_train_epochs 2
        --logging_steps 2 --eval_steps 2
        --output_dir {output_dir}
        --overwrite_output_dir
    """,
    # google-t5/t5-small -> tiny-t5; xsum/sample.json -> summaries/validation.json
    "summarization": """
        --model_name_or_path {models}/tiny-t5
        --train_file {data}/summaries/validation.json
        --validation_file {data}/summaries/validation.json
        --test_file {data}/summaries/validation.json
        --output_dir {output_dir}
        --overwrite_output_dir
        --num_train_epochs=3
        --warmup_steps=8
        --do_train
        --do_eval
        --do_predict
        --learning_rate=2e-4
        --per_device_train_batch_size=2
        --per_device_eval_batch_size=1
        --predict_with_generate
    """,
    # distilbert/distilroberta-base -> tiny-roberta; sample_text.txt -> prose/validation.txt
    "mlm": """
        --model_name_or_path {models}/tiny-roberta
        --train_file {data}/prose/validation.txt
        --validation_file {data}/prose/validation.txt
        --output_dir {output_dir}
        --overwrite_output_dir
        --max_seq_length 128
        --per_device_train_batch_size 4
        --per_device_eval_batch_size 4
        --logging_steps 2 --eval_steps 2
        --do_train
        --do_eval
        --num_train_epochs=1
    """,
    # google-t5/t5-small -> tiny-t5; sample_text.txt -> prose/validation.txt
    "t5_mlm": """
        --model_name_or_path {models}/tiny-t5
        --train_file {data}/prose/validation.txt
        --validation_file {data}/prose/validation.txt
        --do_train
        --do_eval
        --max_seq_length 128
        --per_device_train_batch_size 4
        --per_device_eval_batch_size 4
        --num_train_epochs 2
        --logging_steps 2 --eval_steps 2
        --output_dir {output_dir}
        --overwrite_output_dir
    """,
    # google-bert/bert-base-uncased -> tiny-bert; conll/sample.json -> entities/validation.json.
    # The original gives --num_train_epochs=7 with more than one GPU, else 2: here 2.
    "ner": """
        --model_name_or_path {models}/tiny-bert
        --train_file {data}/entities/validation.json
        --validation_file {data}/entities/validation.json
        --output_dir {output_dir}
        --overwrite_output_dir
        --do_train
        --do_eval
        --warmup_steps=2
        --learning_rate=2e-4
        --logging_steps 2 --eval_steps 2
        --per_device_train_batch_size=2
        --per_device_eval_batch_size=2
        --num_train_epochs=2
        --seed 7
    """,
    # google-bert/bert-base-uncased -> tiny-bert; SQUAD/sample.json -> squad/validation.json
    "qa": """
        --model_name_or_path {models}/tiny-bert
        --version_2_with_negative
        --train_file {data}/squad/validation.json
        --validation_file {data}/squad/validation.json
        --output_dir {output_dir}
        --overwrite_output_dir
        --num_train_epochs=3
        --warmup_steps=2
        --do_train
        --do_eval
        --logging_steps 2 --eval_steps 2
        --learning_rate=2e-4
        --per_device_train_batch_size=2
        --per_device_eval_batch_size=1
    """,
    # openai/whisper-tiny.en -> tiny-whisper. The hub dataset (--dataset_name
    # hf-internal-testing/librispeech_asr_dummy, whose validation split the original trains and
    # evaluates on) -> the local-file flags --train_file and --validation_file, both
    # speech/validation.csv, with --audio_column_name and --text_column_name for its columns.
    # --dataset_config, --train_split_name and --eval_split_name stay: they are parsed, and apply
    # to a --dataset_name only, as does --trust_remote_code for a dataset's loading script.
    "speech": """
        --model_name_or_path {models}/tiny-whisper
        --train_file {data}/speech/validation.csv
        --validation_file {data}/speech/validation.csv
        --audio_column_name file_name --text_column_name transcript
        --dataset_config clean
        --train_split_name validation
        --eval_split_name validation
        --trust_remote_code
        --output_dir {output_dir}
        --overwrite_output_dir
        --num_train_epochs=2
        --max_train_samples 10
        --max_eval_samples 10
        --warmup_steps=8
        --do_train
        --do_eval
        --learning_rate=2e-4
        --per_device_train_batch_size=2
        --per_device_eval_batch_size=1
        --predict_with_generate
    """,
}

# Lists cheap enough to run to the end (see the module docstring), with the metric the original
# test asserted on; its thresholds were for full-size models and the original data.
RUN_TO_THE_END = {
    "clm": ("eval", "eval_perplexity"),
    "ner": ("eval", "eval_f1"),
    "t5_mlm": ("eval", "eval_accuracy"),
}


def command_line(name: str, output_dir) -> list[str]:
    """The original argument list of `name` with this repo's paths."""
    places = {"models": MODELS, "data": DATA, "output_dir": output_dir}
    return [token.format(**places) for token in UPSTREAM_COMMAND_LINES[name].split()]


class Parsed(Exception):
    """Stops a script's main right after parsing, carrying the dataclass instances."""

    def __init__(self, instances):
        super().__init__()
        self.instances = instances


def parse_with_script(name: str, argv: list[str], monkeypatch) -> dict:
    """Every field value the script's own main gets from `argv`: {field name: value}."""
    script = load_script(SCRIPTS[name])
    real_parse_args = script.parse_args

    def parse_and_stop(*args, **kwargs):
        raise Parsed(real_parse_args(*args, **kwargs))

    monkeypatch.setattr(script, "parse_args", parse_and_stop)
    with pytest.raises(Parsed) as parsed:
        script.main(argv)
    return {field: value for instance in parsed.value.instances for field, value in vars(instance).items()}


def given_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag without dashes, value or None for a bare flag) for each flag of `argv`."""
    flags = []
    for index, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        flag, equals, value = token[2:].partition("=")
        if not equals:
            following = argv[index + 1] if index + 1 < len(argv) else "--"
            value = None if following.startswith("--") else following
        flags.append((flag, value))
    return flags


@pytest.mark.parametrize("name", UPSTREAM_COMMAND_LINES)
def test_every_flag_lands_in_its_field(name, tmp_path, monkeypatch):
    argv = command_line(name, tmp_path)
    fields = parse_with_script(name, argv, monkeypatch)
    for flag, value in given_flags(argv):
        matches = [field for field in fields if field == flag] or [field for field in fields if field.startswith(flag)]
        assert len(matches) == 1, f"--{flag} names no single field: {matches}"
        parsed = fields[matches[0]]
        expected = True if value is None else type(parsed)(value)
        assert parsed == expected, f"--{flag} {value} -> {matches[0]} = {parsed!r}"


def test_the_asr_abbreviation_is_the_dataset_config_name(tmp_path, monkeypatch):
    fields = parse_with_script("speech", command_line("speech", tmp_path), monkeypatch)
    assert fields["dataset_config_name"] == "clean"
    assert fields["train_split_name"] == fields["eval_split_name"] == "validation"
    assert fields["trust_remote_code"] is True


@pytest.mark.parametrize("name", RUN_TO_THE_END)
def test_the_original_command_line_runs_to_the_end(name, tmp_path):
    split, metric = RUN_TO_THE_END[name]
    load_script(SCRIPTS[name]).main(command_line(name, tmp_path))
    assert math.isfinite(read_results(tmp_path, split)[metric])
