"""Shared by the memory benchmarks: one variant measured in a fresh process, so its peak RSS is its own,
and the peak RSS growth of a measured section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_variant(script: str, args: list[str]) -> dict[str, Any]:
    """``python <script> <args>`` (which prints one JSON object), with glibc told to return freed blocks at once:
    otherwise it keeps freed chunk-sized blocks in its heap, and RSS would track the allocator, not the tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now; ``VmHWM``: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak() -> int:
    """Reset the peak RSS to the RSS now and return it (KiB): the start of a section's peak growth.

    The peak so far is no baseline: building the inputs briefly holds copies (``normalize`` of a fresh
    tensor holds two), so subtracting it from the peak after understated every variant's growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError as err:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 needed") from err
    return status_kib("VmRSS")


def peak_growth_mib(start_kib: int) -> float:
    """Peak RSS since :func:`start_peak` minus the RSS then, in MiB."""
    return (status_kib("VmHWM") - start_kib) / 1024
