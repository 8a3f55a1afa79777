"""End-to-end benchmark: each README command as a user runs it, with a cold and then a warm compilation cache.

    python benchmarks/end_to_end.py [--only glue,clm] [--output reports/bench] [--original DIR]

COMMANDS holds the worked commands of README.md "Running a script by hand" (tests/test_bench.py checks
that the README shows the same command lines). Each runs as a process of its own, from the repository
root, on the bundled fixtures:

- cold: with `--compilation_cache_dir` pointing at a new empty folder, so everything is compiled;
- warm: the same command again with the same folder, as a user rerunning it would (a new seed, more epochs);
- original (with `--original DIR`, a folder laid out as Transformers' examples/flax/): the same command
  line through the original script, on the same fixtures (the originals take these flags; one that cannot
  run offline is skipped, ORIGINAL_UNAVAILABLE says why). The originals need Transformers' Flax classes:
  run this in a Transformers 4.x environment (`--original-python` picks another interpreter for them).

Per run: wall time of the process, `first_step_seconds` from its train_results.json (from entering the
training loop to the first step's result: mostly compilation on a cold cache), peak RSS of the process
(its `wait4` resource usage), the programs the cold run wrote to the cache, and the exit status. Every
run writes into a folder of its own; `--output_dir` of the command is replaced by it. The load average
before each run is recorded, as the machine may be shared.

Targets (issue 17), per command: the warm first step >= 4x sooner than the cold one, and the warm process
<= 1/3 of the original script's wall time. Written to --output: end_to_end.json (every figure) and
end_to_end.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import log, markdown_table, number, write_report  # noqa: E402  (the training-step benchmark's report helpers)

ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP_SPEEDUP_TARGET = 4.0  # cold first step / warm first step
ORIGINAL_WALL_TARGET = 1 / 3  # warm wall time / the original script's wall time
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "transformers", "datasets")
# the child's own cache settings would decide what is cold and what is warm: the benchmark sets them
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


@dataclasses.dataclass(frozen=True)
class Command:
    """One README command: the script (under examples/, the same path under the originals' folder) and its flags."""

    script: str
    arguments: tuple[str, ...]

    def line(self) -> list[str]:
        """The command as the README shows it."""
        return ["python", f"examples/{self.script}", *self.arguments]


def command(script: str, flags: str) -> Command:
    return Command(script, tuple(flags.split()))


COMMANDS = {
    "glue": command("text-classification/run_flax_glue.py", """
        --model_name_or_path fixtures/models/tiny-bert --output_dir out/glue
        --train_file fixtures/data/paraphrase/train.csv --validation_file fixtures/data/paraphrase/validation.csv
        --per_device_train_batch_size=2 --per_device_eval_batch_size=1 --learning_rate=1e-4
        --eval_steps=50 --warmup_steps=2 --seed=42 --max_seq_length=128"""),
    "clm": command("language-modeling/run_clm_flax.py", """
        --model_name_or_path fixtures/models/tiny-gpt2
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt
        --do_train --do_eval --block_size 128 --per_device_train_batch_size 4 --per_device_eval_batch_size 4
        --num_train_epochs 2 --learning_rate 3e-3 --warmup_steps 10 --logging_steps 10 --eval_steps 50
        --output_dir out/clm --overwrite_output_dir"""),
    "mlm": command("language-modeling/run_mlm_flax.py", """
        --model_name_or_path fixtures/models/tiny-roberta
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt
        --output_dir out/mlm --overwrite_output_dir --max_seq_length 128 --per_device_train_batch_size 4
        --per_device_eval_batch_size 4 --logging_steps 100 --eval_steps 300 --learning_rate 2e-3 --warmup_steps 100
        --do_train --do_eval --num_train_epochs=8"""),
    "t5_mlm": command("language-modeling/run_t5_mlm_flax.py", """
        --model_type t5 --config_name fixtures/models/tiny-t5 --tokenizer_name fixtures/models/tiny-t5
        --train_file fixtures/data/prose/train.txt --validation_file fixtures/data/prose/validation.txt
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 4 --per_device_eval_batch_size 4
        --num_train_epochs 3 --learning_rate 1e-2 --warmup_steps 20 --logging_steps 25 --eval_steps 100
        --output_dir out/t5 --overwrite_output_dir"""),
    "summarization": command("summarization/run_summarization_flax.py", """
        --model_name_or_path fixtures/models/tiny-t5 --train_file fixtures/data/summaries/train.json
        --validation_file fixtures/data/summaries/validation.json --test_file fixtures/data/summaries/test.json
        --output_dir out/summarization --overwrite_output_dir --num_train_epochs=20 --warmup_steps=20
        --do_train --do_eval --do_predict --learning_rate=2e-3 --per_device_train_batch_size=8
        --per_device_eval_batch_size=4 --predict_with_generate"""),
    "ner": command("token-classification/run_flax_ner.py", """
        --model_name_or_path fixtures/models/tiny-bert --train_file fixtures/data/entities/train.json
        --validation_file fixtures/data/entities/validation.json --output_dir out/ner --overwrite_output_dir
        --do_train --do_eval --warmup_steps=2 --learning_rate=2e-4 --logging_steps 25 --eval_steps 75
        --per_device_train_batch_size=2 --per_device_eval_batch_size=2 --num_train_epochs=2 --seed 7"""),
    "qa": command("question-answering/run_qa.py", """
        --model_name_or_path fixtures/models/tiny-bert --version_2_with_negative
        --train_file fixtures/data/squad/train.json --validation_file fixtures/data/squad/validation.json
        --output_dir out/qa --overwrite_output_dir --num_train_epochs=3 --warmup_steps=2 --do_train --do_eval
        --logging_steps 50 --eval_steps 150 --learning_rate=2e-4 --per_device_train_batch_size=2
        --per_device_eval_batch_size=1"""),
    "speech": command("speech-recognition/run_flax_speech_recognition_seq2seq.py", """
        --model_name_or_path fixtures/models/tiny-whisper --output_dir out/speech --overwrite_output_dir
        --num_train_epochs=15 --warmup_steps=8 --do_train --do_eval
        --learning_rate=2e-3 --per_device_train_batch_size=8 --per_device_eval_batch_size=4 --predict_with_generate
        --train_file fixtures/data/speech/train.csv --validation_file fixtures/data/speech/validation.csv
        --audio_column_name file_name --text_column_name transcript"""),
}

# The originals take the same command lines (the README's come from the original tests' lists), except:
ORIGINAL_UNAVAILABLE = {
    "qa": "the original reads flat records (id, question, context, answers) under `data`; the README's "
          "train.json is in SQuAD's nested format (title, paragraphs, qas), which only this project's script reads",
    "speech": "the original reads its data from the hub only (--dataset_name, no --train_file), and decoding "
              "its audio column needs torchcodec, which datasets >= 4 requires: it cannot run offline here",
}


# --------------------------------------------------------------------------- one run


def with_value(arguments: tuple[str, ...], flag: str, value: str) -> list[str]:
    """The arguments with `flag`'s value (`--flag value` or `--flag=value`) replaced, or the flag added."""
    result, replaced, skip = [], False, False
    for position, argument in enumerate(arguments):
        if skip:
            skip = False
        elif argument == flag and position + 1 < len(arguments):
            result += [flag, value]
            replaced = skip = True
        elif argument.startswith(f"{flag}="):
            result.append(f"{flag}={value}")
            replaced = True
        else:
            result.append(argument)
    return result if replaced else result + [flag, value]


def child_environment() -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in CACHE_VARIABLES}
    environment.update(OFFLINE)
    environment["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="end-to-end-datasets-")
    return environment


def run_process(argv: list[str], folder: Path) -> dict:
    """Run `argv` from the repository root, output to folder/log.txt; its status, wall seconds, peak RSS."""
    environment = child_environment()
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as output:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment)
        _, wait_status, usage = os.wait4(process.pid, 0)  # the usage of this child alone: its own peak RSS
    wall = time.perf_counter() - started
    exit_status = os.waitstatus_to_exitcode(wait_status)
    shutil.rmtree(environment["HF_DATASETS_CACHE"], ignore_errors=True)
    run = {"status": "ok" if exit_status == 0 else "failed", "exit_status": exit_status, "wall_seconds": wall,
           "peak_rss_mib": usage.ru_maxrss / 1024, "load_average": load_average}
    if exit_status != 0:
        lines = (folder / "log.txt").read_text(errors="replace").splitlines()
        run["reason"] = "\n".join(collections.deque(lines, maxlen=8))[-1500:]
    return run


def train_result(output_dir: Path, name: str) -> Optional[float]:
    """`train_<name>` of the run's train_results.json (None without one)."""
    results = output_dir / "train_results.json"
    if not results.exists():
        return None
    return json.loads(results.read_text()).get(f"train_{name}")


def cached_programs(cache: Path) -> int:
    """Programs in the cache folder (jax versions with a size-limited cache keep an -atime file beside each)."""
    return sum(1 for entry in cache.iterdir() if entry.is_file() and not entry.name.endswith("-atime"))


def run_native(name: str, kind: str, cache: Path, work: Path, python: str) -> dict:
    """One run of this project's script (`kind` cold or warm) with the compilation cache in `cache`."""
    folder = work / f"{name}-{kind}"
    folder.mkdir()
    spec = COMMANDS[name]
    arguments = with_value(spec.arguments, "--output_dir", str(folder / "output"))
    arguments = with_value(tuple(arguments), "--compilation_cache_dir", str(cache))
    run = run_process([python, str(ROOT / "examples" / spec.script), *arguments], folder)
    run["first_step_seconds"] = train_result(folder / "output", "first_step_seconds")
    run["input_wait_fraction"] = train_result(folder / "output", "input_wait_fraction")
    if kind == "cold":
        run["cached_programs"] = cached_programs(cache)
    return run


def run_original(name: str, original: Path, work: Path, python: str) -> dict:
    """One run of the original script on the same command line."""
    spec = COMMANDS[name]
    script = original / spec.script
    if name in ORIGINAL_UNAVAILABLE:
        return {"status": "skipped", "reason": ORIGINAL_UNAVAILABLE[name]}
    if not script.exists():
        return {"status": "skipped", "reason": f"{script} does not exist"}
    folder = work / f"{name}-original"
    folder.mkdir()
    arguments = with_value(spec.arguments, "--output_dir", str(folder / "output"))
    return run_process([python, str(script), *arguments], folder)


def measure(name: str, work: Path, args: argparse.Namespace, position: str) -> dict:
    """Cold, warm and (with --original) original runs of one README command, with their ratios."""
    result = {"name": name, "command": " ".join(COMMANDS[name].line())}
    cache = work / f"{name}-cache"
    cache.mkdir()
    for kind in ("cold", "warm"):
        log("end-to-end", f"{position} {name}: {kind} cache ...")
        run = run_native(name, kind, cache, work, args.python)
        result[kind] = run
        log("end-to-end", f"{position} {name}: {kind}: {describe(run)}")
    if args.original:
        log("end-to-end", f"{position} {name}: original script ...")
        run = run_original(name, args.original, work, args.original_python)
        result["original"] = run
        log("end-to-end", f"{position} {name}: original: {describe(run)}")
    else:
        result["original"] = {"status": "not run", "reason": "no --original folder given"}
    result.update(ratios(result))
    return result


def describe(run: dict) -> str:
    if run["status"] != "ok":
        return f"{run['status']}: {run.get('reason', '')}"
    first = run.get("first_step_seconds")
    return (f"{run['wall_seconds']:.1f} s" + (f", first step {first:.2f} s" if first is not None else "")
            + f", peak RSS {run['peak_rss_mib']:.0f} MiB, load average {run['load_average']:.2f}")


def ratios(result: dict) -> dict:
    """first_step_speedup: cold / warm first step; warm_over_original: warm wall / original wall (None: missing)."""
    cold, warm, original = result["cold"], result["warm"], result["original"]
    found = {"first_step_speedup": None, "warm_over_original": None}
    if cold["status"] == warm["status"] == "ok" and cold["first_step_seconds"] and warm["first_step_seconds"]:
        found["first_step_speedup"] = cold["first_step_seconds"] / warm["first_step_seconds"]
    if warm["status"] == original["status"] == "ok":
        found["warm_over_original"] = warm["wall_seconds"] / original["wall_seconds"]
    return found


# --------------------------------------------------------------------------- report


def verdict(value: Optional[float], target: float, at_least: bool) -> str:
    if value is None:
        return "-"
    met = value >= target if at_least else value <= target
    return "met" if met else "NOT met"


def markdown_report(report: dict) -> str:
    """end_to_end.md: the machine, one row per command, the targets, and why a run is missing."""
    machine = report["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    rows = []
    for result in report["results"]:
        cold, warm, original = result["cold"], result["warm"], result["original"]

        def wall(run: dict) -> str:
            return number(run["wall_seconds"]) if run["status"] == "ok" else run["status"]

        def rss(run: dict) -> str:
            return number(run["peak_rss_mib"], 0) if run["status"] == "ok" else "-"

        rows.append([
            result["name"], wall(cold), number(cold.get("first_step_seconds"), 2), str(cold.get("cached_programs", "-")),
            wall(warm), number(warm.get("first_step_seconds"), 2),
            number(result["first_step_speedup"]) + "x" if result["first_step_speedup"] else "-",
            verdict(result["first_step_speedup"], FIRST_STEP_SPEEDUP_TARGET, at_least=True),
            wall(original), number(result["warm_over_original"], 2),
            verdict(result["warm_over_original"], ORIGINAL_WALL_TARGET, at_least=False),
            f"{rss(cold)} / {rss(warm)} / {rss(original)}", number(warm.get("input_wait_fraction"), 3),
        ])
    notes = [f"- {result['name']} {kind}: {run['status']}: {run.get('reason', '')}".replace("\n", " ")
             for result in report["results"] for kind in ("cold", "warm", "original")
             if (run := result[kind])["status"] not in ("ok", "not run")]
    if not report["original"]:
        notes.append("- the original scripts were not run (no --original folder).")
    load = [run["load_average"] for result in report["results"] for kind in ("cold", "warm", "original")
            if "load_average" in (run := result[kind])]
    parts = [
        "# End-to-end benchmark: the README commands",
        f"{report['created']}; {machine['platform']}, {machine['cpu_count']} CPUs, Python {machine['python']}; "
        f"{versions}; load average before the runs {min(load, default=0):.2f}-{max(load, default=0):.2f}; "
        f"the whole benchmark took {report['elapsed_seconds'] / 60:.1f} min",
        markdown_table(
            ["command", "cold wall s", "cold first step s", "programs cached", "warm wall s", "warm first step s",
             "first step sooner", f">= {FIRST_STEP_SPEEDUP_TARGET:g}x", "original wall s", "warm / original",
             "<= 1/3", "peak RSS MiB cold / warm / original", "warm input wait"],
            rows,
        ),
        "## Notes",
        "\n".join(notes + [
            "- cold: a new empty `--compilation_cache_dir`; warm: the same command again with the same folder; "
            "original: the Transformers example script on the same command line and fixtures "
            f"({report['original'] or 'not run'}).",
            "- first step: `train_first_step_seconds` of train_results.json, from entering the training loop "
            "to the first step's result (compilation included). wall: the whole process, start-up included.",
            "- input wait: the share of the training loop's time spent waiting for the next batch "
            "(`train_input_wait_fraction`).",
        ]),
    ]
    return "\n\n".join(parts) + "\n"


def installed_versions(python: str) -> dict:
    """VERSIONED_PACKAGES as installed for the interpreter `python` (None: not installed)."""
    script = ("import json, importlib.metadata as m\nfound = {}\n"
              f"for name in {VERSIONED_PACKAGES!r}:\n"
              "    try: found[name] = m.version(name)\n"
              "    except m.PackageNotFoundError: found[name] = None\nprint(json.dumps(found))")
    return json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout)


def run_all(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="end-to-end-") as folder:
        for index, name in enumerate(args.only, 1):
            results.append(measure(name, Path(folder), args, f"{index} of {len(args.only)}"))
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "versions": installed_versions(args.python)},
        "original": str(args.original) if args.original else None,
        "original_versions": installed_versions(args.original_python) if args.original else None,
        "targets": {"first_step_speedup": FIRST_STEP_SPEEDUP_TARGET, "warm_over_original": ORIGINAL_WALL_TARGET},
        "results": results,
        "elapsed_seconds": time.perf_counter() - started,
    }
    write_report(args.output, "end_to_end", report, markdown_report(report))
    return 1 if any(result[kind]["status"] == "failed" for result in results for kind in ("cold", "warm")) else 0


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(COMMANDS),
                        help=f"Comma-separated commands to run (default: {','.join(COMMANDS)}).")
    parser.add_argument("--output", type=Path, default=Path("reports/bench"),
                        help="Folder for end_to_end.json and end_to_end.md (default: reports/bench).")
    parser.add_argument("--original", type=Path,
                        help="A folder holding Transformers' original Flax example scripts, laid out as its "
                             "examples/flax/ (e.g. text-classification/run_flax_glue.py); without it they are not run.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter of this project's scripts.")
    parser.add_argument("--original-python", default=sys.executable,
                        help="Interpreter of the original scripts (needs Transformers 4.x with its Flax classes).")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if not args.only or not set(args.only) <= set(COMMANDS):
        parser.error(f"--only: choose among {', '.join(COMMANDS)}")
    if args.original:
        args.original = args.original.resolve()
        if not args.original.is_dir():
            parser.error(f"--original {args.original}: not a folder")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    return run_all(parse_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
