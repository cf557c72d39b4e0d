"""The memory benchmarks' peak measure: a section's own peak over the RSS at its start."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _fresh_process import peak_growth_mib, start_peak  # noqa: E402


def test_a_sections_peak_growth_is_not_hidden_by_an_earlier_higher_peak() -> None:
    """Building a benchmark's inputs peaks above where it settles; that peak was the baseline, and a section
    allocating less than it reported no growth at all."""
    earlier = torch.ones(64 << 20)  # 256 MiB, then freed: the peak so far stays 256 MiB above the RSS
    del earlier
    base = start_peak()
    section = torch.ones(32 << 20)  # 128 MiB, touched
    del section
    assert 120 < peak_growth_mib(base) < 200
