"""benchmarks/bench.py: --quick writes every figure with sane values (a smoke test of the harness, not of speed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
POSITIVE_FIELDS = ("compile_seconds", "time_to_first_step_seconds", "timed_seconds", "step_ms",
                   "examples_per_second", "tokens_per_second", "peak_rss_mib", "param_count", "analytic_flops_per_step")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
