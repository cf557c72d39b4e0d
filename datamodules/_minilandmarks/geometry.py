"""View geometry of minilandmarks: homographies, their Jacobians and the seeded sampling of crops.

Why separate: the labelling rule and the renderer both need the same projective maths, and the
per-tier distortion ranges (:data:`TIERS`) are the knobs that decide how hard a view is.
Coordinates are continuous pixel coordinates with the origin at the top-left corner of the
top-left pixel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_GRID = 40


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography (h33 = 1) mapping four ``src`` points onto four ``dst`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def project(hom: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 2) points; returns (N, 2) points and the homogeneous w."""
    p = pts @ hom[:, :2].T + hom[:, 2]
    w = p[:, 2]
    return p[:, :2] / np.where(np.abs(w) > 1e-12, w, 1e-12)[:, None], w


def jacobian(hom: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2, 2) Jacobian of the homography at source points ``pts``."""
    uv, w = project(hom, pts)
    jac = np.empty((len(pts), 2, 2))
    for r in range(2):
        for c in range(2):
            jac[:, r, c] = (hom[r, c] - uv[:, r] * hom[2, c]) / w
    return jac


def local_scale(hom: np.ndarray, pt: np.ndarray) -> float:
    """Area scale factor ``sqrt|det J|`` of the homography at one source point."""
    return float(math.sqrt(abs(np.linalg.det(jacobian(hom, np.asarray(pt, dtype=np.float64)[None])[0]))))


def source_grid(width: int, height: int) -> np.ndarray:
    """The (_GRID**2, 2) cell centres of a regular grid over a source photo (labelling samples)."""
    g = (np.arange(_GRID) + 0.5) / _GRID
    gx, gy = np.meshgrid(g * width, g * height)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


TIERS: dict[str, dict[str, Any]] = {
    # zoom: view shows min-fitting crop / zoom; rot in degrees; persp: corner jitter / crop side
    "query": dict(zoom=((0.72, 1.05),), rot=4.0, persp=(0.0, 0.04), occl=(0, 0.0), photo="mild"),
    "query_part": dict(zoom=((1.15, 1.6),), rot=6.0, persp=(0.02, 0.08), occl=(0, 0.0), photo="mild"),
    "easy": dict(zoom=((0.85, 1.3),), rot=8.0, persp=(0.0, 0.05), occl=(0, 0.0), photo="mild"),
    "medium": dict(zoom=((0.7, 1.8),), rot=15.0, persp=(0.03, 0.12), occl=(1, 0.15), photo="medium"),
    "hard": dict(zoom=((0.5, 0.68), (1.5, 2.4)), rot=35.0, persp=(0.1, 0.22), occl=(3, 0.35), photo="strong"),
    "junk": dict(zoom=((3.5, 6.0),), rot=20.0, persp=(0.0, 0.1), occl=(1, 0.2), photo="medium"),
    "occluded": dict(zoom=((0.9, 1.3),), rot=10.0, persp=(0.0, 0.08), occl=(4, 0.85), photo="medium"),
    "background": dict(zoom=((1.0, 2.5),), rot=10.0, persp=(0.0, 0.0), occl=(0, 0.0), photo="none"),
}


def view_size(rng: np.random.Generator, image_size: int, src_w: int, src_h: int) -> tuple[int, int]:
    """(width, height) of a view: long side ``image_size``, mostly the photo's orientation."""
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    landscape = (src_w >= src_h) if rng.random() < 0.75 else (src_w < src_h)
    return (image_size, short) if landscape else (short, image_size)


def sample_geometry(
    rng: np.random.Generator, tier: str, src: tuple[int, int], size: tuple[int, int],
    anchor: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample a crop quadrilateral of the source and the homography sending it onto the view."""
    spec = TIERS[tier]
    w, h = src
    vw, vh = size
    fit = min(w, h * vw / vh)
    for _ in range(20):
        if anchor is not None:
            if tier == "easy":
                zoom = anchor["zoom"] * math.exp(rng.normal(0, 0.08))
                rot = anchor["rotation_deg"] + rng.uniform(-4, 4)
            else:
                zoom = anchor["zoom"] * float(rng.choice([rng.uniform(0.5, 0.65), rng.uniform(1.5, 1.9)]))
                rot = anchor["rotation_deg"] + rng.choice([-1, 1]) * rng.uniform(20, 40)
            shift = 0.04 if tier == "easy" else 0.1
            cw = fit / zoom
            cx = anchor["centre"][0] + rng.normal(0, shift) * cw
            cy = anchor["centre"][1] + rng.normal(0, shift) * cw
        else:
            lo, hi = spec["zoom"][int(rng.integers(len(spec["zoom"])))]
            zoom = float(rng.uniform(lo, hi))
            rot = float(rng.uniform(-spec["rot"], spec["rot"]))
            cw = fit / zoom
            ch_ = cw * vh / vw
            if zoom >= 1.0:
                cx = rng.uniform(min(cw / 2, w / 2), max(w - cw / 2, w / 2))
                cy = rng.uniform(min(ch_ / 2, h / 2), max(h - ch_ / 2, h / 2))
            else:
                cx = w / 2 + rng.uniform(-0.1, 0.1) * w
                cy = h / 2 + rng.uniform(-0.1, 0.1) * h
        ch = cw * vh / vw
        persp = float(rng.uniform(*spec["persp"]))
        t = math.radians(rot)
        rotm = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        corners = np.array([[-cw, -ch], [cw, -ch], [cw, ch], [-cw, ch]]) / 2
        quad = corners @ rotm.T + [cx, cy] + rng.uniform(-1, 1, (4, 2)) * persp * min(cw, ch)
        if _convex(quad):
            break
    dst = np.array([[0, 0], [vw, 0], [vw, vh], [0, vh]], dtype=np.float64)
    hom = homography(quad, dst)
    params = {
        "tier": tier, "zoom": float(zoom), "rotation_deg": float(rot), "perspective": persp,
        "centre": [float(cx), float(cy)], "quad": quad.tolist(),
    }
    return hom, params


def _convex(quad: np.ndarray) -> bool:
    edges = np.roll(quad, -1, axis=0) - quad
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    return bool(np.all(cross > 1e-6) or np.all(cross < -1e-6))
