"""The DELG paper's verification as its official code runs it, kept as the baseline to compare with.

One-way 1-NN of every query descriptor among the database descriptors (scipy KD-tree, L2 below
``max_distance``, no mutual check, no ratio test), more than 3 matches required, then
scikit-image ``ransac`` with an ``AffineTransform`` from database to query locations (3 samples,
residual threshold in query pixels, ``reference_trials`` trials, seeded). The score is the raw
inlier count: many-to-one matches are counted as often as they occur, which is what lets
repetitive texture and unrelated pairs score high (the default path fixes that). Of the
:class:`~.geometry.MatchOptions`, only ``max_distance``, ``threshold``, ``reference_trials`` and
``seed`` apply here (``matching``, ``ratio``, ``method``, ``max_iters`` and ``distinct_px`` do not).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .geometry import MatchOptions, VerificationResult


def reference_match_and_verify(
    q_kp: np.ndarray,
    query_descriptors: np.ndarray,
    d_kp: np.ndarray,
    db_descriptors: np.ndarray,
    opts: MatchOptions,
) -> VerificationResult:
    """The faithful path (``match_and_verify(..., reference=True)``); float descriptors only."""
    from scipy.spatial import cKDTree
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    from .geometry import VerificationResult, _empty, is_binary

    if is_binary(query_descriptors) or is_binary(db_descriptors):
        raise TypeError("the reference path matches float descriptors only (the paper has no binary variant)")
    if opts.model != "affine":
        raise ValueError("the reference path fits the paper's affine model only")
    q = np.asarray(query_descriptors, np.float32)
    d = np.asarray(db_descriptors, np.float32)
    if len(q) == 0 or len(d) == 0:
        return _empty()
    _, nn = cKDTree(d).query(q, distance_upper_bound=opts.max_distance)
    q_idx = np.flatnonzero(nn < len(d))  # misses come back as index len(d)
    d_idx = nn[q_idx]
    n = len(q_idx)
    if n <= 3:
        return _empty(n)
    with warnings.catch_warnings():  # skimage warns when a random sample is degenerate
        warnings.simplefilter("ignore")
        model, mask = ransac(
            (d_kp[d_idx], q_kp[q_idx]),
            AffineTransform,
            min_samples=3,
            residual_threshold=opts.threshold,
            max_trials=opts.reference_trials,
            rng=opts.seed,
        )
    if mask is None:  # no trial found a model
        return _empty(n)
    # the official code counts the best trial's inliers whatever the final fit on them gives; since
    # scikit-image 0.26 a failed final fit (all inliers on one line) is a falsy FailedEstimation, no model
    fitted = model is not None and bool(model)
    mask = np.asarray(mask, bool)
    q_in, d_in = q_idx[mask], d_idx[mask]
    return VerificationResult(
        inliers=int(mask.sum()),
        matches=n,
        query_points=q_kp[q_in].astype(np.float32),
        db_points=d_kp[d_in].astype(np.float32),
        query_indices=q_in.astype(np.int64),
        db_indices=d_in.astype(np.int64),
        model=np.asarray(model.params, np.float64) if fitted else None,
    )
