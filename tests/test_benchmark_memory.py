"""The memory benchmarks' peak measure: a section's own peak over the RSS at its start, in a fresh process as the
benchmarks measure each variant (a test worker's RSS counters, after hundreds of tests and with several threads,
are no place to measure 128 MiB)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _fresh_process import run_variant  # noqa: E402

SECTION = f"""
import json, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import torch
from _fresh_process import peak_growth_mib, start_peak

earlier = torch.ones(64 << 20)  # 256 MiB, then freed: the peak so far stays 256 MiB above the RSS
del earlier
base = start_peak()
section = torch.ones(32 << 20)  # 128 MiB, touched
del section
print(json.dumps({{"growth_mib": peak_growth_mib(base)}}))
"""


def test_a_sections_peak_growth_is_not_hidden_by_an_earlier_higher_peak(tmp_path: Path) -> None:
    """Building a benchmark's inputs peaks above where it settles; that peak was the baseline, and a section
    allocating less than it reported no growth at all."""
    script = tmp_path / "section.py"
    script.write_text(SECTION)
    assert 120 < run_variant(str(script), [])["growth_mib"] < 200
