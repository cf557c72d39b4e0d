"""Geometric verification on real image pairs: the default path against the paper's reference path.

Input: the pairs of ``../shared/data/REAL_PAIRS.tsv`` with 1000 OpenCV SIFT features per image
(RootSIFT descriptors: L1-normalised, square-rooted, hence unit L2, so the paper's ``L2 < 1.0``
applies), so the geometry is measured apart from any model. Measured in the same run:

1. time per pair of ``match_and_verify`` (default: fp32 GEMM, mutual NN, OpenCV USAC affine,
   distinct-keypoint count) against ``reference=True`` (scipy KD-tree 1-NN L2 < 1.0 + scikit-image
   affine RANSAC, 3 samples, 20 px, 1000 trials), the two interleaved pair by pair, and the ratio
   (process CPU time by default: both run single-threaded, and CPU time is not inflated when other
   jobs share the cores; ``--clock wall`` for wall time);
2. inliers of every real pair and every unrelated pair (row i's first image against row j's second
   image, j != i) for both paths, printed as a matrix (diagonal = real pairs), and whether every
   real pair not marked HARD scores above every unrelated pair;
3. on graf1 -> graf3 (ground-truth homography ``H1to3p.xml``), the reprojection error of the inliers;
4. ``verify_shortlist`` (one call, ``--workers`` threads) against a loop of ``match_and_verify``.

    python benchmarks/local_matching.py [--threads 1] [--repeats 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
ARGS.add_argument("--threads", type=int, default=1, help="BLAS/OpenCV threads for the per-pair timings")
ARGS.add_argument("--repeats", type=int, default=1, help="timed calls per pair and path (best kept)")
ARGS.add_argument("--workers", type=int, default=2, help="verify_shortlist threads")
ARGS.add_argument("--features", type=int, default=1000)
ARGS.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                  help="per-pair timings by process CPU time (robust to a busy machine) or wall clock")
OPTS = ARGS.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(OPTS.threads)  # before numpy loads its BLAS

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from retrieval_lightning.match import read_rgb, sift_features  # noqa: E402
from retrieval_lightning.retrieval.geometry import match_and_verify, verify_shortlist  # noqa: E402


CLOCK = time.process_time if OPTS.clock == "cpu" else time.perf_counter


def load_pairs(data: Path) -> list[dict[str, str]]:
    lines = (data / "REAL_PAIRS.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def timed(fn, repeats: int, clock=time.perf_counter) -> tuple[object, float]:
    """(result, best time in seconds over ``repeats`` calls) by ``clock``."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return out, best


def short(path: str) -> str:
    return Path(path).stem[:14]


def print_matrix(title: str, names: list[str], inl: np.ndarray) -> None:
    print(f"\n{title}: inliers, row = first image of pair i, column = second image of pair j "
          "(diagonal = the real pair)")
    print(" " * 15 + "".join(f"{n[:7]:>8}" for n in names))
    for i, name in enumerate(names):
        cells = "".join(f"{('[' + str(v) + ']') if i == j else str(v):>8}" for j, v in enumerate(inl[i]))
        print(f"{name:<15}{cells}")


def separation(inl: np.ndarray, hard: np.ndarray) -> tuple[int, int, bool]:
    """(lowest real non-HARD, highest unrelated, whether the first is above the second)."""
    n = len(inl)
    real = [inl[i, i] for i in range(n) if not hard[i]]
    unrelated = [inl[i, j] for i in range(n) for j in range(n) if i != j]
    return int(min(real)), int(max(unrelated)), bool(min(real) > max(unrelated))


def main() -> int:
    cv2.setNumThreads(OPTS.threads)
    data = Path(OPTS.data)
    pairs = load_pairs(data)
    paths = sorted({p[k] for p in pairs for k in ("view_a", "view_b")})
    start = time.perf_counter()
    feats = {p: sift_features(read_rgb(data / p), OPTS.features) for p in paths}
    print(f"{len(pairs)} real pairs, {len(paths)} images, SIFT ({OPTS.features} per image, RootSIFT) in "
          f"{time.perf_counter() - start:.1f} s; threads={OPTS.threads}")
    n = len(pairs)
    names = [short(p["view_a"]) for p in pairs]
    hard = np.array(["HARD" in p["verdict"] for p in pairs])
    inl = {"default": np.zeros((n, n), int), "reference": np.zeros((n, n), int)}
    secs = {"default": np.zeros((n, n)), "reference": np.zeros((n, n))}
    results = {}
    warm_a, warm_b = feats[pairs[0]["view_a"]], feats[pairs[0]["view_b"]]
    for reference in (False, True):  # one-time costs (imports, OpenCV's and scipy's set-up), outside the timings
        match_and_verify(*warm_a, *warm_b, reference=reference)
    for i, row in enumerate(pairs):
        qa = feats[row["view_a"]]
        for j, col in enumerate(pairs):
            db = feats[col["view_b"]]
            # CPU time of this process: both paths are single-threaded here (threads=1), and CPU
            # time is not inflated by other processes competing for the cores
            res, t = timed(lambda: match_and_verify(*qa, *db, seed=i * n + j), OPTS.repeats, CLOCK)
            ref, t_ref = timed(lambda: match_and_verify(*qa, *db, seed=i * n + j, reference=True),
                               OPTS.repeats, CLOCK)
            inl["default"][i, j], secs["default"][i, j] = res.inliers, t
            inl["reference"][i, j], secs["reference"][i, j] = ref.inliers, t_ref
            if i == j:
                results[row["view_a"]] = (res, ref)

    print("\nReal pairs (default = mutual NN + USAC affine 20 px, distinct keypoints; "
          "reference = KD-tree 1-NN + skimage RANSAC 1000 trials)")
    print(f"{'pair':<34}{'verdict':<22}{'def. inl':>9}{'ref. inl':>9}{'def. ms':>9}{'ref. ms':>9}{'ratio':>8}")
    for i, row in enumerate(pairs):
        d, r = secs["default"][i, i], secs["reference"][i, i]
        label = f"{short(row['view_a'])}/{short(row['view_b'])}"
        print(f"{label:<34}{row['verdict'][:21]:<22}{inl['default'][i, i]:>9}{inl['reference'][i, i]:>9}"
              f"{d * 1e3:>9.1f}{r * 1e3:>9.0f}{r / d:>7.0f}x")
    for path in ("default", "reference"):
        print_matrix(f"{path} path", names, inl[path])

    off = ~np.eye(n, dtype=bool)
    print(f"\nTime per pair ({OPTS.clock} time; same run, interleaved; best of {OPTS.repeats} call(s) "
          "for each path):")
    for label, mask in (("real pairs", np.eye(n, dtype=bool)), ("unrelated pairs", off), ("all pairs", np.ones((n, n), bool))):
        d, r = secs["default"][mask].mean(), secs["reference"][mask].mean()
        per_pair = secs["reference"][mask] / secs["default"][mask]
        print(f"  {label:<16} default {d * 1e3:6.2f} ms   reference {r * 1e3:7.1f} ms   "
              f"ratio of means {r / d:6.0f}x   median per-pair ratio {np.median(per_pair):5.0f}x")

    print("\nSeparation (every real pair not marked HARD above every unrelated pair):")
    ok = True
    for path in ("default", "reference"):
        lo, hi, sep = separation(inl[path], hard)
        print(f"  {path:<10} lowest real (non-HARD) {lo:4d}   highest unrelated {hi:4d}   "
              f"{'separated' if sep else 'NOT separated'}")
        ok &= sep or path == "reference"
    for i in np.flatnonzero(hard):
        print(f"  HARD pair {names[i]}: default {inl['default'][i, i]} (unrelated max in its row "
              f"{inl['default'][i][off[i]].max()}), reference {inl['reference'][i, i]}")

    graf = next((p for p in pairs if "H1to3p" in p["kind"]), None)
    if graf is not None:
        fs = cv2.FileStorage(str(data / "photos/opencv/data/H1to3p.xml"), cv2.FILE_STORAGE_READ)
        homography = fs.getNode("H13").mat()
        fs.release()
        print("\nGround-truth homography graf1 -> graf3: reprojection error of the inliers (graf3 px)")
        for label, res in zip(("default", "reference"), results[graf["view_a"]]):
            proj = cv2.perspectiveTransform(res.query_points.reshape(-1, 1, 2).astype(np.float64), homography)
            err = np.linalg.norm(proj.reshape(-1, 2) - res.db_points, axis=1)
            print(f"  {label:<10} {res.inliers:4d} inliers   median {np.median(err):5.2f}   mean {err.mean():6.2f}   "
                  f"max {err.max():7.2f}   within 3 px {np.mean(err < 3):.0%}")

    query = feats[pairs[0]["view_a"]]
    cands = [feats[p] for p in paths] * 5  # 100 candidates of 1000 features
    cands = cands[:100]
    seeds = list(range(len(cands)))
    cv2.setNumThreads(1)
    loop, t_loop = timed(lambda: [match_and_verify(*query, *c, seed=s) for c, s in zip(cands, seeds)], OPTS.repeats)
    batch, t_batch = timed(lambda: verify_shortlist(*query, cands, seeds, workers=OPTS.workers), OPTS.repeats)
    same = [a.inliers for a in loop] == [b.inliers for b in batch]
    print(f"\nverify_shortlist, {len(cands)} candidates (wall clock): loop of match_and_verify {t_loop * 1e3:.0f} ms, "
          f"one call with {OPTS.workers} workers {t_batch * 1e3:.0f} ms ({t_loop / t_batch:.2f}x), "
          f"same inliers: {same}")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
