"""Where one training step's time goes: an XLA-op profile of a benchmark case.

    python benchmarks/step_profile.py [--case bert] [--implementation flax_finetune] [--dtype float32]
                                      [--quick] [--output reports/profile]

Builds the same step as benchmarks/bench.py (same config, batch, optimizer
and input pipeline), compiles it, runs one warm-up step, then records one
step with `jax.profiler.trace(..., create_perfetto_trace=True)` and sums the
durations of the XLA operations in the trace by kind: matrix products
(`dot`, `convolution`), elementwise fusions, random-bit generation (dropout),
reductions, copies and transposes, and the rest. Matrix products are also
measured against the matmul peak that bench.py measures, so the table says
how much of the step is spent outside matmuls and how fast the matmuls run.
Writes `<case>-<implementation>-<dtype>.md` and the raw trace under --output.

The op names come from XLA's CPU and GPU runtimes (their trace events carry
the HLO instruction name); on a backend whose trace names differ, the
"other" row grows and the table says so.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

import bench

KINDS = (  # (kind, pattern on the HLO instruction name), first match wins
    ("matrix products", re.compile(r"^(dot|convolution|gemm|matmul|__cublas|cublas)", re.I)),
    ("random bits (dropout)", re.compile(r"(rng|random|threefry|xor)", re.I)),  # threefry fuses into xor_* fusions
    ("reductions", re.compile(r"^(reduce|all-reduce)", re.I)),
    ("copies and transposes", re.compile(r"^(copy|transpose|dynamic-update-slice|dynamic-slice|concatenate|slice)", re.I)),
    ("elementwise fusions", re.compile(r"(fusion|loop_|input_|^wrapped_)", re.I)),
    ("control flow (own time)", re.compile(r"^(while|call|conditional)", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other XLA operations"


def xla_events(trace_file: Path) -> list[dict]:
    """The trace's XLA operations (complete events that name an HLO instruction), each with its own
    time `self_seconds`: its duration less that of the operations nested in it on the same thread
    (a `while` holds its body's operations)."""
    with gzip.open(trace_file, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    operations = sorted(
        (event for event in events if event.get("ph") == "X" and "hlo_op" in event.get("args", {})),
        key=lambda event: (event.get("pid"), event.get("tid"), event["ts"], -event["dur"]),
    )
    open_operations: list[dict] = []
    for event in operations:
        event["self_seconds"] = event["dur"] / 1e6
        while open_operations and (
            (open_operations[-1].get("pid"), open_operations[-1].get("tid")) != (event.get("pid"), event.get("tid"))
            or open_operations[-1]["ts"] + open_operations[-1]["dur"] <= event["ts"]
        ):
            open_operations.pop()
        if open_operations:
            open_operations[-1]["self_seconds"] -= event["dur"] / 1e6
        open_operations.append(event)
    return operations


def profile(args: argparse.Namespace) -> str:
    import jax

    case = bench.CASES[args.case]
    run = bench.prepare_run(case, args.implementation, args.dtype, args.quick, total_steps=3)
    setup, config, shape, plan = run.setup, run.config, run.shape, run.plan
    state = setup.make_state()
    compiled = setup.jitted_step.lower(setup.state_shapes, setup.put_batch(next(run.batches)), *setup.extra_args).compile()
    state, metrics = compiled(state, setup.put_batch(next(run.batches)), *setup.extra_args)  # warm-up
    jax.block_until_ready(metrics)
    batch = setup.put_batch(next(run.batches))
    trace_dir = args.output / f"trace-{args.case}-{args.implementation}-{args.dtype}"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        started = time.perf_counter()
        state, metrics = compiled(state, batch, *setup.extra_args)
        jax.block_until_ready(metrics)
        step_seconds = time.perf_counter() - started
    trace_file = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda path: path.stat().st_mtime)
    events = xla_events(trace_file)

    seconds, counts, largest = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        kind = kind_of(event["args"]["hlo_op"])
        seconds[kind] += event["self_seconds"]
        counts[kind] += 1
        largest[event["args"]["hlo_op"]] += event["self_seconds"]
    busy = sum(seconds.values())
    threads = len({(event.get("pid"), event.get("tid")) for event in events})
    flops = bench.compiled_flops(compiled) or bench.analytic_train_flops(case, config, shape) * plan.global_batch_size
    peak = bench.matmul_job([args.dtype], args.quick)["peaks"][args.dtype]["gflops"]

    rows = [[kind, f"{counts[kind]}", f"{seconds[kind]:.3f}", f"{seconds[kind] / busy:.1%}"]
            for kind, _ in seconds.most_common()]
    matmul_seconds = seconds["matrix products"]
    lines = [
        f"# Step profile: {case.name} ({case.script}), {args.implementation}, {args.dtype}"
        + (" (--quick)" if args.quick else ""),
        "",
        f"{jax.default_backend()} backend, {jax.device_count()} device(s), jax {jax.__version__}; batch "
        f"{plan.global_batch_size}, {shape.source_length}"
        + (f" -> {shape.target_length}" if shape.target_length else "") + " tokens; "
        f"one step {step_seconds:.2f} s wall while traced; XLA operations on {threads} thread(s), "
        f"{busy:.2f} s summed over them ({len(events)} operations).",
        "",
        bench.markdown_table(["kind", "operations", "seconds", "share of XLA time"], rows),
        "",
        f"- step FLOPs {flops / 1e9:,.0f} G; matmul peak {peak:.1f} GFLOP/s ({args.dtype}, "
        f"measured now); at that peak the step would take {flops / peak / 1e9:.2f} s.",
        f"- the matrix products took {matmul_seconds:.2f} s of summed thread time"
        + (f", the rest {busy - matmul_seconds:.2f} s ({(busy - matmul_seconds) / busy:.0%})." if busy else "."),
        "- largest single operations: " + ", ".join(f"{name} {value:.3f} s" for name, value in largest.most_common(8)),
        f"- trace: {trace_file}",
    ]
    if not events:
        lines.append("- no XLA operation events in the trace: this backend names them differently")
    report = "\n".join(lines) + "\n"
    (args.output / f"{args.case}-{args.implementation}-{args.dtype}.md").write_text(report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(bench.CASES), default="bert")
    parser.add_argument("--implementation", choices=(bench.NATIVE, bench.REFERENCE), default=bench.NATIVE)
    parser.add_argument("--dtype", choices=bench.DTYPES, default="float32")
    parser.add_argument("--quick", action="store_true", help="Tiny configs.")
    parser.add_argument("--output", type=Path, default=Path("reports/profile"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    print(profile(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
