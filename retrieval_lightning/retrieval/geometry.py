"""Local-feature matching and geometric verification: the score of local re-ranking.

The default path: one fp32 GEMM of descriptor similarities, mutual nearest neighbours under the
DELG distance threshold, then a seeded RANSAC in OpenCV's USAC framework (affine by default), with
the inliers counted on *distinct* keypoints (closer than ``distinct_px`` is one keypoint), so many-to-one
matches on repetitive texture, or one position stored twice (SIFT's orientations), cannot inflate the score.
DELG's scales are another matter: on a ResNet, one place's cell at scale s of the nested scales (0.25, 0.5,
1, 2) lands ``0.5 / s - 0.5`` px per axis from scale 1's in the original image (2.1 px apart at 0.25; more
where the image was shrunk for extraction), so at the default 1 px only the closer ones merge.
``reference=True`` is the paper's path as the official code runs it (one-way 1-NN through a
scipy KD-tree, scikit-image affine RANSAC, 3 samples, 20 px, 1000 trials, raw inlier count): kept
to compare against, about two orders of magnitude slower (``benchmarks/local_matching.py``).

Thresholds. Descriptors are unit vectors, so ``L2 < t`` is ``cos > 1 - t²/2`` (the paper's
``t = 1.0``: ``cos > 0.5``). Sign-binarised descriptors (``(n, d/8)`` uint8 packed bits) are
matched by Hamming distance; for sign bits the expected Hamming fraction is ``angle / π``, so the
equivalent of ``cos > 0.5`` (angle < 60°) is ``hamming < d/3``: by default ``hamming <= 42`` for
128 bits (``max_hamming``). Hamming distances are computed exactly as ``(d - s·s') / 2`` on ±1
vectors, so binary matching shares the GEMM path.

Models map database points to query points, so RANSAC residuals are in query-image pixels, as in
the official code. Determinism: OpenCV's global ``cv2.setRNGSeed`` is per thread (and its classic
RANSAC ignores it), so the seed is passed explicitly as the USAC ``randomGeneratorState``: the
same seed gives the same result in any thread and call order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Literal

import cv2
import numpy as np

_MIN_MATCHES = 3  # "need more than 3 matches" (DELG); homography needs at least 4 anyway
# what reference=True reads; its matching (one-way 1-NN), RANSAC and raw count are fixed
REFERENCE_SETTINGS = ("max_distance", "model", "threshold", "seed", "reference", "reference_trials")


@dataclass(frozen=True)
class MatchOptions:
    """Options of :func:`match_and_verify`; unknown names are refused (a typo must not be ignored)."""

    matching: Literal["mutual", "one_way"] = "mutual"
    ratio: float | None = None  # Lowe ratio test on top of the distance threshold (e.g. 0.9)
    max_distance: float = 1.0  # L2 on unit vectors (the paper's threshold)
    max_hamming: int | None = None  # bits; None = largest integer below d/3
    model: Literal["affine", "homography"] = "affine"
    method: Literal["ransac", "magsac"] = "ransac"
    threshold: float = 20.0  # inlier residual, query pixels (the paper's 20 px)
    max_iters: int = 1000  # the paper's trial budget (USAC stops earlier once confident)
    confidence: float = 0.999
    distinct_px: float = 1.0  # keypoints closer than this count once; 0: every inlier counts (the paper)
    seed: int = 0
    reference: bool = False
    reference_trials: int = 1000

    def __post_init__(self) -> None:
        if self.matching not in ("mutual", "one_way"):
            raise ValueError(f"matching must be 'mutual' or 'one_way', got {self.matching!r}")
        if self.model not in ("affine", "homography"):
            raise ValueError(f"model must be 'affine' or 'homography', got {self.model!r}")
        if self.method not in ("ransac", "magsac"):
            raise ValueError(f"method must be 'ransac' or 'magsac', got {self.method!r}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not self.distinct_px >= 0.0:
            raise ValueError(f"distinct_px must be >= 0 (0: count every inlier), got {self.distinct_px}")
        # OpenCV squares the thresholds: a negative one would act as its absolute value, 0 score every pair 0
        for name, value in (("threshold", self.threshold), ("max_distance", self.max_distance)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("max_iters", self.max_iters), ("reference_trials", self.reference_trials)):
            if not 1 <= value <= 2**31 - 1:  # OpenCV takes a C int: a larger one failed mid-re-ranking
                raise ValueError(f"{name} must be in [1, 2^31 - 1], got {value}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.max_hamming is not None and self.max_hamming < 0:
            raise ValueError(f"max_hamming must be >= 0 (None: below d/3), got {self.max_hamming}")
        if self.reference:
            self._check_reference_settings()

    def _check_reference_settings(self) -> None:
        """The official path has its own fixed choices: a setting it would ignore is refused, not dropped."""
        if self.model != "affine":
            raise ValueError(f"reference: true fits DELG's affine model only, got model {self.model!r}")
        ignored = {"ratio": self.ratio is not None, "method": self.method != "ransac",
                   "max_iters": self.max_iters != 1000, "distinct_px": self.distinct_px not in (0.0, 1.0)}
        set_ = [name for name, differs in ignored.items() if differs]
        if set_:
            raise ValueError(f"reference: true scores as DELG's official code (one-way 1-NN, scikit-image RANSAC "
                             f"over reference_trials, raw inlier count) and would ignore {', '.join(set_)}; "
                             f"leave {'them' if len(set_) > 1 else 'it'} unset, or use reference: false")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> MatchOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown matching option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of verifying one image pair.

    ``inliers`` is the score; ``query_points``/``db_points`` are the inlier correspondences counted
    (distinct and one-to-one unless ``distinct_px`` is 0), ``query_indices``/``db_indices`` their
    keypoint indices, ``matches`` the number of tentative matches given to RANSAC, ``model`` the 3×3
    matrix mapping database to query points (None when no model was fitted).
    """

    inliers: int
    matches: int
    query_points: np.ndarray
    db_points: np.ndarray
    query_indices: np.ndarray
    db_indices: np.ndarray
    model: np.ndarray | None


def _empty(matches: int = 0) -> VerificationResult:
    none = np.zeros((0,), np.int64)
    pts = np.zeros((0, 2), np.float32)
    return VerificationResult(0, matches, pts, pts.copy(), none, none.copy(), None)


# ---------------------------------------------------------------- descriptors and similarities
#: how far a float descriptor's norm may be from 1 (fp16 storage rounds unit rows by about 1e-3)
UNIT_TOLERANCE = 1e-2


def is_binary(descriptors: np.ndarray) -> bool:
    """Packed sign bits are stored as uint8; float descriptors are fp16/fp32."""
    return np.asarray(descriptors).dtype == np.uint8


def as_matchable(descriptors: np.ndarray) -> np.ndarray:
    """fp32 rows for the similarity GEMM: floats as they are, packed bits as ±1 (exact Hamming)."""
    desc = np.asarray(descriptors)
    if desc.ndim != 2:
        raise ValueError(f"descriptors must be (n, d), got shape {desc.shape}")
    if desc.dtype == np.uint8:
        return np.unpackbits(desc, axis=1).astype(np.float32) * 2.0 - 1.0
    if desc.dtype.kind != "f":
        raise TypeError(f"descriptors must be float (unit vectors) or uint8 packed bits, got {desc.dtype}")
    desc = np.ascontiguousarray(desc, dtype=np.float32)
    norms = np.linalg.norm(desc, axis=1)
    if norms.size and np.abs(norms - 1.0).max() > UNIT_TOLERANCE:
        raise ValueError(
            f"float descriptors must be L2-normalised (the distance threshold is defined on unit vectors); "
            f"{int((np.abs(norms - 1.0) > UNIT_TOLERANCE).sum())} of {len(norms)} rows have norms "
            f"from {norms.min():.4g} to {norms.max():.4g}"
        )
    return desc


def similarity_floor(dim: int, binary: bool, opts: MatchOptions) -> float:
    """Smallest accepted similarity: ``cos > 1 - t²/2``, or ``±1·±1 >= d - 2·max_hamming``."""
    if binary:
        max_ham = opts.max_hamming if opts.max_hamming is not None else -(-dim // 3) - 1
        return dim - 2 * max_ham - 0.5  # sims of ±1 vectors are integers of d's parity
    return 1.0 - opts.max_distance**2 / 2.0


def _distance(sims: np.ndarray, dim: int, binary: bool) -> np.ndarray:
    """Distances for the ratio test: Hamming bits, or L2 between unit vectors."""
    if binary:
        return (dim - sims) / 2.0
    return np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))


def tentative_matches(
    sims: np.ndarray, dim: int, binary: bool, opts: MatchOptions
) -> tuple[np.ndarray, np.ndarray]:
    """(query index, db index) pairs from an (n_q, n_db) similarity block (may be a view)."""
    n_q, n_db = sims.shape
    if n_q == 0 or n_db == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.arange(n_q)
    nn = sims.argmax(axis=1)
    best = sims[rows, nn]
    keep = best > similarity_floor(dim, binary, opts)
    if opts.matching == "mutual":
        # the row's best is its column's best too; among rows tied on one column the first wins.
        # (column max instead of column argmax: 8x faster on a C-ordered block, same pairs
        # unless similarities tie exactly, which only packed bits do often)
        keep &= best >= sims.max(axis=0)[nn]
        cand = np.flatnonzero(keep)
        _, first = np.unique(nn[cand], return_index=True)
        keep[:] = False
        keep[cand[first]] = True
    if opts.ratio is not None and n_db > 1:
        top2 = np.partition(sims, n_db - 2, axis=1)[:, n_db - 2]
        d1, d2 = _distance(best, dim, binary), _distance(top2, dim, binary)
        keep &= d1 < opts.ratio * d2
    return rows[keep], nn[keep]


# ---------------------------------------------------------------- robust model fitting
def _usac_params(opts: MatchOptions, seed: int) -> cv2.UsacParams:
    params = cv2.UsacParams()
    params.threshold = float(opts.threshold)
    params.maxIterations = int(opts.max_iters)
    params.confidence = float(opts.confidence)
    params.randomGeneratorState = int(seed) % (2**31 - 1)
    params.sampler = cv2.SAMPLING_UNIFORM
    params.isParallel = False  # parallelism is across candidates (verify_shortlist)
    if opts.method == "magsac":
        params.score = cv2.SCORE_METHOD_MAGSAC
        params.loMethod = cv2.LOCAL_OPTIM_SIGMA
        params.final_polisher = cv2.MAGSAC
    else:
        params.score = cv2.SCORE_METHOD_RANSAC  # inlier count, the quantity we report
        params.loMethod = cv2.LOCAL_OPTIM_INNER_LO
        params.final_polisher = cv2.LSQ_POLISHER
    return params


def fit_model(
    db_pts: np.ndarray, query_pts: np.ndarray, opts: MatchOptions, seed: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """Seeded USAC fit of db → query; returns (3×3 model or None, boolean inlier mask)."""
    params = _usac_params(opts, seed)
    src = np.ascontiguousarray(db_pts, np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(query_pts, np.float32).reshape(-1, 1, 2)
    try:
        if opts.model == "homography":
            matrix, mask = cv2.findHomography(src, dst, params)
        else:
            matrix, mask = cv2.estimateAffine2D(src, dst, params)
    except cv2.error:  # degenerate samples (e.g. all points collinear)
        matrix, mask = None, None
    if matrix is None or mask is None or matrix.size == 0:
        matrix, mask = _similarity_fit(src, dst, opts, seed)
    if matrix is None or mask is None or matrix.size == 0:
        return None, np.zeros(len(src), bool)
    model = np.eye(3) if matrix.shape == (2, 3) else np.empty((3, 3))
    model[: matrix.shape[0]] = matrix
    mask = mask.reshape(-1).astype(bool)
    if opts.method == "ransac":  # USAC's RANSAC model can be off by pixels: refit on its inliers
        model = _least_squares(src[mask, 0], dst[mask, 0], opts.model, model)
    return model, mask


def _similarity_fit(
    src: np.ndarray, dst: np.ndarray, opts: MatchOptions, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """RANSAC similarity (rotation, scale, shift: two points determine it) when the model found nothing.

    Why: matches along one line (one row of a facade's keypoints, a strip panorama) determine no affine
    map, so USAC's samples are all degenerate and an exact copy scored 0 inliers; along a line a similarity
    moves points as an affine map does. The official scikit-image RANSAC counts them too."""
    cv2.setRNGSeed(int(seed) % (2**31 - 1))  # OpenCV's RANSAC draws from this thread's generator
    try:
        return cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=float(opts.threshold),
                                           maxIters=int(opts.max_iters), confidence=float(opts.confidence))
    except cv2.error:  # fewer than two distinct points
        return None, None


def _least_squares(src: np.ndarray, dst: np.ndarray, kind: str, fallback: np.ndarray) -> np.ndarray:
    """Least-squares affine (or DLT homography) of src → dst; ``fallback`` if degenerate."""
    if kind == "homography":
        matrix, _ = cv2.findHomography(src, dst, 0)
        return fallback if matrix is None else matrix
    design = np.concatenate([src.astype(np.float64), np.ones((len(src), 1))], axis=1)
    solution, _, rank, _ = np.linalg.lstsq(design, dst.astype(np.float64), rcond=None)
    if rank < 3:
        return fallback
    model = np.eye(3)
    model[:2] = solution.T
    return model


def _keypoint_ids(points: np.ndarray, radius: float) -> np.ndarray:
    """Dense ids of places: points closer than ``radius`` (directly or through a chain) share an id.

    A distance, not a grid: two points a hair apart are one place wherever they fall, so whether the
    same place stored at two scales merges does not depend on where a grid line happens to run."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    unique, inverse = np.unique(points, axis=0, return_inverse=True)  # exact duplicates first: cheap
    pairs = cKDTree(unique).query_pairs(np.nextafter(radius, 0.0), output_type="ndarray")
    if len(pairs) == 0:
        return inverse.reshape(-1)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(unique), len(unique)))
    return connected_components(graph, directed=False)[1][inverse.reshape(-1)]


def distinct_pairs(
    q_idx: np.ndarray, d_idx: np.ndarray, q_kp: np.ndarray, d_kp: np.ndarray, cell: float
) -> np.ndarray:
    """Positions (into the pair arrays) of a maximum one-to-one subset on distinct keypoints.

    Keypoints closer than ``cell`` pixels are one keypoint (:func:`_keypoint_ids`), so two descriptors at
    one position (SIFT orientations; DELG scales whose centres fall within ``cell``) count once; a query
    keypoint matched to many database keypoints (or the reverse) then counts once (maximum bipartite
    matching).
    """
    if len(q_idx) == 0:
        return np.zeros(0, np.int64)
    q_id = _keypoint_ids(q_kp[q_idx], cell)
    d_id = _keypoint_ids(d_kp[d_idx], cell)
    width = int(d_id.max()) + 1
    _, first = np.unique(q_id * width + d_id, return_index=True)  # one pair per (query cell, db cell)
    first.sort()
    q_id, d_id = q_id[first], d_id[first]
    alone = (np.bincount(q_id)[q_id] == 1) & (np.bincount(d_id)[d_id] == 1)
    if alone.all():
        return first
    # the pairs sharing a keypoint: a maximum bipartite matching among them only
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rest_q, rest_d, rest_pos = q_id[~alone], d_id[~alone], first[~alone]
    graph = csr_matrix((np.ones(len(rest_q)), (rest_q, rest_d)), shape=(q_id.max() + 1, width))
    col_of_row = maximum_bipartite_matching(graph, perm_type="column")
    rows = np.flatnonzero(col_of_row >= 0)
    keys = rest_q * width + rest_d
    order = np.argsort(keys)
    chosen = rest_pos[order[np.searchsorted(keys[order], rows * width + col_of_row[rows])]]
    return np.sort(np.concatenate([first[alone], chosen]))


def verify_matches(
    q_kp: np.ndarray, d_kp: np.ndarray, q_idx: np.ndarray, d_idx: np.ndarray, opts: MatchOptions, seed: int
) -> VerificationResult:
    """RANSAC on tentative matches, then the distinct-keypoint inlier count."""
    n = len(q_idx)
    if n <= _MIN_MATCHES:
        return _empty(n)
    model, mask = fit_model(d_kp[d_idx], q_kp[q_idx], opts, seed)
    if model is None or not mask.any():
        return _empty(n)
    q_in, d_in = q_idx[mask], d_idx[mask]
    if opts.distinct_px > 0:
        keep = distinct_pairs(q_in, d_in, q_kp, d_kp, opts.distinct_px)
        q_in, d_in = q_in[keep], d_in[keep]
    return VerificationResult(
        inliers=len(q_in),
        matches=n,
        query_points=q_kp[q_in].astype(np.float32),
        db_points=d_kp[d_in].astype(np.float32),
        query_indices=q_in.astype(np.int64),
        db_indices=d_in.astype(np.int64),
        model=model,
    )


def check_features(keypoints: np.ndarray, descriptors: np.ndarray, name: str) -> np.ndarray:
    """Validated (n, 2) float64 keypoints (float64: exact distances between distinct places)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size == 0:
        kp = np.zeros((0, 2))
    elif kp.ndim != 2 or kp.shape[1] != 2:
        raise ValueError(f"{name}: keypoints must be (n, 2) x, y pixels, got shape {kp.shape}")
    if len(kp) != len(descriptors):
        raise ValueError(f"{name}: {len(kp)} keypoints but {len(descriptors)} descriptors")
    return kp


# ---------------------------------------------------------------- public entry point
def match_and_verify(
    query_keypoints: np.ndarray,
    query_descriptors: np.ndarray,
    db_keypoints: np.ndarray,
    db_descriptors: np.ndarray,
    **options: Any,
) -> VerificationResult:
    """Match two images' local features and verify them geometrically (see the module docstring).

    Keypoints are (n, 2) x, y pixels; descriptors (n, d) L2-normalised floats or (n, d/8) uint8
    packed sign bits. Options: :class:`MatchOptions` field names (``seed=`` included).
    """
    opts = MatchOptions.from_kwargs(options)
    q_kp = check_features(query_keypoints, query_descriptors, "query")
    if opts.reference:
        from .geometry_reference import reference_match_and_verify

        d_kp = check_features(db_keypoints, db_descriptors, "database")
        return reference_match_and_verify(q_kp, query_descriptors, d_kp, db_descriptors, opts)
    return _verify_pair(q_kp, as_matchable(query_descriptors), is_binary(query_descriptors),
                        db_keypoints, db_descriptors, opts, opts.seed, "database")


def _verify_pair(
    q_kp: np.ndarray, q: np.ndarray, binary: bool, keypoints: Any, descriptors: Any,
    opts: MatchOptions, seed: int, name: str,
) -> VerificationResult:
    """One pair from a prepared query: the path shared by single calls and shortlists."""
    if is_binary(descriptors) != binary:
        raise TypeError(f"{name}: descriptors must be packed bits (uint8) iff the query's are")
    d = as_matchable(descriptors)
    if d.shape[1] != q.shape[1]:
        raise ValueError(f"{name}: descriptor size {d.shape[1]} differs from the query's {q.shape[1]}")
    d_kp = check_features(keypoints, descriptors, name)
    q_idx, d_idx = tentative_matches(q @ d.T, q.shape[1], binary, opts)
    return verify_matches(q_kp, d_kp, q_idx, d_idx, opts, seed)


def verify_shortlist(
    query_keypoints: np.ndarray,
    query_descriptors: np.ndarray,
    candidates: Sequence[tuple[np.ndarray, np.ndarray]],
    seeds: Sequence[int],
    workers: int | None = None,
    **options: Any,
) -> list[VerificationResult]:
    """Verify one query against a shortlist: ``[match_and_verify(q, c, seed=s) for c, s in ...]``.

    The query is converted once; each candidate's GEMM, matching and RANSAC run as one task in a
    thread pool (numpy's BLAS and reductions and OpenCV release the GIL). One GEMM over all
    candidates stacked was measured no faster than one per candidate (the work is the same and the
    wide block's strided reductions cost more), so candidates stay separate and contiguous.
    """
    if "seed" in options:
        raise TypeError("verify_shortlist takes one seed per candidate through seeds=, not seed=")
    if len(seeds) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(seeds)} seeds")
    opts = MatchOptions.from_kwargs(options)
    if opts.reference:  # Python-bound: threads would not help
        return [
            match_and_verify(query_keypoints, query_descriptors, kp, desc, seed=int(s), **options)
            for (kp, desc), s in zip(candidates, seeds)
        ]
    q_kp = check_features(query_keypoints, query_descriptors, "query")
    binary = is_binary(query_descriptors)
    q = as_matchable(query_descriptors)

    def one(k: int) -> VerificationResult:
        kp, desc = candidates[k]
        return _verify_pair(q_kp, q, binary, kp, desc, opts, int(seeds[k]), f"candidate {k}")

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(candidates)))
    if n_workers == 1:
        return [one(k) for k in range(len(candidates))]
    with ThreadPoolExecutor(n_workers) as pool:
        return list(pool.map(one, range(len(candidates))))
