"""Inlier counts of the real pairs of ``../shared/data/REAL_PAIRS.tsv`` vs unrelated pairs, through a DELG model.

Every row's first image is matched against its own second image (a real pair) and against every
other row's second image (unrelated pairs), through ``RetrievalModule.rerank_scores`` (the
``delg_local`` head's extraction and geometric verification). Run it for a trained checkpoint
and, in the same run, for the untrained baseline (ImageNet backbone, random local head) built from
the same config, so the two tables are comparable.

    python benchmarks/delg_real_pairs.py --checkpoint outputs/delg_demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_lightning.data.io import load_image
from retrieval_lightning.module import RetrievalModule

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_pairs(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def inlier_table(module: RetrievalModule, rows: list[dict[str, str]], max_side: int) -> tuple[np.ndarray, float]:
    """(n, n) inlier counts: [i, j] = first image of row i against second image of row j."""
    module.eval()
    start = time.perf_counter()
    load = lambda p: load_image(DATA / p, max_side=max_side).float() / 255  # noqa: E731
    firsts = module.rerank_entries([load(r["view_a"]) for r in rows], database=False)
    seconds = module.rerank_entries([load(r["view_b"]) for r in rows], database=True)
    table = np.stack([
        module.score_entries(q, seconds, [1000 * i + j for j in range(len(rows))]).numpy() for i, q in enumerate(firsts)
    ])
    return table, time.perf_counter() - start


def report(name: str, rows: list[dict[str, str]], table: np.ndarray, seconds: float) -> None:
    n = len(rows)
    unrelated = table[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    print(f"\n## {name} ({seconds:.1f} s for {2 * n} images and {n * n} pairs)")
    print("| pair | kind | real | max unrelated (row) |")
    print("|---|---|---|---|")
    for i, r in enumerate(rows):
        hard = " (HARD)" if "HARD" in r["verdict"] else ""
        print(f"| {Path(r['view_a']).name} / {Path(r['view_b']).name}{hard} | {r['kind'][:40]} | "
              f"{table[i, i]:.0f} | {unrelated[i].max():.0f} |")
    easy = [i for i, r in enumerate(rows) if "HARD" not in r["verdict"]]
    real = table[easy, easy]
    print(f"real pairs not HARD: min {real.min():.0f}, median {np.median(real):.0f}; "
          f"unrelated: max {unrelated.max():.0f}, median {np.median(unrelated):.0f}, 99th pct "
          f"{np.percentile(unrelated, 99):.0f}; real (not HARD) above every unrelated: "
          f"{int((real > unrelated.max()).sum())}/{len(easy)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="self-contained checkpoint of a model with a delg_local head")
    parser.add_argument("--pairs", default=str(DATA / "REAL_PAIRS.tsv"))
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--set", default=None, help="only rows of this set (dev/...)")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    rows = [r for r in read_pairs(Path(args.pairs)) if args.set in (None, r["set"])]
    trained = RetrievalModule.load_from_checkpoint(args.checkpoint)
    if not args.no_baseline:
        torch.manual_seed(0)
        baseline = RetrievalModule.load_from_checkpoint(args.checkpoint)
        from retrieval_lightning.backbone import Backbone

        fresh = Backbone(**trained.backbone.init_args)  # the starting weights of the recipe
        baseline.backbone.load_state_dict(fresh.state_dict())
        local = baseline.heads["local"]
        for module in local.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        report("untrained: ImageNet backbone, random local head", rows, *inlier_table(baseline, rows, args.max_side))
    report(f"trained: {args.checkpoint}", rows, *inlier_table(trained, rows, args.max_side))


if __name__ == "__main__":
    main()
