"""CVNet re-ranking: fast scoring from stored entries vs the straightforward (official-style) scorer.

One query against N database images at 768x1024 (R50 shapes: conv4 1024 x 48 x 64, projection
width 256; random weights and random conv4 maps, which is all timing needs). The baseline starts
from cached conv4 maps and, per pair, builds both pyramids, the full-size 9-channel correlation and
runs the 4D network (tests/_cvnet_reference.py). Each mode runs in its own process so peak memory
(max RSS growth) is its own.

    python benchmarks/cvnet_rerank.py [--pairs 100] [--baseline-pairs 3] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _fresh_process import peak_growth_mib, start_peak

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

H, W, C, WIDTH = 48, 64, 1024, 256


def _setup(n: int):
    from heads.cvnet_verifier import CVNetVerifierHead

    torch.manual_seed(0)
    head = CVNetVerifierHead(width=WIDTH, batch_size=ARGS.batch_size)
    head.build({"conv4": C}, 0)
    head.eval()
    maps = [torch.randn(1, C, H, W) for _ in range(n + 1)]
    return head, maps


def run_fast(n: int) -> dict:
    head, maps = _setup(n)
    t0 = time.perf_counter()
    entries = head.extract_entries([torch.zeros(3, 1, 1)] * len(maps), iter_maps(maps))
    extract = (time.perf_counter() - t0) / len(maps)
    stored = sum(t.numel() * t.element_size() for t in entries[1].values())
    base = start_peak()  # before the warm-up: what scoring needs, not what the warm-up left in the heap
    head.score(entries[0], entries[1:3], [0, 1])  # warm-up
    t0 = time.perf_counter()
    scores = head.score(entries[0], entries[1:], list(range(n)))
    per_pair = (time.perf_counter() - t0) / n
    return {"per_pair_s": per_pair, "extract_per_image_s": extract, "bytes_per_db_image": stored,
            "peak_rss_growth_mib": peak_growth_mib(base), "scores": scores.tolist()}


def iter_maps(maps):
    it = iter(maps)
    return lambda _images: {"conv4": next(it)}


def run_baseline(n: int) -> dict:
    from _cvnet_reference import head_state_as_official, reference_logits

    head, maps = _setup(max(n, 1))
    state = head_state_as_official(head.state_dict())
    scores, times = [], []
    with torch.no_grad():
        base = start_peak()
        reference_logits(state, maps[0], maps[1])  # warm-up, untimed, as the fast path's
        for k in range(1, n + 1):
            t0 = time.perf_counter()
            scores.append(float(reference_logits(state, maps[0], maps[k]).softmax(-1)[0, 1]))
            times.append(time.perf_counter() - t0)
    return {"per_pair_s": sum(times) / n, "peak_rss_growth_mib": peak_growth_mib(base), "scores": scores}


def main() -> None:
    if ARGS.mode:
        torch.set_num_threads(ARGS.threads)
        result = run_fast(ARGS.pairs) if ARGS.mode == "fast" else run_baseline(ARGS.baseline_pairs)
        print(json.dumps(result))
        return
    results = {}
    for mode in ("fast", "baseline"):
        cmd = [sys.executable, __file__, "--mode", mode, "--pairs", str(ARGS.pairs),
               "--baseline-pairs", str(ARGS.baseline_pairs), "--batch-size", str(ARGS.batch_size),
               "--threads", str(ARGS.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    fast, slow = results["fast"], results["baseline"]
    m = ARGS.baseline_pairs
    diff = max(abs(a - b) for a, b in zip(fast["scores"][:m], slow["scores"]))
    print(f"CVNet re-ranking, 1 query x {ARGS.pairs} db images at 768x1024 (R50 shapes), {ARGS.threads} threads")
    print(f"  straightforward (cached conv4, {m} pairs): {slow['per_pair_s']:.3f} s/pair, "
          f"peak RSS +{slow['peak_rss_growth_mib']:.0f} MiB")
    print(f"  fast (stored fp16 entries, {ARGS.pairs} pairs, batch {ARGS.batch_size}): {fast['per_pair_s']:.3f} s/pair, "
          f"peak RSS +{fast['peak_rss_growth_mib']:.0f} MiB")
    print(f"  speed-up: {slow['per_pair_s'] / fast['per_pair_s']:.2f}x (goal >= 5x)")
    print(f"  stored per db image: {fast['bytes_per_db_image'] / 2**20:.2f} MiB "
          f"(projection at extraction: {fast['extract_per_image_s']:.3f} s/image, once)")
    print(f"  largest score difference (fp16 entries vs fp32 straightforward, {m} pairs): {diff:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--baseline-pairs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("fast", "baseline"), default=None)
    ARGS = parser.parse_args()
    if not 1 <= ARGS.baseline_pairs <= ARGS.pairs or ARGS.batch_size < 1:
        parser.error(f"--baseline-pairs must be in [1, --pairs={ARGS.pairs}] and --batch-size >= 1")
    main()
