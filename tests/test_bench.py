"""benchmarks/bench.py: --quick writes every figure with sane values (a smoke test of the harness, not of speed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import load_module

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
POSITIVE_FIELDS = ("compile_seconds", "time_to_first_step_seconds", "timed_seconds", "step_ms",
                   "examples_per_second", "tokens_per_second", "peak_rss_mib", "param_count", "analytic_flops_per_step")


@pytest.fixture(scope="module")
def bench():
    return load_module(BENCH, "bench")


@pytest.mark.spawns
@pytest.mark.slow  # about a minute of compiling in subprocesses: the slow tier runs it
def test_quick_benchmark_reports_every_figure(tmp_path):
    # One case and one dtype (three processes) keep it under a minute on two cores; a cheaper XLA
    # backend optimisation level halves the compile times, which are not under test here.
    environment = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"}
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "bert", "--dtype", "bfloat16", "--reference-dtype", "bfloat16",
         "--output", str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())

    assert report["quick"] is True
    assert report["machine"]["device_count"] >= 1 and report["machine"]["versions"]["jax"]
    assert report["matmul_peak"]["bfloat16"]["gflops"] > 0

    reference_expected = int(version("transformers").split(".")[0]) < 5
    runs = {run["implementation"]: run for run in report["runs"]}
    assert set(runs) == {"flax_finetune", "transformers"}
    if not reference_expected:
        assert runs.pop("transformers")["status"] == "skipped"
    for run in runs.values():
        assert run["status"] == "ok", run.get("reason")
        assert (run["case"], run["dtype"]) == ("bert", "bfloat16")
        assert all(run[field] > 0 for field in POSITIVE_FIELDS), {field: run[field] for field in POSITIVE_FIELDS}
        assert run["time_to_first_step_seconds"] > run["compile_seconds"]
        assert math.isclose(run["tokens_per_second"], run["examples_per_second"] * run["tokens_per_example"])
        assert run["flops_source"] in ("compiled", "analytic")
        assert 0 < run["mfu"] <= 1.5 and 0 < run["mfu_analytic"] <= 1.5
        assert run["timed_steps"] >= 2 and len(run["step_seconds"]) == len(run["input_seconds"]) == run["timed_steps"]
        assert 0 <= run["slow_input_steps"] <= run["timed_steps"]
        assert math.isfinite(run["final_loss"])
    assert [entry["compared"] for entry in report["ratios"]] == (
        ["flax_finetune / transformers"] if reference_expected else []
    )

    table = (tmp_path / "bench.md").read_text()
    assert "| bert | flax_finetune | bfloat16 |" in table and table in completed.stdout


def test_ratios_compare_implementations_and_dtypes(bench):
    runs = [
        {"case": "t5", "implementation": implementation, "dtype": dtype, "status": "ok", "examples_per_second": speed}
        for implementation, dtype, speed in [
            ("flax_finetune", "float32", 4.0), ("transformers", "float32", 2.0), ("flax_finetune", "bfloat16", 6.0),
        ]
    ] + [{"case": "t5", "implementation": "transformers", "dtype": "bfloat16", "status": "failed"}]
    assert bench.ratios(runs) == [
        {"case": "t5", "dtype": "float32", "compared": "flax_finetune / transformers", "ratio": 2.0},
        {"case": "t5", "implementation": "flax_finetune", "compared": "bfloat16 / float32", "ratio": 1.5},
    ]


def test_step_profile_counts_each_operation_once_by_kind(bench, tmp_path):
    """benchmarks/step_profile.py: a `while` holding a dot and a fusion keeps only its own time, other
    threads and non-XLA events are apart, and HLO names map to their kinds."""
    import gzip

    sys.path.insert(0, str(BENCH.parent))
    try:
        import step_profile
    finally:
        sys.path.remove(str(BENCH.parent))

    def operation(name, start, duration, thread=1):
        return {"ph": "X", "pid": 7, "tid": thread, "ts": start, "dur": duration, "name": name,
                "args": {"hlo_op": name, "hlo_module": "jit_step"}}

    events = [
        operation("while.3", 0, 100), operation("dot.1", 10, 50), operation("loop_add_fusion.2", 70, 20),
        operation("copy.4", 5, 30, thread=2), {"ph": "X", "pid": 7, "tid": 1, "ts": 0, "dur": 500, "name": "python"},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    trace = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(trace, "wt") as handle:
        json.dump({"traceEvents": events}, handle)

    own = {event["args"]["hlo_op"]: round(event["self_seconds"] * 1e6) for event in step_profile.xla_events(trace)}
    assert own == {"while.3": 30, "dot.1": 50, "loop_add_fusion.2": 20, "copy.4": 30}
    kinds = {name: step_profile.kind_of(name) for name in own}
    assert kinds == {"while.3": "control flow (own time)", "dot.1": "matrix products",
                     "loop_add_fusion.2": "elementwise fusions", "copy.4": "copies and transposes"}
    assert step_profile.kind_of("xor_xor_fusion.9") == "random bits (dropout)"


def test_a_reference_dtype_outside_the_measured_ones_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--dtype", "bfloat16", "--reference-dtype", "float32"])
    assert "--reference-dtype float32: not in --dtype bfloat16" in capsys.readouterr().err
    assert bench.parse_arguments(["--dtype", "float32", "bfloat16"]).reference_dtype == ["float32"]
    assert bench.parse_arguments(["--dtype", "bfloat16"]).reference_dtype == []


def load_end_to_end():
    return load_module(BENCH.parent / "end_to_end.py", "end_to_end")


def readme_commands() -> list[list[str]]:
    """The command lines of README.md "Running a script by hand" (its first bash block), split as a shell does."""
    import shlex

    text = (BENCH.parent.parent / "README.md").read_text()
    section = text.split("## Running a script by hand", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def test_end_to_end_runs_the_readme_commands_cold_then_warm(tmp_path):
    """benchmarks/end_to_end.py: its commands are the README's, each run gets its own output folder and
    cache folder, an original that cannot run is skipped with the reason, and the table judges the targets (no script runs)."""
    end_to_end = load_end_to_end()
    assert readme_commands() == [command.line() for command in end_to_end.COMMANDS.values()]

    glue = end_to_end.COMMANDS["glue"].arguments
    arguments = end_to_end.with_value(glue, "--output_dir", str(tmp_path / "run"))
    arguments = end_to_end.with_value(tuple(arguments), "--compilation_cache_dir", str(tmp_path / "cache"))
    assert arguments[arguments.index("--output_dir") + 1] == str(tmp_path / "run") and "out/glue" not in arguments
    assert arguments[-2:] == ["--compilation_cache_dir", str(tmp_path / "cache")]
    assert end_to_end.with_value(glue, "--eval_steps", "7").count("--eval_steps=7") == 1

    skipped = end_to_end.run_original("speech", tmp_path / "originals", tmp_path, sys.executable)
    assert skipped["status"] == "skipped" and "--dataset_name" in skipped["reason"]
    missing = end_to_end.run_original("glue", tmp_path / "originals", tmp_path, sys.executable)
    assert missing["status"] == "skipped" and "does not exist" in missing["reason"]

    def run(wall, first=None):
        return {"status": "ok", "exit_status": 0, "wall_seconds": wall, "first_step_seconds": first,
                "peak_rss_mib": 500.0, "load_average": 1.0}

    results = []
    for name, warm_first, original in (("glue", 0.5, run(30.0)), ("clm", 2.0, run(12.0))):
        result = {"name": name, "cold": {**run(20.0, 4.0), "cached_programs": 6}, "warm": run(9.0, warm_first),
                  "original": original}
        results.append({**result, **end_to_end.ratios(result)})
    assert (results[0]["first_step_speedup"], results[0]["warm_over_original"]) == (8.0, 0.3)
    report = {"created": "now", "machine": {"platform": "p", "cpu_count": 2, "python": "3", "versions": {}},
              "original": "/originals", "results": results, "elapsed_seconds": 60.0}
    table = end_to_end.markdown_report(report)
    assert "| glue | 20.0 | 4.00 | 6 | 9.0 | 0.50 | 8.0x | met | 30.0 | 0.30 | met |" in table
    assert "| clm | 20.0 | 4.00 | 6 | 9.0 | 2.00 | 2.0x | NOT met | 12.0 | 0.75 | NOT met |" in table


@pytest.mark.spawns
@pytest.mark.slow  # about 45 s of compiling 8-device steps in subprocesses: the slow tier runs it
def test_quick_scale_case_shards_the_state_and_trains_alike_in_every_layout(tmp_path):
    environment = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"}
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "llama", "--dtype", "float32", "--output", str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    runs = {run["layout"]: run for run in json.loads((tmp_path / "bench.json").read_text())["runs"]}

    assert list(runs) == ["data", "fsdp", "fsdp+remat"]
    assert all(run["status"] == "ok" and run["device_count"] == 8 for run in runs.values()), runs
    data = runs.pop("data")
    assert data["state_bytes_per_device"] == data["state_bytes"]
    for run in runs.values():
        assert run["state_bytes"] == data["state_bytes"]
        assert run["state_bytes_per_device"] <= data["state_bytes"] / 8 * 1.05
        assert run["argument_bytes_per_device"] < data["argument_bytes_per_device"] / 4  # the analysis is per device
        assert run["temp_bytes_per_device"] > 0 and 0 < run["mfu"] <= 1.5
        assert math.isclose(run["final_loss"], data["final_loss"], rel_tol=1e-5)  # the same training step
    assert runs["fsdp+remat"]["flops_source"] == "analytic"
    assert "| fsdp+remat | 8 |" in (tmp_path / "bench.md").read_text()


def test_scale_runs_count_one_cpu_peak_and_model_flops_only(bench):
    """On CPU the 8 emulated devices share one matmul peak; a remat step's recomputation is not model FLOPs."""
    run = {"timed_seconds": 2.0, "timed_steps": 2, "global_batch_size": 8, "tokens_per_example": 512,
           "compiled_flops_per_step": 1.3e11 / 8, "analytic_flops_per_step": 1e11, "device_count": 8,
           "peak_devices": 1, "dtype": "float32"}
    peaks = {"float32": {"gflops": 100.0}}
    plain, remat = {**run, "layout": "fsdp"}, {**run, "layout": "fsdp+remat"}
    bench.add_utilisation(plain, peaks)
    bench.add_utilisation(remat, peaks)
    assert (plain["flops_source"], remat["flops_source"]) == ("compiled", "analytic")
    assert math.isclose(plain["mfu"], 1.3) and math.isclose(remat["mfu"], 1.0)
    assert math.isclose(remat["tokens_per_second"], 4096)


def test_a_layout_too_large_for_the_host_is_refused_and_reported(bench, monkeypatch):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("the host-memory check applies to CPU devices only")
    memory = {"argument_bytes_per_device": 2**30, "output_bytes_per_device": 2**30,
              "alias_bytes_per_device": 2**30, "temp_bytes_per_device": 2**30}
    monkeypatch.setattr(bench, "available_host_bytes", lambda: 4 * 2**30)
    assert bench.host_shortfall(memory) is None  # 2 GiB of 4 GiB
    monkeypatch.setattr(bench, "available_host_bytes", lambda: 2 * 2**30)
    reason = bench.host_shortfall(memory)
    assert reason.startswith("not run: needs 2.0 GiB on 1 CPU devices"), reason

    skipped = {"case": "llama", "implementation": "flax_finetune", "dtype": "float32", "layout": "data",
               "tokens_per_example": 512, "status": "skipped", "reason": reason, "device_count": 8,
               "param_count": 1e8, "global_batch_size": 8, "temp_bytes_per_device": 2**30}
    report = {"created": "now", "quick": False, "machine": {}, "matmul_peak": {}, "matmul_failure": None,
              "runs": [skipped], "ratios": [], "elapsed_seconds": 60.0}
    table = bench.markdown_report(report)
    assert "| data | 8 | 100.0M | 8 x 512 | - | - | - | - | 1,024.0 |" in table
    assert f"- llama flax_finetune float32 data: skipped: {reason}" in table
