"""Parsing GLDv2's ``train.csv``: ``read_train_csv`` + ``remap_labels`` against Python's ``csv`` module.

GLDv2 full has 4.1M training rows; a datamodule parses them in every process at start-up. Writes a
table of ``--rows`` rows in the official layout (``id,url,landmark_id``, 16-hex ids, wikimedia URLs,
``--classes`` landmarks), then, best of ``--repeats`` passes, times:

1. the framework: ``read_train_csv`` (ids into one compact bytes array) and ``remap_labels``;
2. the baseline: ``csv.reader`` into lists of ids and ints, then ``np.unique(..., return_inverse=True)``.

Both produce the same ids and labels (checked). Prints seconds per million rows, the memory each
result holds (``tracemalloc``, in a separate pass: it slows parsing) and the ratios. The framework
validates every row and keeps ids compact (one bytes array, not a Python string per row): with 4.1M
rows in each of 8 DDP processes, memory is the cost that matters.

    python benchmarks/gldv2_csv_parse.py [--rows 1000000] [--classes 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np

from datamodules.gldv2_readers import read_train_csv, remap_labels


def write_table(path: Path, rows: int, classes: int, seed: int = 0) -> np.ndarray:
    """An official-layout train.csv; returns its landmark ids in file order."""
    landmarks = np.random.default_rng(seed).integers(0, classes, rows)
    with path.open("w") as fh:
        fh.write("id,url,landmark_id\n")
        for i, lm in enumerate(landmarks.tolist()):
            fh.write(f"{i:016x},https://upload.wikimedia.org/wikipedia/commons/{i}.jpg,{lm}\n")
    return landmarks


def framework(path: Path) -> tuple[list[str], np.ndarray]:
    table = read_train_csv(str(path))
    labels, _ = remap_labels(table.landmark_ids)
    return table.ids, labels


def baseline(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        ids, landmarks = [], []
        for row in reader:
            ids.append(row[0])
            landmarks.append(int(row[2]))
    _, labels = np.unique(np.asarray(landmarks), return_inverse=True)
    return ids, labels


def best_of(run: Callable[[Path], tuple], path: Path, repeats: int) -> tuple[float, tuple]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(path)
        best = min(best, time.perf_counter() - start)
    return best, out  # type: ignore[return-value]


def held_bytes(run: Callable[[Path], tuple], path: Path) -> int:
    """Bytes the result of ``run`` keeps allocated (traced allocations still alive after it returns)."""
    tracemalloc.start()
    out = run(path)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        write_table(path, args.rows, args.classes)
        mb = path.stat().st_size / 2**20
        fast, (ids, labels) = best_of(framework, path, args.repeats)
        slow, (base_ids, base_labels) = best_of(baseline, path, args.repeats)
        fast_mem, slow_mem = held_bytes(framework, path), held_bytes(baseline, path)
    same = len(ids) == len(base_ids) and all(ids[i] == base_ids[i] for i in range(0, len(ids), 997))
    same = same and np.array_equal(labels, base_labels)
    per_million = 1e6 / args.rows
    print(f"{args.rows} rows ({mb:.0f} MiB), {args.classes} landmarks; results identical: {same}")
    print(f"read_train_csv + remap_labels      : {fast * per_million:6.2f} s per million rows")
    print(f"csv.reader + np.unique             : {slow * per_million:6.2f} s per million rows")
    print(f"time ratio (baseline / framework)  : {slow / fast:6.2f}x")
    print(f"memory held: framework {fast_mem / 2**20:.1f} MiB, baseline {slow_mem / 2**20:.1f} MiB "
          f"(ratio {slow_mem / fast_mem:.1f}x)")


if __name__ == "__main__":
    main()
