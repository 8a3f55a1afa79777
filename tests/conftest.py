"""Shared test setup: offline Hugging Face libraries, fixture paths, script loading."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
DATA = FIXTURES / "data"
MODELS = FIXTURES / "models"
EXAMPLES = ROOT / "examples"

# No test may reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Keep the datasets cache of a test run out of the user's home."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets-cache"))


FLAX_MODELS_REASON = (
    "Transformers 5 has no Flax model classes; the model layer reports it (InputError) "
    "until this project ships its own Flax models"
)


def pytest_configure(config):
    """A session for an accelerator must run on it: fail at once if JAX fell back to another backend."""
    expected = os.environ.get("FLAX_FINETUNE_EXPECTED_BACKEND")
    if expected:
        import jax

        if jax.default_backend() != expected:
            raise pytest.UsageError(
                f"this session expects JAX on {expected}, but jax.default_backend() is {jax.default_backend()}"
            )


def pytest_collection_modifyitems(config, items):
    """Tests marked flax_models are expected to fail, strictly, where Transformers has no Flax models."""
    from importlib.metadata import version

    from flax_finetune.errors import InputError

    if int(version("transformers").split(".")[0]) < 5:
        return
    expected_failure = pytest.mark.xfail(strict=True, raises=InputError, reason=FLAX_MODELS_REASON)
    for item in items:
        if item.get_closest_marker("flax_models"):
            item.add_marker(expected_failure)


def load_script(relative_path: str):
    """Import examples/<relative_path> as a module (scripts are not a package)."""
    path = EXAMPLES / relative_path
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_results(output_dir: Path, split: str = "eval") -> dict:
    return json.loads((Path(output_dir) / f"{split}_results.json").read_text())


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove a failed run changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
