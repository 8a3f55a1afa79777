"""Data at scale: peak memory and wall time of a script on generated data larger than the fixtures.

    python benchmarks/data_scale.py speech [--clips 2000] [--workers 1 2] [--scripts DIR] [--output DIR]
    python benchmarks/data_scale.py clm [--megabytes 100] [--workers 1 2] [--scripts DIR] [--original DIR]
        [--output DIR]

- speech: --clips clips made from the fixture clips (fixtures/data/speech), each one a fixture
  clip at another gain, so every clip is a new file; the speech script trains a tiny Whisper
  with real Whisper's features (80 log-mel bins over 30 s: 0.96 MB a clip; the fixture model's
  are 40 over 3 s) from random weights on them for --max_steps steps (batch 8) with
  --preprocessing_num_workers each of --workers.
- clm: a text file of --megabytes MB, the fixture prose repeated with a running number per line;
  run_clm_flax.py trains tiny-gpt2 on it (block 128) for --max_steps steps.

Each worker count runs with empty datasets and compilation caches (cold), then the last one
runs again on its caches (warm: the tokenized data and compiled programs are read back).
Each run is a process of its own, started from a small wrapper process, so its peak resident
memory (the wrapper's RUSAGE_CHILDREN ru_maxrss) is that run's alone. RSS counts the pages of
memory-mapped files (datasets' Arrow caches) that the process has touched, besides its own memory.
--scripts runs another checkout's examples/ folder (for before-and-after figures: `git worktree
add /tmp/before <commit>` and --scripts /tmp/before/examples; that checkout's own src/ is used).
--original DIR (clm): also run the original run_clm_flax.py (DIR laid out as Transformers'
examples/flax/, run in a Transformers 4.x environment) on the same file with each --workers count
(or --original_workers):
it has no --max_steps, so it trains on --max_steps x 8 blocks for one epoch (--max_train_samples)
after tokenizing and grouping the whole file; only its wall time and peak RSS are read.
Per run: wall time, peak RSS, seconds outside the training loop (start-up, preparing the data,
saving), the first step, the steps, the share of the loop spent waiting for input batches, and
for text the tokenization throughput the script logs. The speech case first measures the
feature extraction alone: clips per second with each --workers count of threads.
Written to --output: data_scale_<case>.json and data_scale_<case>.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SCRIPTS = {
    "speech": "speech-recognition/run_flax_speech_recognition_seq2seq.py",
    "clm": "language-modeling/run_clm_flax.py",
}
# The scripts' log line for a tokenized split (flax_finetune.scripts.token_stream).
TOKENIZED = re.compile(r"tokenized (?P<texts>\d+) texts into (?P<tokens>\d+) tokens in (?P<seconds>[\d.]+) s")
# Runs `argv[1:]` and prints its peak resident memory in kB (Linux ru_maxrss) as the last line.
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def make_speech_data(folder: Path, clips: int) -> Path:
    """`clips` FLAC files and train.csv in `folder`: fixture clip i % n at gain 1 - 0.02 * (i // n)."""
    import soundfile

    source = FIXTURES / "data" / "speech"
    rows = [line.split(",", 1) for line in (source / "train.csv").read_text().splitlines()[1:]]
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines = ["file_name,transcript"]
    for index in range(clips):
        name, transcript = rows[index % len(rows)]
        samples, rate = soundfile.read(source / name, dtype="float32")
        gain = 1.0 - 0.02 * (index // len(rows) % 40)
        target = f"clips/clip_{index:05d}.flac"
        soundfile.write(folder / target, samples * gain, rate)
        lines.append(f"{target},{transcript}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return folder / "train.csv"


def make_whisper_30s(folder: Path) -> Path:
    """tiny-whisper's config and tokenizer with Whisper's own features: 80 bins, 30 s (3,000 frames)."""
    import shutil

    source = FIXTURES / "models" / "tiny-whisper"
    target = folder / "whisper-30s"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.msgpack", "*.bin"))
    config = json.loads((target / "config.json").read_text())
    config.update(num_mel_bins=80, max_source_positions=1500)
    (target / "config.json").write_text(json.dumps(config, indent=1))
    features = json.loads((target / "preprocessor_config.json").read_text())
    features.update(feature_size=80, chunk_length=30, n_samples=480000, nb_max_frames=3000)
    (target / "preprocessor_config.json").write_text(json.dumps(features, indent=1))
    return target


def feature_throughput(model: Path, data_file: Path, workers: int, clips: int = 200) -> float:
    """Clips per second that the speech script's feature extraction (decode, resample, log-mel on
    `workers` threads, `data.ComputedRows`) turns out over the first `clips` clips of `data_file`."""
    sys.path.insert(0, str(ROOT / "src"))
    from flax_finetune import audio, data, models

    extractor = models.load_feature_extractor(str(model))
    names = [line.split(",", 1)[0] for line in data_file.read_text().splitlines()[1 : clips + 1]]

    def features(row: int):
        samples, rate = audio.read(names[row], data_file.parent)
        return extractor(audio.resample(samples, rate, extractor.sampling_rate),
                         sampling_rate=extractor.sampling_rate)["input_features"][0]

    rows = data.ComputedRows({"row": np.arange(len(names))}, "input_features", features, workers, cache_bytes=0)
    started = time.perf_counter()
    for batch in np.arange(len(names)).reshape(-1, 8):
        rows.take(batch)
    return len(names) / (time.perf_counter() - started)


def make_text(folder: Path, megabytes: float) -> Path:
    """A text file of about `megabytes` MB: the fixture prose lines, each with a running number."""
    lines = [line for line in (FIXTURES / "data" / "prose" / "train.txt").read_text().splitlines() if line.strip()]
    target = folder / "corpus.txt"
    limit, written, number = int(megabytes * 1e6), 0, 0
    with target.open("w") as handle:
        while written < limit:
            chunk = "".join(f"{line} {number + index}\n" for index, line in enumerate(lines))
            handle.write(chunk)
            written += len(chunk.encode())
            number += len(lines)
    return target


def command(case: str, data_file: Path, output: Path, workers: int, max_steps: int, original: bool = False) -> list[str]:
    """The script's command line; the speech model folder lies beside the data file. `original`: the
    original run_clm_flax.py's flags for the same work (it has no --max_steps)."""
    length = ["--max_train_samples", str(max_steps * 8), "--num_train_epochs", "1", "--eval_steps", "1000000"
              ] if original else ["--max_steps", str(max_steps)]  # the original's loop needs an --eval_steps
    common = ["--output_dir", str(output), "--do_train", *length, "--logging_steps", "5",
              "--per_device_train_batch_size", "8", "--preprocessing_num_workers", str(workers),
              "--disable_tqdm", *(["true"] if original else []), "--train_file", str(data_file)]
    if case == "speech":
        model = data_file.parent / "whisper-30s"
        return [*common, "--config_name", str(model), "--tokenizer_name", str(model), "--feature_extractor_name",
                str(model), "--audio_column_name", "file_name", "--text_column_name", "transcript"]
    return [*common, "--model_name_or_path", str(FIXTURES / "models" / "tiny-gpt2"), "--block_size", "128"]


def run(case: str, scripts: Path, data_file: Path, workers: int, max_steps: int, caches: Path,
        original: bool = False) -> dict:
    """One run of the case's script as a measured process: wall seconds, peak RSS, training figures.

    `caches`: the folder of the run's datasets and compilation caches (empty for a cold run).
    `original`: `scripts` holds the original scripts; only wall time and peak RSS are read."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "out"
        env = {**os.environ, "HF_DATASETS_CACHE": str(caches / "datasets"), "JAX_COMPILATION_CACHE_DIR": str(caches / "jax")}
        if not original:
            env["PYTHONPATH"] = str(scripts.parent / "src")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEASURED, sys.executable, str(scripts / SCRIPTS[case]),
             *command(case, data_file, output, workers, max_steps, original)],
            env=env, capture_output=True, text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
        peak = round(int(done.stdout.split()[-1]) / 1024, 1)
        if original:
            return {"workers": workers, "wall_seconds": round(wall, 2), "peak_rss_mb": peak}
        results = json.loads((output / "train_results.json").read_text())
    tokenized = TOKENIZED.search(done.stderr)  # the training split's line comes first
    return {
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": peak,
        "train_runtime_seconds": round(results["train_runtime"], 2),  # the steps, the first one included
        "first_step_seconds": round(results["train_first_step_seconds"], 2),
        "outside_training_seconds": round(wall - results["train_runtime"], 2),
        "tokenize_seconds": float(tokenized["seconds"]) if tokenized else None,
        "tokens_per_second": round(int(tokenized["tokens"]) / max(float(tokenized["seconds"]), 1e-9))
        if tokenized else None,
        "input_wait_fraction": round(results.get("train_input_wait_fraction", float("nan")), 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=sorted(SCRIPTS))
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--scripts", type=Path, default=ROOT / "examples", help="the examples/ folder to run")
    parser.add_argument("--original", type=Path, help="clm: the original scripts' folder (examples/flax/ layout)")
    parser.add_argument("--original_workers", type=int, nargs="+", help="the original's worker counts (default --workers)")
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "data-scale")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        if args.case == "speech":
            make_whisper_30s(Path(scratch))
            data_file, size = make_speech_data(Path(scratch), args.clips), f"{args.clips} clips"
        else:
            data_file, size = make_text(Path(scratch), args.megabytes), f"{args.megabytes:g} MB of text"
        print(f"generated {size} in {time.perf_counter() - started:.1f} s; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        extraction = {}
        if args.case == "speech":
            extraction = {workers: round(feature_throughput(Path(scratch) / "whisper-30s", data_file, workers), 1)
                          for workers in args.workers}
            print(f"feature extraction, clips/s by threads: {extraction}", flush=True)
        runs = []
        for workers in args.workers:  # each cold: fresh datasets and compilation caches
            caches = Path(scratch) / f"caches-{workers}"
            runs.append({"caches": "cold", **run(args.case, args.scripts.resolve(), data_file, workers,
                                                 args.max_steps, caches)})
            print(json.dumps(runs[-1]), flush=True)
        # the last command again, reading what the cold run cached
        runs.append({"caches": "warm", **run(args.case, args.scripts.resolve(), data_file, args.workers[-1],
                                             args.max_steps, caches), "tokens_per_second": None})  # read back
        print(json.dumps(runs[-1]), flush=True)
        if args.original and args.case == "clm":
            for workers in args.original_workers or args.workers:
                caches = Path(scratch) / f"original-caches-{workers}"
                runs.append({"caches": "cold, original script", **run(
                    args.case, args.original.resolve(), data_file, workers, args.max_steps, caches, original=True)})
                print(json.dumps(runs[-1]), flush=True)

    header = ["caches", "workers", "wall s", "peak RSS MB", "outside training s", "first step s", f"{args.max_steps} steps s",
              "input wait", "tokens/s"]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += [f"| {r['caches']} | {r['workers']} | {r['wall_seconds']} | {r['peak_rss_mb']} | "
              f"{r.get('outside_training_seconds', '-')} | {r.get('first_step_seconds', '-')} | "
              f"{r.get('train_runtime_seconds', '-')} | {r.get('input_wait_fraction', '-')} | "
              f"{r.get('tokens_per_second') or '-'} |" for r in runs]
    text = (f"{args.case}, {size}, scripts from {args.scripts}, load average {os.getloadavg()[0]:.1f}\n\n"
            + "\n".join(table) + "\n"
            + (f"\nfeature extraction, clips/s by threads: {extraction}\n" if extraction else ""))
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"data_scale_{args.case}.md").write_text(text)
    (args.output / f"data_scale_{args.case}.json").write_text(json.dumps(
        {"case": args.case, "size": size, "scripts": str(args.scripts), "runs": runs,
         "feature_clips_per_second": extraction}, indent=1))


if __name__ == "__main__":
    main()
