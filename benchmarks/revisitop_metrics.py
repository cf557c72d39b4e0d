"""Revisitop E/M/H metrics from scores: counting ranks vs sorting every query's ranking.

Random float32 scores for 70 queries against a 1M-image database (float32 draws on a 2^-24
grid, so there are plenty of exact ties) and revisitop-like ground truth (~25 easy, ~25 hard,
~50 junk per query, positives scored a little higher). The fast path
(:func:`evaluate_revisitop_from_scores`: per chunk, a sort of the chunk and a ``searchsorted`` of
the ground-truth scores into it, queries side by side on torch's threads) is timed against a
reference-style loop: per query a full stable argsort (one thread), membership tests per protocol
and the positive-by-positive AP loop. The two must agree exactly.

    python benchmarks/revisitop_metrics.py [--queries 70] [--database 1000000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retrieval_lightning.metrics import evaluate_revisitop_from_scores, protocol_gnd

KAPPAS = (1, 5, 10)


def make_case(n_queries: int, n_db: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_queries, n_db, generator=generator).numpy()
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(n_queries):
        n_easy, n_hard, n_junk = rng.integers(0, 50), rng.integers(1, 50), rng.integers(20, 80)
        chosen = rng.choice(n_db, size=n_easy + n_hard + n_junk, replace=False)
        easy, hard = chosen[:n_easy], chosen[n_easy : n_easy + n_hard]
        scores[q, easy] = np.minimum(scores[q, easy] + 0.5, 1.0)
        scores[q, hard] = np.minimum(scores[q, hard] + 0.2, 1.0)
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": chosen[n_easy + n_hard :].tolist()})
    return scores, gnd


def reference_style(scores: np.ndarray, gnd: list[dict]) -> dict[str, float]:
    """Sort each query's whole ranking, find positives and junk by membership, loop over positives."""
    protocols = {suffix: protocol_gnd(gnd, name) for name, suffix in (("easy", "E"), ("medium", "M"), ("hard", "H"))}
    sums = {suffix: [0.0, np.zeros(len(KAPPAS)), 0] for suffix in protocols}
    for q in range(scores.shape[0]):
        ranking = np.argsort(-scores[q], kind="stable")
        for suffix, split in protocols.items():
            ok, junk = split[q]["ok"], split[q]["junk"]
            if ok.size == 0:
                continue
            positives = np.flatnonzero(np.isin(ranking, ok))
            junk_at = np.flatnonzero(np.isin(ranking, junk))
            shift = 0
            cursor = 0
            for i in range(positives.size):
                while cursor < junk_at.size and junk_at[cursor] < positives[i]:
                    shift += 1
                    cursor += 1
                positives[i] -= shift
            ap = 0.0
            for j in range(positives.size):
                r = positives[j]
                ap += ((float(j) / r if r else 1.0) + float(j + 1) / (r + 1)) * (1.0 / ok.size) / 2.0
            precisions = np.zeros(len(KAPPAS))
            if positives.size:
                for i, k in enumerate(KAPPAS):
                    window = min(positives[-1] + 1, k)
                    precisions[i] = np.count_nonzero(positives + 1 <= window) / window
            sums[suffix][0] = sums[suffix][0] + ap
            sums[suffix][1] = sums[suffix][1] + precisions
            sums[suffix][2] += 1
    report = {}
    for suffix, (total, precisions, count) in sums.items():
        report[f"mAP_{suffix}"] = 100.0 * (total / count)
        for k, value in zip(KAPPAS, precisions / count):
            report[f"mP@{k}_{suffix}"] = 100.0 * float(value)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, which the fast path counts queries on (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"revisitop E/M/H metrics: {args.queries} queries x {args.database:,} database, float32 scores, "
          f"torch threads {torch.get_num_threads()}")
    scores, gnd = make_case(args.queries, args.database)
    print(f"score matrix {scores.nbytes / 2**20:.0f} MiB; "
          f"{sum(len(g['easy']) + len(g['hard']) for g in gnd) / len(gnd):.0f} positives and "
          f"{sum(len(g['junk']) for g in gnd) / len(gnd):.0f} junk per query on average")

    start = time.perf_counter()
    fast = evaluate_revisitop_from_scores(scores, gnd, KAPPAS, chunk_size=args.chunk_size)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    slow = reference_style(scores, gnd)
    slow_seconds = time.perf_counter() - start

    print(f"  fast path (per-chunk counting)  : {fast_seconds:8.2f} s")
    print(f"  reference-style (argsort + loop): {slow_seconds:8.2f} s")
    goal = "  (goal >= 10 x, on 2 threads)" if torch.get_num_threads() >= 2 else "  (the goal, 10 x, is on 2 threads)"
    print(f"  speed-up                        : {slow_seconds / fast_seconds:8.1f} x{goal}")
    print("  " + "  ".join(f"{key} {value:.4f}" for key, value in fast.items() if key.startswith("mAP")))
    mismatched = [key for key in fast if fast[key] != slow[key]]
    assert not mismatched, f"fast and reference-style values differ: {[(k, fast[k], slow[k]) for k in mismatched]}"
    print(f"  all {len(fast)} values identical (==, not approximately)")


if __name__ == "__main__":
    main()
