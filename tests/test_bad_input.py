"""Bad input stops a script before training with one clear line, leaving --output_dir as it was."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, EXAMPLES, MODELS, load_script
from flax_finetune.errors import InputError

GLUE = "text-classification/run_flax_glue.py"
CLM = "language-modeling/run_clm_flax.py"
MLM = "language-modeling/run_mlm_flax.py"
T5 = "language-modeling/run_t5_mlm_flax.py"
SUMMARIZATION = "summarization/run_summarization_flax.py"
NER = "token-classification/run_flax_ner.py"
QA = "question-answering/run_qa.py"
SPEECH = "speech-recognition/run_flax_speech_recognition_seq2seq.py"


def glue_args(output_dir, train, validation=None, *extra):
    return ["--model_name_or_path", str(MODELS / "tiny-bert"), "--output_dir", str(output_dir),
            "--train_file", str(train), "--validation_file", str(validation or DATA / "paraphrase" / "validation.csv"),
            "--overwrite_output_dir", "--disable_tqdm", *extra]


def clm_args(output_dir, train, *extra):
    return ["--model_name_or_path", str(MODELS / "tiny-gpt2"), "--output_dir", str(output_dir),
            "--train_file", str(train), "--do_train", "--overwrite_output_dir", "--disable_tqdm", *extra]


@pytest.fixture
def output_dir(tmp_path):
    """An output directory holding a file and an empty folder of the user's."""
    folder = tmp_path / "out"
    (folder / "notes").mkdir(parents=True)
    (folder / "keep.txt").write_text("the user's own file")
    return folder


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file under `folder` with its bytes, and every folder (None), empty ones included:
    a failed run must neither change a file nor add or remove a folder."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def common(output_dir, model, train, *extra):
    return ["--model_name_or_path", str(MODELS / model), "--output_dir", str(output_dir), "--overwrite_output_dir",
            "--train_file", str(train), "--do_train", "--disable_tqdm", *extra]


def latin1(path):
    path.write_bytes("sentence1,sentence2,label\ncaf\xe9 au lait,coffee,equivalent\n".encode("latin-1"))
    return path


def squad_with_wrong_start(folder):
    records = json.loads((DATA / "squad" / "validation.json").read_text())["data"]
    records[1]["answers"]["answer_start"] = [records[1]["answers"]["answer_start"][0] + 3]
    return write(folder / "squad.json", json.dumps({"data": records}))


def speech_with_broken_clip(folder):
    (folder / "broken.flac").write_bytes(b"not audio at all")
    return write(folder / "clips.csv", "file_name,transcript\nbroken.flac,hello there\n")


def with_slow_tokenizer(args):
    """`args` asking for the slow (Python) tokenizer; a skip where Transformers has no slow BERT
    tokenizer (5.x gives the fast one whatever use_fast says)."""
    from flax_finetune import models

    if models.load_tokenizer(str(MODELS / "tiny-bert"), use_fast=False).is_fast:
        pytest.skip("this Transformers has no slow BERT tokenizer")
    return [*args, "--use_fast_tokenizer", "false"]


CASES = {
    "glue: missing file": (GLUE, lambda d, t: glue_args(d, t / "nope.csv"), "--train_file .*nope.csv: no such file"),
    "glue: unsupported extension": (
        GLUE, lambda d, t: glue_args(d, write(t / "train.tsv", "a\tb\n")), "unsupported extension '.tsv'"),
    "glue: missing label column": (
        GLUE, lambda d, t: glue_args(d, write(t / "train.csv", "sentence1,sentence2,target\na,b,x\n")),
        "no column 'label'; the columns found are sentence1, sentence2, target"),
    "glue: missing text column": (
        GLUE, lambda d, t: glue_args(d, DATA / "paraphrase" / "train.csv", None, "--text_column_name", "premise"),
        "no column 'premise'; the columns found are sentence1, sentence2, label"),
    "glue: evaluation label not seen in training": (
        GLUE, lambda d, t: glue_args(d, DATA / "paraphrase" / "train.csv",
                                     write(t / "validation.csv", "sentence1,sentence2,label\na,b,maybe\n")),
        "labels not seen in training: maybe"),
    "clm: missing file": (CLM, lambda d, t: clm_args(d, t / "nope.txt"), "--train_file .*nope.txt: no such file"),
    "clm: unsupported extension": (CLM, lambda d, t: clm_args(d, write(t / "train.md", "# text\n")),
                                   "unsupported extension '.md'"),
    "clm: empty file": (CLM, lambda d, t: clm_args(d, write(t / "train.txt", "")), "the file is empty"),
    "clm: unknown model type": (
        CLM, lambda d, t: ["--model_type", "no-such-model", "--tokenizer_name", str(MODELS / "tiny-gpt2"),
                           "--output_dir", str(d), "--overwrite_output_dir", "--train_file",
                           str(DATA / "prose" / "validation.txt"), "--do_train"],
        "--model_type no-such-model: unknown"),
    "glue: text that is not UTF-8": (
        GLUE, lambda d, t: glue_args(d, latin1(t / "train.csv")), "the file is not valid UTF-8 text"),
    "clm: zero training steps": (
        CLM, lambda d, t: clm_args(d, DATA / "prose" / "validation.txt", "--num_train_epochs", "0"),
        "no training steps: raise --num_train_epochs or --max_steps"),
    "clm: --streaming without --max_steps": (
        CLM, lambda d, t: clm_args(d, DATA / "prose" / "validation.txt", "--streaming"),
        "--streaming needs --max_steps"),
    "clm: --streaming holding out a validation percentage": (
        CLM, lambda d, t: clm_args(d, DATA / "prose" / "validation.txt", "--streaming", "--max_steps", "2",
                                   "--do_eval"),
        "--streaming: give --validation_file"),
    "clm: --resume_from_checkpoint without a checkpoint": (
        CLM, lambda d, t: clm_args(d, DATA / "prose" / "validation.txt", "--resume_from_checkpoint", t / "run"),
        "--resume_from_checkpoint .*run: no checkpoint found there"),
    "clm: a tokenizer larger than the model's vocabulary": (
        CLM, lambda d, t: clm_args(d, DATA / "prose" / "validation.txt", "--tokenizer_name", MODELS / "tiny-t5"),
        r"the tokenizer has \d+ tokens but the model's vocabulary has 500: "
        "use the model's own tokenizer or a config with a larger vocab_size"),
    "mlm: missing file": (MLM, lambda d, t: common(d, "tiny-roberta", t / "nope.txt"), "nope.txt: no such file"),
    "mlm: a tokenizer without a mask token": (
        MLM, lambda d, t: common(d, "tiny-roberta", DATA / "prose" / "validation.txt", "--tokenizer_name",
                                 MODELS / "tiny-gpt2"),
        "the tokenizer has no mask or padding token"),
    "t5: a tokenizer without sentinel tokens": (
        T5, lambda d, t: common(d, "tiny-t5", DATA / "prose" / "train.txt", "--tokenizer_name", MODELS / "tiny-gpt2"),
        "the tokenizer has 0 sentinel tokens"),
    "t5: a tokenizer without an end-of-sequence token": (
        T5, lambda d, t: common(d, "tiny-t5", DATA / "prose" / "train.txt", "--tokenizer_name", MODELS / "tiny-bert"),
        "the tokenizer has no end-of-sequence token"),
    "t5: too little text for one chunk": (
        T5, lambda d, t: common(d, "tiny-t5", write(t / "short.txt", "A few words only.\n"), "--max_seq_length", "128"),
        "fewer than one chunk of 141"),
    "summarization: missing summary column": (
        SUMMARIZATION, lambda d, t: common(d, "tiny-t5", write(t / "s.jsonl", '{"document": "a text"}\n'),
                                           "--summary_column", "abstract"),
        "no column 'abstract'; the columns found are document"),
    "ner: evaluation tag not seen in training": (
        NER, lambda d, t: common(d, "tiny-bert", DATA / "entities" / "train.json", "--do_eval", "--validation_file",
                                 write(t / "v.json", '{"tokens": ["Ada"], "ner_tags": ["B-MISC"]}\n')),
        "labels not seen in training: B-MISC"),
    "ner: missing file": (NER, lambda d, t: common(d, "tiny-bert", t / "nope.json"), "nope.json: no such file"),
    "ner: a slow tokenizer": (
        NER, lambda d, t: with_slow_tokenizer(common(d, "tiny-bert", DATA / "entities" / "train.json")),
        r"token classification needs a fast tokenizer \(it maps tokens back to words\)"),
    "qa: answer_start not matching the answer": (
        QA, lambda d, t: common(d, "tiny-bert", squad_with_wrong_start(t), "--version_2_with_negative"),
        "answer 'a basket of .*' is not at answer_start"),
    "qa: v2 data without --version_2_with_negative": (
        QA, lambda d, t: common(d, "tiny-bert", DATA / "squad" / "validation.json"),
        "has no answer; SQuAD v2 data needs --version_2_with_negative"),
    "qa: a slow tokenizer": (
        QA, lambda d, t: with_slow_tokenizer(common(d, "tiny-bert", DATA / "squad" / "train.json",
                                                    "--version_2_with_negative")),
        r"question answering needs a fast tokenizer \(it maps tokens back to characters\)"),
    "speech: unreadable audio": (
        SPEECH, lambda d, t: common(d, "tiny-whisper", speech_with_broken_clip(t), "--audio_column_name", "file_name",
                                    "--text_column_name", "transcript"),
        "cannot read audio .*broken.flac"),
    "speech: missing transcript column": (
        SPEECH, lambda d, t: common(d, "tiny-whisper", DATA / "speech" / "train.csv", "--audio_column_name", "file_name"),
        "no column 'text'; the columns found are file_name, transcript"),
}


# One case of each script also runs as a command: a child process shows what a user sees.
COMMAND_CASES = [
    "glue: text that is not UTF-8",
    "clm: a tokenizer larger than the model's vocabulary",
    "mlm: a tokenizer without a mask token",
    "t5: too little text for one chunk",
    "summarization: missing summary column",
    "ner: a slow tokenizer",
    "qa: a slow tokenizer",
    "speech: unreadable audio",
]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_leaves_the_output_directory_untouched(case, output_dir, tmp_path):
    """main() raises one single-line InputError; nothing under tmp_path (the inputs and
    --output_dir) changes."""
    script, make_args, message = CASES[case]
    args = make_args(output_dir, tmp_path)
    before = tree(tmp_path)
    with pytest.raises(InputError, match=message) as error:
        load_script(script).main(args)
    assert "\n" not in str(error.value)
    assert tree(tmp_path) == before


def test_every_script_has_a_command_case():
    """COMMAND_CASES runs each of the eight scripts once."""
    assert sorted(CASES[case][0] for case in COMMAND_CASES) == sorted(
        [GLUE, CLM, MLM, T5, SUMMARIZATION, NER, QA, SPEECH])


@pytest.mark.spawns
@pytest.mark.parametrize("case", COMMAND_CASES)
def test_the_command_prints_one_error_line_and_exits_2(case, output_dir, tmp_path):
    """`python <script> ...` exits with status 2; the last stderr line is `error: <message>` and the
    only one mentioning an error (log lines may come before it); no traceback; nothing under
    tmp_path changes."""
    script, make_args, message = CASES[case]
    args = [str(arg) for arg in make_args(output_dir, tmp_path)]
    before = tree(tmp_path)
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], result.stderr
    assert lines[-1].startswith("error: ") and re.search(message, lines[-1])
    assert tree(tmp_path) == before


@pytest.mark.parametrize("script", [GLUE, CLM])
def test_non_empty_output_dir_needs_overwrite(script, output_dir):
    args = (glue_args if script == GLUE else clm_args)(output_dir, DATA / "paraphrase" / "train.csv")
    args.remove("--overwrite_output_dir")
    before = tree(output_dir)
    with pytest.raises(InputError, match="not empty; pass --overwrite_output_dir"):
        load_script(script).main(args)
    assert tree(output_dir) == before


def test_user_files_survive_overwrite_output_dir(output_dir):
    """--overwrite_output_dir replaces what the script writes and nothing else."""
    (output_dir / "eval_results.json").write_text("{}")
    load_script(GLUE).main(glue_args(output_dir, DATA / "paraphrase" / "train.csv", None, "--max_train_samples", "8",
                                     "--num_train_epochs", "1"))
    assert (output_dir / "keep.txt").read_text() == "the user's own file"
    assert (output_dir / "notes").is_dir()
    assert "eval_accuracy" in (output_dir / "eval_results.json").read_text()


def test_too_long_sequences_and_tiny_datasets_run_with_warnings(output_dir, package_log):
    """--max_seq_length above the model's limit is capped; 3 examples still make one (padded) batch."""
    load_script(GLUE).main(glue_args(output_dir, DATA / "paraphrase" / "train.csv", None, "--max_train_samples", "3",
                                     "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                                     "--max_seq_length", "1000"))
    assert "--max_seq_length 1000 exceeds the model's maximum 256: using 256" in package_log.text
    assert "the train split has 3 examples, fewer than one global batch of 8" in package_log.text
    assert json.loads((output_dir / "train_results.json").read_text())["train_steps"] == 1
