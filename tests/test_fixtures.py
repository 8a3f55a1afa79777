"""The fixture builders are deterministic: rebuilding gives the committed bytes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DATA, FIXTURES, MODELS, snapshot


@pytest.mark.slow
@pytest.mark.flax_models
def test_rebuilt_models_equal_the_committed_ones(tmp_path):
    subprocess.run([sys.executable, str(FIXTURES / "build_models.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=600)
    assert snapshot(tmp_path) == snapshot(MODELS)


def test_committed_models_are_small():
    for folder in MODELS.iterdir():
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
