"""Memory that does not grow with the corpus: run_clm_flax.py on two generated texts 10x apart.

The blocks are read from the tokenized Arrow cache batch by batch (data.TokenStream), so the
corpus itself costs only the pages of its memory-mapped cache that the process touches: the
larger run's peak RSS must stay within 15 % of the smaller one's. Both texts are larger than the
10 MB chunks in which datasets' text reader holds lines as Python strings, so that bounded cost
is in both runs (at 2 and 20 MB it made 580 against 668 MB in one CI run). Measured here: 11 MB
647 MB, 110 MB 684 MB (1.06x), about 90 s for both. The earlier in-memory pipeline (every token a
Python int in a list, then block arrays) read 579 against 738 MB already at 2 and 20 MB (1.27x).
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
