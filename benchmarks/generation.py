"""Generation benchmark: tokens/s of this project's `Model.generate` against Transformers 4.x's Flax
`generate`, greedy and 4-beam, on the same random weights.

    python benchmarks/generation.py [--quick] [--repeats 3] [--output reports/bench]

Cases: a T5-small-shaped model (d_model 512, 6 + 6 layers, vocabulary 32,128) on 4 sources of 128
tokens, and a Whisper-tiny-shaped one (d_model 384, 4 + 4 layers) on 4 clips of log-mel features;
both generate 64 tokens per row (`min_length` = `max_length`, so neither stops early and both make
the same number of tokens; the tokens themselves are compared, and must be equal). Both
implementations get the parameters of one `models.from_config` (this project's trees are
Transformers' Flax trees). Each call is compiled and run once first (the compile time is
reported apart), then timed `--repeats` times; tokens/s is batch x new tokens / the median time.

Needs Transformers 4.x (its Flax classes): run it in the tf457 environment (`nox -s bench` does).
Written to --output: generation.json and generation.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flax_finetune import models  # noqa: E402

BATCH, SOURCE_LENGTH, NEW_TOKENS = 4, 128, 64


def t5_case(quick: bool):
    import transformers

    size = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512) if quick else dict(
        d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64, vocab_size=32128)
    config = transformers.T5Config(**size, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (BATCH, SOURCE_LENGTH)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return "T5-small shape", config, "seq2seq-lm", transformers.FlaxT5ForConditionalGeneration, inputs


def whisper_case(quick: bool):
    import transformers

    size = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=512, max_source_positions=100) if quick else dict(
        d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6, decoder_attention_heads=6,
        encoder_ffn_dim=1536, decoder_ffn_dim=1536, vocab_size=51865)
    config = transformers.WhisperConfig(**size, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
                                        bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
                                        forced_decoder_ids=None)
    frames = 2 * config.max_source_positions
    features = np.random.default_rng(0).standard_normal((BATCH, config.num_mel_bins, frames)).astype(np.float32)
    return "Whisper-tiny shape", config, "speech-seq2seq", transformers.FlaxWhisperForConditionalGeneration, \
        {"input_features": features}


def timed(call, repeats: int) -> tuple[float, list[float], np.ndarray]:
    """(first call's seconds, compilation included; the timed calls' seconds; the tokens)."""
    started = time.perf_counter()
    tokens = np.asarray(jax.block_until_ready(call()))
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return first, times, tokens


def measure(case, num_beams: int, repeats: int) -> dict:
    name, config, task, reference_class, inputs = case
    model = models.from_config(config, task)
    max_length = NEW_TOKENS + 1  # the decoder start token, then the new tokens
    settings = dict(max_length=max_length, min_length=max_length, num_beams=num_beams)
    device_inputs = {key: jax.numpy.asarray(value) for key, value in inputs.items()}

    reference = reference_class(config, _do_init=False)
    # both jitted whole, as a user (or this project's scripts) would call them
    own = jax.jit(lambda params, batch: model.generate(params, batch, **settings))
    theirs = jax.jit(lambda params, batch: reference.generate(**batch, params=params, **settings).sequences)

    results = {}
    for implementation, call in (("flax_finetune", lambda: own(model.params, device_inputs)),
                                 ("Transformers Flax", lambda: theirs(model.params, device_inputs))):
        first, times, tokens = timed(call, repeats)
        results[implementation] = {"first_call_seconds": first, "seconds": times, "tokens": tokens}
    same = np.array_equal(results["flax_finetune"]["tokens"], results["Transformers Flax"]["tokens"])
    rows = []
    for implementation, result in results.items():
        median = statistics.median(result["seconds"])
        rows.append({"case": name, "search": "greedy" if num_beams == 1 else f"{num_beams} beams",
                     "implementation": implementation, "tokens_per_second": BATCH * NEW_TOKENS / median,
                     "median_seconds": median, "first_call_seconds": result["first_call_seconds"],
                     "same_tokens": bool(same)})
    rows[0]["speedup"] = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | search | implementation | tokens/s | median s | first call s (compile included) | "
             "speed-up | same tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        lines.append(f"| {row['case']} | {row['search']} | {row['implementation']} | {row['tokens_per_second']:.1f} | "
                     f"{row['median_seconds']:.2f} | {row['first_call_seconds']:.1f} | {speedup} | "
                     f"{'yes' if row['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny configs: a smoke test of the harness.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per measurement (after the first).")
    parser.add_argument("--output", type=Path, default=Path("reports/bench"), help="Where the reports go.")
    args = parser.parse_args(argv)
    import transformers

    if not hasattr(transformers, "FlaxT5ForConditionalGeneration"):
        print(f"Transformers {transformers.__version__} has no Flax classes: run this in a 4.x environment")
        return 2
    rows = []
    for make_case in (t5_case, whisper_case):
        case = make_case(args.quick)
        for num_beams in (1, 4):
            rows += measure(case, num_beams, args.repeats)
            print(markdown(rows[-2:]).splitlines()[-2:], flush=True)
    report = markdown(rows)
    header = (f"Generation, batch {BATCH}, {NEW_TOKENS} new tokens per row; jax {jax.__version__}, "
              f"Transformers {transformers.__version__}, {jax.devices()[0].platform}\n\n")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "generation.md").write_text(header + report + "\n")
    (args.output / "generation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(header + report)
    return 0 if all(row["same_tokens"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
