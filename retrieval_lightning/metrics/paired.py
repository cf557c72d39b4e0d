"""Is model A better than model B on these queries? A paired bootstrap over the queries.

Why: ROxford has 70 queries and the demo benchmark 10, so one query's AP moves a mean by points. Two
rankings of the same queries differ query by query; resampling the queries (with replacement) and
taking the mean difference each time gives an interval for it. When that interval holds 0, the
queries cannot tell the two models apart (it does not cover another training seed: that is another
source of spread, measured by training again).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PairedDifference(NamedTuple):
    """Mean of ``a - b`` over the queries both score, and its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Percentile bootstrap interval of the mean per-query difference ``a - b``.

    ``a``, ``b``: one value per query, in the same query order (e.g. ``EvalResult.extra["ap_per_query"]["H"]``
    of two models). A query that is NaN in either (no positives under that protocol) is left out, as the
    protocol's mean leaves it out. ``draws`` resamples of the queries with a generator seeded by ``seed``,
    so the interval is reproducible.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: {a.size} values against {b.size}; pair them query by query")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    if draws < 1:
        raise ValueError(f"paired_bootstrap: draws must be positive, got {draws}")
    both = ~(np.isnan(a) | np.isnan(b))
    diff = a[both] - b[both]
    if diff.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(draws, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), int(diff.size))
