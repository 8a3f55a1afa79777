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
