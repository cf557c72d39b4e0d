"""Shared by the memory benchmarks: one variant measured in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_variant(script: str, args: list[str]) -> dict[str, Any]:
    """``python <script> <args>`` (which prints one JSON object), with glibc told to return freed blocks at once:
    otherwise it keeps freed chunk-sized blocks in its heap, and RSS would track the allocator, not the tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout)
