"""The easy / hard / junk labelling rule of minilandmarks (stated in :mod:`datamodules.minilandmarks_build`).

Why separate: the rule decides the ground truth, so it reads best apart from how views are drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from datamodules._minilandmarks.geometry import jacobian

if TYPE_CHECKING:
    from datamodules._minilandmarks.plan import Plan

EASY, HARD, JUNK = "easy", "hard", "junk"


def _strong_photometric(p: dict[str, float]) -> bool:
    return abs(math.log(p["gamma"])) > 0.4 or p["contrast"] < 0.65 or p["blur_sigma"] > 1.5 or p["noise_sigma"] > 8


def view_label(query: Plan, db: Plan, grid: np.ndarray) -> str:
    """Apply the minilandmarks labelling rule to one (query, database view) pair."""
    if db.photo != query.photo:
        return HARD if db.visible.mean() >= 0.4 else JUNK
    q = query.inframe
    both = q & db.visible
    overlap = both.sum() / max(q.sum(), 1)
    if overlap < 0.25:
        return JUNK
    if overlap < 0.5 or _strong_photometric(db.params["photometric"]):
        return HARD
    q_in_d = q & db.inframe
    if (q_in_d & ~db.visible).sum() > 0.15 * max(q_in_d.sum(), 1):
        return HARD
    pts = grid[both]
    rel = jacobian(db.hom, pts) @ np.linalg.inv(jacobian(query.hom, pts))
    scales = np.sqrt(np.abs(np.linalg.det(rel)))
    med = float(np.median(scales))
    if max(med, 1 / med) > 1.5 or np.percentile(scales, 95) / np.percentile(scales, 5) > 1.3:
        return HARD
    mid = pts.mean(0, keepdims=True)
    centre = jacobian(db.hom, mid) @ np.linalg.inv(jacobian(query.hom, mid))
    sv = np.linalg.svd(centre[0], compute_uv=False)
    angle = math.degrees(math.atan2(centre[0, 1, 0] - centre[0, 0, 1], centre[0, 0, 0] + centre[0, 1, 1]))
    if sv[0] / sv[1] > 1.3 or abs(angle) > 20:
        return HARD
    return EASY
