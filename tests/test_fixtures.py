"""The fixture builders are deterministic: rebuilding gives the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA, FIXTURES, MODELS, snapshot

sys.path.insert(0, str(FIXTURES))
import build_models  # noqa: E402

sys.path.remove(str(FIXTURES))
RECORDED_ENVIRONMENT = json.loads((MODELS / build_models.BUILD_ENVIRONMENT).read_text())


def build(folder):
    subprocess.run([sys.executable, str(FIXTURES / "build_models.py"), str(folder)], check=True,
                   capture_output=True, timeout=900)
    return snapshot(folder)


@pytest.mark.spawns
@pytest.mark.slow
def test_model_builder_is_deterministic(tmp_path):
    """Two builds give the same bytes; in the environment that built the committed models
    (fixtures/models/build-environment.json), those bytes too. Other versions train T5 and
    Whisper to other bytes."""
    first = build(tmp_path / "first")
    assert build(tmp_path / "second") == first
    if build_models.build_environment() == RECORDED_ENVIRONMENT:
        assert first == snapshot(MODELS)


def test_committed_models_are_small():
    for folder in (path for path in MODELS.iterdir() if path.is_dir()):
        assert sum(len(content) for content in snapshot(folder).values()) < 2_000_000, folder.name


def test_data_generator_is_deterministic(tmp_path, monkeypatch):
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_data
    finally:
        sys.path.remove(str(FIXTURES))
    monkeypatch.setattr(make_data, "DATA", tmp_path)
    make_data.main()
    written = {folder.name for folder in tmp_path.iterdir()}
    assert written and "speech" not in written  # fixtures/make_speech.py writes that one
    committed = {name: content for name, content in snapshot(DATA).items() if name.split("/")[0] in written}
    assert snapshot(tmp_path) == committed


def test_fixture_models_learn_from_training_splits_only():
    """Tokenizers and pretraining read training files only, and the builder refuses anything else."""
    sources = [*build_models.corpus_files(), build_models.PROSE_TRAIN, build_models.SPEECH_TRAIN]
    assert sources and all(path.name.startswith("train.") for path in sources)
    build_models.check_training_splits_only(sources)
    with pytest.raises(SystemExit, match="refusing to build from evaluation data: .*validation.txt"):
        build_models.check_training_splits_only([*sources, DATA / "prose" / "validation.txt"])


def sentences(path) -> set[str]:
    return {sentence.strip() + "." for line in path.read_text().splitlines() for sentence in line.split(".") if sentence.strip()}


@pytest.mark.parametrize("folder", ["entities", "paraphrase", "reviews", "similarity", "speech", "summaries"])
def test_no_evaluation_example_occurs_in_training(folder):
    """A model trained on a training split has not seen any example it is evaluated on."""
    def examples(path):
        lines = path.read_text().splitlines()
        if folder == "speech":  # file_name,transcript: the clips differ, the transcripts must too
            return {line.split(",", 1)[1] for line in lines[1:]}
        return set(lines[1:] if path.suffix == ".csv" else lines)

    train = examples(next((DATA / folder).glob("train.*")))
    for path in (DATA / folder).glob("*.*"):
        if path.name.startswith(("validation.", "test.")):
            assert not examples(path) & train, path.name


def test_no_validation_sentence_of_the_prose_occurs_in_training():
    """The language-modelling validation text is new sentence by sentence, not only paragraph by paragraph."""
    assert not sentences(DATA / "prose" / "validation.txt") & sentences(DATA / "prose" / "train.txt")
