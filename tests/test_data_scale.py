"""Memory that does not grow with the corpus: run_clm_flax.py on two generated texts 10x apart.

The blocks are read from the tokenized Arrow cache batch by batch (data.TokenStream), so the
corpus itself costs only the pages of its memory-mapped caches that the process touches: the
larger run's peak RSS must stay within 15 % of the smaller one's. Measured here (2026-11-30,
this test's two runs repeated twice through benchmarks/data_scale.py's `run`): 11 MB 628 and
636 MB, 110 MB 676 and 658 MB (1.08x, 1.03x); ~36 s for the test. Two causes of growth this
test caught and that are fixed: datasets' text reader in 10 MB chunks left ~5 MB of Python
memory per 10 MB of text (588 against 703 MB in a CI run; now 1 MB chunks,
`data.TEXT_CHUNK_BYTES`), and the raw texts' Arrow pages stayed mapped through training (the LM
scripts now hand each raw split over once, `scripts.consume`).
The earlier in-memory pipeline (every token a Python int in a list) read 579 against 738 MB
already at 2 and 20 MB (1.27x).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_module

ROOT = Path(__file__).resolve().parent.parent


def data_scale():
    return load_module(ROOT / "benchmarks" / "data_scale.py", "data_scale")


@pytest.mark.reliability
@pytest.mark.spawns
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    bench = data_scale()
    peaks = {}
    for megabytes in (11, 110):
        folder = tmp_path / f"{megabytes}mb"
        folder.mkdir()
        corpus = bench.make_text(folder, megabytes)
        result = bench.run("clm", ROOT / "examples", corpus, workers=2, max_steps=5, caches=folder / "caches")
        peaks[megabytes] = result["peak_rss_mb"]
    assert peaks[110] <= 1.15 * peaks[11], peaks
