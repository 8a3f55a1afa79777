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


@pytest.fixture(scope="module")
def parity_settings():
    """For parity tests: full-precision float32 matrix products (GPUs and TPUs otherwise use fewer
    bits), and most XLA optimizations off (every program there is tiny and runs a few times, so
    optimizing costs more than it saves)."""
    import jax

    optimizations_were_disabled = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    with jax.default_matmul_precision("float32"):
        yield
    jax.config.update("jax_disable_most_optimizations", optimizations_were_disabled)


@pytest.fixture
def package_log(caplog):
    """caplog for this package's loggers, which do not propagate to the root logger (where pytest
    listens): its handler goes on the package logger itself, at INFO."""
    import logging

    logger = logging.getLogger("flax_finetune")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def skip_where_the_reference_is_broken(flax_class_name: str) -> None:
    """Skip a parity case whose Transformers class cannot run with this jax: in Transformers 4.40
    some Flax question-answering classes (DistilBERT's, ALBERT's) call `logits.split(...)`, an
    `Array.split` that jax arrays do not have (0.4.26 nor 0.9.2); later Transformers (4.57) call
    `jnp.split`, and the case runs."""
    import inspect

    import jax
    import jax.numpy as jnp
    import transformers

    flax_class = getattr(transformers, flax_class_name, None)
    if flax_class is None or "logits.split(" not in inspect.getsource(flax_class.module_class):
        return
    try:
        jax.eval_shape(lambda x: x.split(2), jax.ShapeDtypeStruct((2,), jnp.float32))
    except AttributeError:
        pytest.skip(f"no reference: Transformers' {flax_class_name} calls Array.split, which jax {jax.__version__} lacks")


def adamw_losses(loss_fn, params, steps: int = 3) -> list[float]:
    """The losses of `steps` jitted AdamW steps (learning rate 1e-2, weight decay 0.01) minimising
    `loss_fn(params)` from `params`: the parity tests compare them between two implementations."""
    import jax
    import optax

    optimizer = optax.adamw(1e-2, weight_decay=0.01)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


def pytest_collection_modifyitems(items):
    """The Flax parity tests of the families in tests/test_family_*.py also carry `family_parity`: the
    CPU matrix runs them in one Transformers 4.57 cell (the reference the issue names) instead of in
    every cell with Flax classes, which would add minutes per cell (see noxfile.FAMILY_PARITY_CELL)."""
    for item in items:
        if item.path.name.startswith("test_family_") and item.get_closest_marker("parity"):
            item.add_marker(pytest.mark.family_parity)


def pytest_configure(config):
    """A session for an accelerator must run on it: fail at once if JAX fell back to another backend."""
    config.addinivalue_line("markers", "family_parity: a new family's Flax parity test (added to its parity tests)")
    expected = os.environ.get("FLAX_FINETUNE_EXPECTED_BACKEND")
    if expected:
        import jax

        if jax.default_backend() != expected:
            raise pytest.UsageError(
                f"this session expects JAX on {expected}, but jax.default_backend() is {jax.default_backend()}"
            )


def load_module(path: Path, name: str):
    """Import the file at `path` as module `name` (scripts, benchmarks and the noxfile are no package);
    registered in sys.modules first, where dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(relative_path: str):
    """Import examples/<relative_path> as a module, once."""
    path = EXAMPLES / relative_path
    return sys.modules.get(path.stem) or load_module(path, path.stem)


def read_results(output_dir: Path, split: str = "eval") -> dict:
    return json.loads((Path(output_dir) / f"{split}_results.json").read_text())


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove a failed run changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
