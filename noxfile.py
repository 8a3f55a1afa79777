"""Test sessions, one uv environment per matrix cell, all generated from the CELLS table.

    nox -l                 # every session, one line each
    nox -s tests-cpu       # the fast tests in every CPU cell
    nox -s demo            # run_flax_glue on the bundled fixture, print its metrics
    nox -s lock            # regenerate constraints/ from pyproject.toml and CELLS
    nox -s fixtures        # rebuild fixtures/data and fixtures/models
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.5.1"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests-cpu"]

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "constraints"
REPORTS = ROOT / "reports"
# Resolution date of every lock: a rerun of `nox -s lock` gives the same files.
EXCLUDE_NEWER = "2026-11-28T00:00:00Z"
LOCK_PLATFORM = "x86_64-manylinux_2_28"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One matrix cell: a JAX backend, a Transformers line, the Python and pins it runs with."""

    backend: str
    transformers: str
    python: str
    pins: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"tf{self.transformers.replace('.', '')}"

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.id}-py{self.python.replace('.', '')}"

    @property
    def requirements(self) -> Path:
        return CONSTRAINTS / f"{self.name}.in"

    @property
    def constraints(self) -> Path:
        return CONSTRAINTS / f"{self.name}.txt"


# Flax T5 in Transformers 4.x calls jnp.clip(a_max=...), removed in jax 0.10: the 4.57 cell stays on jax 0.9.
CELLS = [
    Cell("cpu", "4.57", "3.11", ("transformers==4.57.*", "jax==0.9.2", "flax==0.12.6")),
]


def cells(backend: str) -> list[Cell]:
    return [cell for cell in CELLS if cell.backend == backend]


def install_cell(session: nox.Session, cell: Cell) -> None:
    if not cell.constraints.exists():
        session.error(f"{cell.constraints.relative_to(ROOT)} is missing: run `nox -s lock`")
    session.install("-c", str(cell.constraints), "-e", ".[all]", "--group", "test")


def runtime_env(session: nox.Session, backend: str) -> dict[str, str]:
    """Environment of a test run: offline hubs, one JAX platform, a persistent compilation cache."""
    return {
        "JAX_PLATFORMS": backend if backend != "cuda12" else "cuda",
        "JAX_COMPILATION_CACHE_DIR": str(Path(session.cache_dir) / "jax-compilation-cache" / backend),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Cache bytecode in the environment: without it every run recompiles jax, transformers and datasets.
        "PYTHONDONTWRITEBYTECODE": "",
    }


VERSIONS = """
import importlib.metadata as metadata, platform, jax
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy"]
print("python", platform.python_version())
for name in names:
    print(name, metadata.version(name))
print("devices", jax.devices())
"""


def run_tests(session: nox.Session, cell: Cell, *pytest_args: str) -> None:
    install_cell(session, cell)
    env = runtime_env(session, cell.backend)
    session.run("python", "-c", VERSIONS, env=env)
    REPORTS.mkdir(exist_ok=True)
    report = REPORTS / f"junit-{session.name.replace('(', '-').replace(')', '')}.xml"
    session.run(
        "pytest", "-n", "auto", f"--junitxml={report}",
        *pytest_args, *session.posargs, env=env,
    )


@nox.session(name="tests-cpu", tags=["tests", "cpu"])
@nox.parametrize(
    "python,cell", [(cell.python, cell) for cell in cells("cpu")], ids=[cell.id for cell in cells("cpu")]
)
def tests_cpu(session: nox.Session, cell: Cell) -> None:
    """Fast tests on the CPU, one environment per Transformers version."""
    run_tests(session, cell, "-m", "not slow")


DEMO_CELL = CELLS[0]


@nox.session(python=DEMO_CELL.python)
def demo(session: nox.Session) -> None:
    """Fine-tune the tiny fixture BERT on the fixture paraphrase data and print its metrics."""
    install_cell(session, DEMO_CELL)
    output = Path(session.create_tmp()) / "demo-output"
    session.run(
        "python", "examples/text-classification/run_flax_glue.py",
        "--model_name_or_path", "fixtures/models/tiny-bert",
        "--train_file", "fixtures/data/paraphrase/train.csv",
        "--validation_file", "fixtures/data/paraphrase/validation.csv",
        "--output_dir", str(output), "--overwrite_output_dir",
        "--per_device_train_batch_size=2", "--per_device_eval_batch_size=1", "--learning_rate=1e-4",
        "--warmup_steps=2", "--seed=42", "--max_seq_length=128",
        *session.posargs,
        env=runtime_env(session, "cpu"),
    )
    session.log(f"results in {output}:\n{(output / 'eval_results.json').read_text()}")


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Regenerate constraints/ (one pinned file per cell) with uv pip compile."""
    for cell in CELLS:
        cell.requirements.write_text(
            f"# Pins of the {cell.name} cell, written by `nox -s lock` from CELLS in noxfile.py.\n"
            + "\n".join(cell.pins) + "\n"
        )
        session.run(
            "uv", "pip", "compile", "pyproject.toml", str(cell.requirements.relative_to(ROOT)),
            "--all-extras", "--group", "test", "--python-version", cell.python, "--python-platform", LOCK_PLATFORM,
            "--exclude-newer", EXCLUDE_NEWER, "--custom-compile-command", "nox -s lock", "--quiet",
            "-o", str(cell.constraints.relative_to(ROOT)),
        )


@nox.session(python=DEMO_CELL.python)
def fixtures(session: nox.Session) -> None:
    """Rebuild the fixture data and tiny models (deterministic: no diff when nothing changed)."""
    install_cell(session, DEMO_CELL)
    session.run("python", "fixtures/make_data.py")
    session.run("python", "fixtures/build_models.py", env={"PYTHONDONTWRITEBYTECODE": ""})
