"""Memory of the hard-negative table's search (``nearest_other_label``) on a large pool, measured in this run.

The search computes ``chunk`` pool rows against every column. Before, it held all of a row chunk's
similarities at once (``chunk`` x pool size: 6 GB per chunk of 1024 rows for GLDv2-clean's 1.5M images)
and the whole pool's descriptors on the device; now it goes through blocks of
:data:`~retrieval_lightning.callbacks.hard_negatives.COLUMN_BLOCK` columns and merges their tops. Both
variants run on the same random descriptors, each in a fresh process: peak RSS growth over the RSS before
the search (glibc told to return freed blocks at once, so RSS follows the live tensors), time, and how many
table rows differ between the two (ties broken by rounding differences of the two products, if any).
One rank's share of the rows is computed (``--rows`` of them), since the memory is per row chunk.

    .venv/bin/python benchmarks/mining_search.py [--pool 400000 --dim 128 --rows 2048 --chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _fresh_process import peak_growth_mib, run_variant, start_peak


def search(variant: str, pool: int, dim: int, rows: int, chunk: int) -> dict:
    """Run in a fresh process: the table rows of one part of the pool, its time and peak RSS growth."""
    from retrieval_lightning.callbacks import hard_negatives

    if variant == "all columns":
        hard_negatives.COLUMN_BLOCK = pool  # one block: the search as it was
    generator = torch.Generator().manual_seed(0)
    desc = F.normalize(torch.randn(pool, dim, generator=generator), dim=1)
    labels = torch.arange(pool) // 5
    parts = max(1, pool // rows)
    before = start_peak()
    start = time.perf_counter()
    table = hard_negatives.nearest_other_label(desc, labels, k=10, chunk=chunk, part=(0, parts))
    seconds = time.perf_counter() - start
    grown = peak_growth_mib(before)
    own = hard_negatives.part_rows(pool, chunk, 0, parts)
    return {"peak_growth_mib": grown, "seconds": seconds, "rows": int(own.numel()),
            "table": table[own].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=["blocks", "all columns"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(search(args.variant, args.pool, args.dim, args.rows, args.chunk)))
        return
    runs = {variant: run_variant(__file__, ["--variant", variant, "--pool", str(args.pool), "--dim", str(args.dim),
                                            "--rows", str(args.rows), "--chunk", str(args.chunk)])
            for variant in ("blocks", "all columns")}
    blocks, whole = runs["blocks"], runs["all columns"]
    differ = sum(a != b for a, b in zip(blocks["table"], whole["table"]))
    print(f"nearest other labels, {blocks['rows']} rows of a {args.pool:,}-image pool ({args.dim}-D, chunks of "
          f"{args.chunk}, CPU, {torch.get_num_threads()} threads): peak RSS growth in column blocks "
          f"{blocks['peak_growth_mib']:.0f} MiB ({blocks['seconds']:.1f} s), all columns at once "
          f"{whole['peak_growth_mib']:.0f} MiB ({whole['seconds']:.1f} s): "
          f"x{whole['peak_growth_mib'] / max(1.0, blocks['peak_growth_mib']):.1f} less memory; "
          f"table rows differing: {differ} of {blocks['rows']}")


if __name__ == "__main__":
    main()
