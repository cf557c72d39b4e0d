"""Planning of minilandmarks: scene splits and every view's geometry, occluders, photometry and labels.

Why separate: planning draws every random number that decides *what* a view shows, before any
pixel exists, so the labels can be computed (and re-sampled) cheaply. Each view has its own
generator seeded by ``(seed, sha256(key))``: the draws never depend on the order of work.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules._minilandmarks.geometry import TIERS, project, sample_geometry, source_grid, view_size
from datamodules._minilandmarks.labels import EASY, HARD, view_label
from datamodules._minilandmarks.sources import PhotoSource, count_items


@dataclass
class Plan:
    """Everything needed to render one view, decided before any pixel is touched."""

    key: str
    role: str
    tier: str
    photo: int
    size: tuple[int, int]
    hom: np.ndarray
    params: dict[str, Any]
    inframe: np.ndarray
    visible: np.ndarray
    labels: dict[str, str] = field(default_factory=dict)
    bbx: list[float] | None = None


def view_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one named draw (a view, its rendering, the split): independent of order."""
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(digest[:16], "big")]))


def _sample_occluders(rng: np.random.Generator, tier: str, size: tuple[int, int]) -> list[list[float]]:
    """Axis-aligned occluder rectangles [x1, y1, x2, y2] covering about the tier's target area."""
    most, target = TIERS[tier]["occl"]
    if most == 0 or target <= 0:
        return []
    vw, vh = size
    n = int(rng.integers(1, most + 1))
    area = rng.uniform(0.6, 1.0) * target * vw * vh / n
    rects = []
    for _ in range(n):
        aspect = math.exp(rng.uniform(-0.7, 0.7))
        rw = min(vw, math.sqrt(area * aspect))
        rh = min(vh, area / max(rw, 1.0))
        x1 = rng.uniform(0, vw - rw)
        y1 = rng.uniform(0, vh - rh)
        rects.append([round(x1), round(y1), round(x1 + rw), round(y1 + rh)])
    return [[float(v) for v in r] for r in rects if r[2] > r[0] and r[3] > r[1]]


def _sample_photometric(rng: np.random.Generator, strength: str) -> dict[str, float]:
    if strength == "none":
        return {"gain_r": 1.0, "gain_g": 1.0, "gain_b": 1.0, "brightness": 1.0, "contrast": 1.0,
                "gamma": 1.0, "saturation": 1.0, "blur_sigma": 0.0, "noise_sigma": 0.0}
    k = {"mild": 0.35, "medium": 0.7, "strong": 1.0}[strength]
    gains = np.exp(rng.uniform(-0.15, 0.15, 3) * k)
    blur = float(rng.uniform(0.4, 2.6) * k) if rng.random() < 0.5 * k else 0.0
    noise = float(rng.uniform(0, 11) * k) if rng.random() < 0.6 else 0.0
    return {
        "gain_r": float(gains[0]), "gain_g": float(gains[1]), "gain_b": float(gains[2]),
        "brightness": float(math.exp(rng.uniform(-0.45, 0.35) * k)),
        "contrast": float(math.exp(rng.uniform(-0.5, 0.25) * k)),
        "gamma": float(math.exp(rng.uniform(-0.55, 0.55) * k)),
        "saturation": float(math.exp(rng.uniform(-1.0, 0.35) * k)),
        "blur_sigma": blur, "noise_sigma": noise,
    }


def _plan_view(
    seed: int, key: str, role: str, tier: str, photo_idx: int, src: tuple[int, int], image_size: int,
    grid: np.ndarray, anchor: Plan | None = None, fill: str = "field",
) -> Plan:
    """Sample one view's size, geometry, occluders and photometry; ``anchor`` ties it to a query."""
    rng = view_rng(seed, key)
    size = view_size(rng, image_size, *src) if anchor is None else anchor.size
    hom, params = sample_geometry(rng, tier, src, size, None if anchor is None else anchor.params)
    kinds = ["flat", "noise", "patch"] if fill == "photos" else ["flat", "noise"]
    params["occluders"] = [r + [str(rng.choice(kinds))] for r in _sample_occluders(rng, tier, size)]
    params["photometric"] = _sample_photometric(rng, TIERS[tier]["photo"])
    params["background"] = fill if fill == "photos" else "field"
    uv, w = project(hom, grid)
    inframe = (w > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])
    covered = np.zeros(len(grid), dtype=bool)
    for x1, y1, x2, y2, _ in params["occluders"]:
        covered |= (uv[:, 0] >= x1) & (uv[:, 0] < x2) & (uv[:, 1] >= y1) & (uv[:, 1] < y2)
    return Plan(key, role, tier, photo_idx, size, hom, params, inframe, inframe & ~covered)


def split_scenes(
    sources: list[PhotoSource], seed: int, n_test: int | None, n_distractor: int | None
) -> dict[str, str]:
    """Assign each scene to ``train``, ``test`` or ``distractor`` ("Splits" in the builder docstring)."""
    photos_per = count_items(s.scene for s in sources)
    textures = {s.scene for s in sources if s.texture}
    scenes = sorted(photos_per)
    n_dis = max(1, round(0.15 * len(scenes))) if n_distractor is None else n_distractor
    n_tst = max(2, round(0.3 * len(scenes))) if n_test is None else n_test
    if n_dis < 0 or n_tst < 1 or len(scenes) - n_dis - n_tst < 2:
        raise ValueError(
            f"minilandmarks: {len(scenes)} scenes cannot hold {n_tst} test and {n_dis} distractor "
            "scenes and still leave 2 for training; add photos or lower n_test_photos"
        )
    order = [scenes[i] for i in view_rng(seed, "split").permutation(len(scenes))]
    roles: dict[str, str] = {}
    for scene in [s for s in order if s in textures] + [s for s in order if photos_per[s] == 1]:
        if sum(r == "distractor" for r in roles.values()) < n_dis and scene not in roles:
            roles[scene] = "distractor"
    multi = [s for s in order if photos_per[s] > 1 and s not in roles]
    n_multi = min(n_tst, math.ceil(0.6 * len(multi)))
    for scene in multi[:n_multi] + [s for s in order if s not in roles and photos_per[s] == 1] + multi[n_multi:]:
        if sum(r == "test" for r in roles.values()) < n_tst and scene not in roles:
            roles[scene] = "test"
    for scene in order:
        roles.setdefault(scene, "train")
    return roles


_TRAIN_TIERS = ("easy", "medium", "medium", "hard", "easy", "medium", "hard", "medium")
_EXTRA_DB_TIERS = ("junk", "occluded", "hard", "medium", "easy", "hard", "junk", "medium")
_OTHER_DB_TIERS = ("easy", "medium", "hard", "medium")
_DISTRACTOR_TIERS = ("easy", "medium", "hard", "junk", "medium", "easy")


@dataclass
class Layout:
    """The whole dataset as planned: train views with landmark ids, queries, database, warnings."""

    train: list[tuple[Plan, int]] = field(default_factory=list)  # plan, landmark id
    queries: list[Plan] = field(default_factory=list)
    database: list[Plan] = field(default_factory=list)
    landmarks: dict[int, str] = field(default_factory=dict)
    scene_of: dict[str, str] = field(default_factory=dict)  # plan key -> scene
    warnings: list[str] = field(default_factory=list)


def plan_dataset(
    sources: list[PhotoSource], sizes: list[tuple[int, int]], roles: dict[str, str], cfg: dict[str, Any]
) -> Layout:
    """Decide every view (geometry, occluders, photometry) and every label; no pixels yet."""
    seed, size = cfg["seed"], cfg["image_size"]
    grids = [source_grid(*wh) for wh in sizes]
    by_scene: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_scene.setdefault(s.scene, []).append(i)
    out = Layout()

    def plan(i: int, role: str, tier: str, tag: str, anchor: Plan | None = None, fill: str = "photos") -> Plan:
        key = f"{sources[i].sha256}:{role}:{tag}"
        p = _plan_view(seed, key, role, tier, i, sizes[i], size, grids[i], anchor, fill)
        out.scene_of[key] = sources[i].scene
        return p

    for landmark, scene in enumerate(sorted(s for s, r in roles.items() if r == "train")):
        out.landmarks[landmark] = scene
        for i in by_scene[scene]:
            for k in range(cfg["views_train"]):
                tier = _TRAIN_TIERS[k % len(_TRAIN_TIERS)]
                out.train.append((plan(i, "train", tier, str(k), fill="field"), landmark))
    for scene in sorted(s for s, r in roles.items() if r == "test"):
        primary, *others = by_scene[scene]
        queries = [
            plan(primary, "query", "query" if k % 2 == 0 else "query_part", str(k))
            for k in range(cfg["queries_per_landmark"])
        ]
        db: list[Plan] = []
        for qi, query in enumerate(queries):
            for tier in (EASY, HARD):
                for attempt in range(8):
                    view = plan(primary, "db", tier, f"q{qi}:{tier}:{attempt}", anchor=query)
                    if view_label(query, view, grids[primary]) == tier:
                        break
                db.append(view)
        for k in range(max(0, cfg["views_db"] - len(db))):
            db.append(plan(primary, "db", _EXTRA_DB_TIERS[k % len(_EXTRA_DB_TIERS)], f"extra{k}"))
        for i in others:
            for k in range(max(1, cfg["views_db"] // 2)):
                db.append(plan(i, "db", _OTHER_DB_TIERS[k % len(_OTHER_DB_TIERS)], f"other{k}"))
        for query in queries:
            query.labels = {}
            for view in db:
                view.labels[query.key] = view_label(query, view, grids[primary])
            got = {view.labels[query.key] for view in db}
            for need in (EASY, HARD):
                if need not in got:
                    out.warnings.append(f"query of scene {scene} has no {need} positive")
        out.queries.extend(queries)
        out.database.extend(db)
    for scene in sorted(s for s, r in roles.items() if r == "distractor"):
        for i in by_scene[scene]:
            for k in range(cfg["views_distractor"]):
                out.database.append(plan(i, "distractor", _DISTRACTOR_TIERS[k % len(_DISTRACTOR_TIERS)], str(k)))
    return out
