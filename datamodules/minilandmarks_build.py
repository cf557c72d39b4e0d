"""Build ``minilandmarks``: a small, deterministic landmark-retrieval dataset made from real photos.

Why: the framework needs a default dataset that exists offline, trains in minutes on a CPU and is
written in the *official* GLDv2 and revisitop formats, so the real readers are exercised end to end.

Sources
    The real photos shipped in the scikit-image wheel (:data:`SKIMAGE_PHOTOS`; synthetic images
    such as the chessboard are left out) plus every ``.jpg/.jpeg/.png`` under each folder the user
    names, recursively. Byte-identical files are kept once (the first seen, skimage first). Photos
    are grouped into *scenes*: by the ``scene`` column of a ``MANIFEST.tsv`` that sits next to the
    folder (paths relative to the folder's parent) or inside it (paths relative to the folder);
    otherwise by a stem rule: in one directory, stems that differ only by a view suffix
    (``_left/_right``, a capital ``L/R/A/B``, one trailing digit, or exactly ``left``/``right``)
    form one scene. A scene is one landmark: all its photos go to the same split and class.

Splits (whole scenes, so train and test photos are disjoint)
    *distractor* scenes (textures first: brick, grass, gravel, or a manifest note saying
    "texture"), *test* scenes (about 60 % of the multi-photo scenes first, so real second views
    become hard positives) and *train* scenes (the rest), chosen by a seeded numpy Generator.

Views
    Every view is a homography warp of one source photo: a quadrilateral of the source (a crop
    of chosen centre, zoom, rotation and per-corner perspective jitter) is mapped onto the view
    rectangle, then background fill where the photo does not reach, occluding rectangles
    (flat colour, noise, or a patch of a distractor photo in the test split), photometric change
    (per-channel gain, brightness, contrast, gamma, saturation), Gaussian blur and noise, and JPEG
    at quality 90. The long side is ``image_size``; the short side 75-100 % of it. Coordinates are
    continuous pixel coordinates with the origin at the top-left *corner* of the top-left pixel
    (pixel centres at half-integers), the convention of PIL crops and revisitop ``bbx``. The
    recorded ``homography`` maps a source-photo point (after EXIF orientation) to the view.

Labelling rule (test database view ``d`` against query ``q`` of the same photo)
    Sample a 40x40 grid of points over the source photo. ``Q`` = points inside the query view;
    ``D`` = points inside ``d`` and not under an occluder. Overlap ``o = |Q & D| / |Q|``.

    - junk if ``o < 0.25`` (less than a quarter of the query's region is visible);
    - hard if any of: ``o < 0.5``; relative scale (median over ``Q & D`` of
      ``sqrt|det J_d J_q^-1|``, folded to >= 1) > 1.5; perspective spread (95th / 5th percentile of
      that local scale) > 1.3; anisotropy of ``J_d J_q^-1`` at the overlap centroid > 1.3;
      relative rotation > 20 degrees; more than 15 % of ``Q``'s in-frame part occluded; strong
      photometric change (``|ln gamma| > 0.4``, contrast < 0.65, blur sigma > 1.5 or noise
      sigma > 8);
    - easy otherwise.

    Views of *another* photo of the scene (a real second view) are hard when at least 40 % of
    their own photo is visible, else junk. Every query gets one view sampled near itself for an
    easy positive and one with strong zoom/rotation/perspective/occlusion for a hard positive
    (re-sampled up to 8 times until the rule agrees; a failure is listed under ``warnings`` in
    ``.complete``). Distractor views are in no list.

Queries
    Per test scene, ``queries_per_landmark`` views of its first photo (sorted by name): even ones
    show most of the photo, odd ones a zoomed part; both may show distractor-photo context around
    the photo, so ``bbx`` (the bounding box of the photo's pixels in the query) matters.

Layout under the returned directory ``<root>/minilandmarks-<hash12>/``
    ``gldv2/train.csv`` (``id,url,landmark_id``), ``gldv2/train_clean.csv``
    (``landmark_id,images``), ``gldv2/train_label_to_category.csv``, ``gldv2/train/a/b/c/<id>.jpg``;
    ``revisitop/minilandmarks/gnd_minilandmarks.pkl`` (``imlist``, ``qimlist``, ``gnd``) and
    ``revisitop/minilandmarks/jpg/<name>.jpg``; ``sources.tsv`` (name, scene, split, sha256, size
    of every photo); ``views.jsonl`` (one JSON object per image: ``name``, ``file``, ``role``
    train/query/db/distractor, ``scene``, ``source``, ``source_size``, ``size``, ``homography``,
    ``crop_box`` (source-space bounding box of the shown quadrilateral, clipped to the photo),
    ``params`` (tier, zoom, rotation, perspective, quad, occluders, photometric, background),
    ``visible_fraction``, and ``labels`` {query name: easy/hard/junk} or ``bbx``);
    ``.complete`` (JSON manifest: config, hash, counts, warnings; written last). Image names are
    16 hex digits derived from the seed and the source photo's hash; ``imlist`` and ``qimlist``
    are sorted by name, so a landmark's images are not contiguous.

Idempotence and atomicity
    ``<hash12>`` is the SHA-256 of the builder version, every build parameter and the sorted
    (name, scene, sha256 of the bytes) of each source photo. A different config therefore lands in
    a different directory; an existing directory whose ``.complete`` holds the same hash is
    returned untouched. Building happens in a hidden temporary sibling that is renamed into place,
    so concurrent builders (e.g. DDP ranks) are safe: the loser discards its copy. Outputs are
    byte-identical for the same inputs and library versions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

BUILDER_VERSION = 1
JPEG_QUALITY = 90
DATASET_NAME = "minilandmarks"
GLDV2_SUBDIR = "gldv2"
REVISITOP_SUBDIR = "revisitop"
COMPLETE_MARKER = ".complete"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)
SKIMAGE_TEXTURES = frozenset({"brick", "grass", "gravel"})
_GRID = 40
_EASY, _HARD, _JUNK = "easy", "hard", "junk"


class PhotoReadError(ValueError):
    """A source photo cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class PhotoSource:
    """One source photo: where it is, a stable name, its scene (landmark) and content hash."""

    path: Path
    name: str
    scene: str
    sha256: str
    texture: bool = False


def skimage_data_dir() -> Path:
    """The installed scikit-image wheel's data directory."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def list_source_photos(photo_dirs: Sequence[Path] = (), include_skimage: bool = True) -> list[Path]:
    """Paths of the photos a build would use, in build order (duplicates by content dropped)."""
    return [s.path for s in load_photo_sources(photo_dirs, include_skimage=include_skimage)]


def load_photo_sources(
    photo_dirs: Sequence[Path] = (), include_skimage: bool = True
) -> list[PhotoSource]:
    """Find, hash, de-duplicate and group the source photos into scenes."""
    found: list[tuple[Path, str, str, bool]] = []  # path, name, scene, texture
    if include_skimage:
        data = skimage_data_dir()
        stems = {}
        for fname in SKIMAGE_PHOTOS:
            path = data / fname
            if path.is_file():
                stems[path] = _stem_scene_key(path.stem)
        counts = _count(stems.values())
        for path, key in stems.items():
            scene = key if counts[key] > 1 else path.stem
            found.append((path, f"skimage/{path.name}", f"skimage:{scene}", scene in SKIMAGE_TEXTURES))
    labels: set[str] = {"skimage"}
    for folder in photo_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"minilandmarks: photo folder {folder} does not exist")
        label = folder.resolve().name or "photos"
        while label in labels:
            label += "~"
        labels.add(label)
        found.extend(_folder_photos(folder, label))
    sources: list[PhotoSource] = []
    seen: set[str] = set()
    for path, name, scene, texture in found:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        sources.append(PhotoSource(path, name, scene, digest, texture))
    return sources


def _folder_photos(folder: Path, label: str) -> list[tuple[Path, str, str, bool]]:
    paths = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not paths:
        raise ValueError(f"minilandmarks: photo folder {folder} holds no .jpg/.jpeg/.png file")
    manifest = _manifest_scenes(folder)
    keys = {p: (p.parent.relative_to(folder).as_posix(), _stem_scene_key(p.stem)) for p in paths}
    counts = _count(keys.values())
    out = []
    for p in paths:
        rel = p.relative_to(folder).as_posix()
        if p.resolve() in manifest:
            scene, texture = manifest[p.resolve()]
        else:
            key = keys[p]
            scene = f"{key[0]}/{key[1] if counts[key] > 1 else p.stem}"
            texture = False
        out.append((p, f"{label}/{rel}", f"{label}:{scene}", texture))
    return out


def _manifest_scenes(folder: Path) -> dict[Path, tuple[str, bool]]:
    """Scene of each photo listed in a MANIFEST.tsv next to or inside ``folder``."""
    scenes: dict[Path, tuple[str, bool]] = {}
    for manifest, base in ((folder.parent / "MANIFEST.tsv", folder.parent), (folder / "MANIFEST.tsv", folder)):
        if not manifest.is_file():
            continue
        with manifest.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or not {"scene", "path"} <= set(reader.fieldnames):
                raise ValueError(f"minilandmarks: {manifest} needs tab-separated columns 'scene' and 'path'")
            for row_no, row in enumerate(reader, start=2):
                if not row.get("scene") or not row.get("path"):
                    raise ValueError(f"minilandmarks: {manifest} row {row_no} has an empty scene or path")
                texture = "texture" in (row.get("note") or "").lower()
                scenes[(base / row["path"]).resolve()] = (row["scene"], texture)
    return scenes


_SUFFIX = re.compile(r"^(?P<base>.*[a-z].*?)(?:[_\-\s]?(?i:left|right)|(?<=[a-z])[LRAB]|(?<=[a-zA-Z])\d)$")


def _stem_scene_key(stem: str) -> str:
    """Strip a view suffix (graf1 -> graf, aloeL -> aloe, motorcycle_left -> motorcycle)."""
    if stem.lower() in ("left", "right"):
        return "left-right"
    match = _SUFFIX.match(stem)
    if match and len(match.group("base")) >= 3:
        return match.group("base").rstrip("_- ").lower()
    return stem.lower()


def _count(items: Iterable[Any]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# ----------------------------------------------------------------------------------- photos


class _Photo:
    """A decoded photo as a uint8 RGBX pyramid (2x2 box filter); level k is ``base * 2**k`` times smaller.

    Four channels so that a pixel is one uint32 and bilinear gathers are one lookup each. Photos
    whose long side exceeds ``max_side`` are first box-reduced by the integer ``base`` to bound
    memory; ``width``/``height`` stay those of the original photo, the frame of every homography.
    """

    def __init__(self, source: PhotoSource, max_side: int = 1600) -> None:
        try:
            with Image.open(source.path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
        except Exception as exc:  # PIL raises many types for broken files
            raise PhotoReadError(f"minilandmarks: cannot read photo {source.path}: {exc}") from exc
        self.width, self.height = rgb.size
        self.base = max(1, math.ceil(max(rgb.size) / max_side))
        if self.base > 1:
            rgb = rgb.reduce(self.base)
        self.levels = [np.ascontiguousarray(np.asarray(rgb.convert("RGBA"), dtype=np.uint8))]
        while min(self.levels[-1].shape[:2]) >= 64:
            a = self.levels[-1].astype(np.float32)
            a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
            a = 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])
            self.levels.append(np.rint(a).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a * 255.0 / max(a.max(), 1.0), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        back = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(back, im)
    return im.convert("RGB")


def _warp(photo: _Photo, hom: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear inverse warp of ``photo`` into a (height, width) view; returns image and inside-mask."""
    inv = np.linalg.inv(hom)
    centre = inv @ np.array([width / 2, height / 2, 1.0])
    scale = _local_scale(hom, centre[:2] / centre[2])
    level = int(np.clip(round(math.log2(1.0 / max(scale * photo.base, 1e-6))), 0, len(photo.levels) - 1))
    img = photo.levels[level]
    lh, lw = img.shape[:2]
    shrink = 1.0 / (photo.base * 2**level)
    inv = (np.diag([shrink, shrink, 1.0]) @ inv).astype(np.float32)
    u = np.arange(width, dtype=np.float32) + 0.5
    v = np.arange(height, dtype=np.float32)[:, None] + 0.5
    w = inv[2, 0] * u + inv[2, 1] * v + inv[2, 2]
    ok = w > 1e-9
    w = np.where(ok, w, np.float32(1.0))
    x = ((inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]) / w).ravel()
    y = ((inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]) / w).ravel()
    inside = ok.ravel() & (x >= 0) & (x < lw) & (y >= 0) & (y < lh)
    xi = np.clip(x - 0.5, 0, lw - 1)
    yi = np.clip(y - 0.5, 0, lh - 1)
    x0 = np.minimum(xi.astype(np.int64), max(lw - 2, 0))
    y0 = np.minimum(yi.astype(np.int64), max(lh - 2, 0))
    fx = (xi - x0)[:, None]
    fy = (yi - y0)[:, None]
    x1 = np.minimum(x0 + 1, lw - 1)
    y1 = np.minimum(y0 + 1, lh - 1)
    packed = img.reshape(-1).view(np.uint32)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return packed[yy * lw + xx].view(np.uint8).reshape(-1, 4)[:, :3].astype(np.float32)

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    out = (top * (1 - fy) + bottom * fy).reshape(height, width, 3)
    return out, inside.reshape(height, width)


# --------------------------------------------------------------------------------- geometry


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography (h33 = 1) mapping four ``src`` points onto four ``dst`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def _project(hom: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 2) points; returns (N, 2) points and the homogeneous w."""
    p = pts @ hom[:, :2].T + hom[:, 2]
    w = p[:, 2]
    return p[:, :2] / np.where(np.abs(w) > 1e-12, w, 1e-12)[:, None], w


def _jacobian(hom: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2, 2) Jacobian of the homography at source points ``pts``."""
    uv, w = _project(hom, pts)
    jac = np.empty((len(pts), 2, 2))
    for r in range(2):
        for c in range(2):
            jac[:, r, c] = (hom[r, c] - uv[:, r] * hom[2, c]) / w
    return jac


def _local_scale(hom: np.ndarray, pt: np.ndarray) -> float:
    return float(math.sqrt(abs(np.linalg.det(_jacobian(hom, np.asarray(pt, dtype=np.float64)[None])[0]))))


def _source_grid(width: int, height: int) -> np.ndarray:
    g = (np.arange(_GRID) + 0.5) / _GRID
    gx, gy = np.meshgrid(g * width, g * height)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


_TIERS: dict[str, dict[str, Any]] = {
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


@dataclass
class _Plan:
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


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(digest[:16], "big")]))


def _view_size(rng: np.random.Generator, image_size: int, src_w: int, src_h: int) -> tuple[int, int]:
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    landscape = (src_w >= src_h) if rng.random() < 0.75 else (src_w < src_h)
    return (image_size, short) if landscape else (short, image_size)


def _sample_geometry(
    rng: np.random.Generator, tier: str, src: tuple[int, int], size: tuple[int, int],
    anchor: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample a crop quadrilateral of the source and the homography sending it onto the view."""
    spec = _TIERS[tier]
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
    hom = _homography(quad, dst)
    params = {
        "tier": tier, "zoom": float(zoom), "rotation_deg": float(rot), "perspective": persp,
        "centre": [float(cx), float(cy)], "quad": quad.tolist(),
    }
    return hom, params


def _convex(quad: np.ndarray) -> bool:
    edges = np.roll(quad, -1, axis=0) - quad
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    return bool(np.all(cross > 1e-6) or np.all(cross < -1e-6))


def _sample_occluders(rng: np.random.Generator, tier: str, size: tuple[int, int]) -> list[list[float]]:
    """Axis-aligned occluder rectangles [x1, y1, x2, y2] covering about the tier's target area."""
    most, target = _TIERS[tier]["occl"]
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


def _strong_photometric(p: dict[str, float]) -> bool:
    return abs(math.log(p["gamma"])) > 0.4 or p["contrast"] < 0.65 or p["blur_sigma"] > 1.5 or p["noise_sigma"] > 8


def _plan_view(
    seed: int, key: str, role: str, tier: str, photo_idx: int, src: tuple[int, int], image_size: int,
    grid: np.ndarray, anchor: _Plan | None = None, fill: str = "field",
) -> _Plan:
    rng = _rng(seed, key)
    size = _view_size(rng, image_size, *src) if anchor is None else anchor.size
    hom, params = _sample_geometry(rng, tier, src, size, None if anchor is None else anchor.params)
    kinds = ["flat", "noise", "patch"] if fill == "photos" else ["flat", "noise"]
    params["occluders"] = [r + [str(rng.choice(kinds))] for r in _sample_occluders(rng, tier, size)]
    params["photometric"] = _sample_photometric(rng, _TIERS[tier]["photo"])
    params["background"] = fill if fill == "photos" else "field"
    uv, w = _project(hom, grid)
    inframe = (w > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])
    covered = np.zeros(len(grid), dtype=bool)
    for x1, y1, x2, y2, _ in params["occluders"]:
        covered |= (uv[:, 0] >= x1) & (uv[:, 0] < x2) & (uv[:, 1] >= y1) & (uv[:, 1] < y2)
    return _Plan(key, role, tier, photo_idx, size, hom, params, inframe, inframe & ~covered)


def _label(query: _Plan, db: _Plan, grid: np.ndarray) -> str:
    """Apply the module docstring's labelling rule to one (query, database view) pair."""
    if db.photo != query.photo:
        return _HARD if db.visible.mean() >= 0.4 else _JUNK
    q = query.inframe
    both = q & db.visible
    overlap = both.sum() / max(q.sum(), 1)
    if overlap < 0.25:
        return _JUNK
    if overlap < 0.5 or _strong_photometric(db.params["photometric"]):
        return _HARD
    q_in_d = q & db.inframe
    if (q_in_d & ~db.visible).sum() > 0.15 * max(q_in_d.sum(), 1):
        return _HARD
    pts = grid[both]
    rel = _jacobian(db.hom, pts) @ np.linalg.inv(_jacobian(query.hom, pts))
    scales = np.sqrt(np.abs(np.linalg.det(rel)))
    med = float(np.median(scales))
    if max(med, 1 / med) > 1.5 or np.percentile(scales, 95) / np.percentile(scales, 5) > 1.3:
        return _HARD
    mid = pts.mean(0, keepdims=True)
    centre = _jacobian(db.hom, mid) @ np.linalg.inv(_jacobian(query.hom, mid))
    sv = np.linalg.svd(centre[0], compute_uv=False)
    angle = math.degrees(math.atan2(centre[0, 1, 0] - centre[0, 0, 1], centre[0, 0, 0] + centre[0, 1, 1]))
    if sv[0] / sv[1] > 1.3 or abs(angle) > 20:
        return _HARD
    return _EASY


# -------------------------------------------------------------------------------- rendering


def _colour_field(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field with mild noise: background or occluder that is no photo."""
    cells = int(rng.integers(2, 7))
    low = Image.fromarray(rng.uniform(30, 225, (cells, cells, 3)).astype(np.uint8))
    field_ = np.asarray(low.resize(size, Image.BILINEAR), dtype=np.float32)
    return field_ + rng.normal(0, 6, field_.shape[:2])[..., None].astype(np.float32)


def _photo_patch(rng: np.random.Generator, photo: _Photo, size: tuple[int, int]) -> np.ndarray:
    hom, _ = _sample_geometry(rng, "background", (photo.width, photo.height), size)
    img, inside = _warp(photo, hom, *size)
    return np.where(inside[..., None], img, 128.0).astype(np.float32)


def _render(plan: _Plan, photos: list[_Photo], fillers: list[int], seed: int) -> tuple[bytes, list[float]]:
    """Draw the planned view; returns its JPEG bytes and the bounding box of the photo in it."""
    rng = _rng(seed, plan.key + "#render")
    vw, vh = plan.size
    img, inside = _warp(photos[plan.photo], plan.hom, vw, vh)
    if plan.params["background"] == "photos" and fillers:
        back = _photo_patch(rng, photos[fillers[int(rng.integers(len(fillers)))]], (vw, vh))
    else:
        back = _colour_field(rng, (vw, vh))
    img = np.where(inside[..., None], img, back)
    cols, rows = np.flatnonzero(inside.any(axis=0)), np.flatnonzero(inside.any(axis=1))
    bbx = [0.0, 0.0, float(vw), float(vh)]
    if cols.size:
        bbx = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    for x1, y1, x2, y2, kind in plan.params["occluders"]:
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        if kind == "patch" and fillers:
            patch = _photo_patch(rng, photos[fillers[int(rng.integers(len(fillers)))]], (x2 - x1, y2 - y1))
        elif kind == "noise":
            patch = _colour_field(rng, (x2 - x1, y2 - y1))
        else:
            patch = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (y2 - y1, x2 - x1, 3))
        img[y1:y2, x1:x2] = patch
    p = plan.params["photometric"]
    img = img * np.array([p["gain_r"], p["gain_g"], p["gain_b"]], dtype=np.float32) * p["brightness"]
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * p["saturation"]
    img = (img - 128.0) * p["contrast"] + 128.0
    lut = np.rint(255.0 * np.power(np.arange(256) / 255.0, p["gamma"])).astype(np.uint8)
    out = Image.fromarray(lut[np.clip(np.rint(img), 0, 255).astype(np.uint8)])
    if p["blur_sigma"] > 0:
        out = out.filter(ImageFilter.GaussianBlur(p["blur_sigma"]))
    if p["noise_sigma"] > 0:
        noisy = np.asarray(out, dtype=np.float32) + rng.normal(0, p["noise_sigma"], (vh, vw, 1)).astype(np.float32)
        out = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    return buf.getvalue(), bbx


# --------------------------------------------------------------------------------- planning


def _split_scenes(
    sources: list[PhotoSource], seed: int, n_test: int | None, n_distractor: int | None
) -> dict[str, str]:
    """Assign each scene to ``train``, ``test`` or ``distractor`` (see the module docstring)."""
    photos_per = _count(s.scene for s in sources)
    textures = {s.scene for s in sources if s.texture}
    scenes = sorted(photos_per)
    n_dis = max(1, round(0.15 * len(scenes))) if n_distractor is None else n_distractor
    n_tst = max(2, round(0.3 * len(scenes))) if n_test is None else n_test
    if n_dis < 0 or n_tst < 1 or len(scenes) - n_dis - n_tst < 2:
        raise ValueError(
            f"minilandmarks: {len(scenes)} scenes cannot hold {n_tst} test and {n_dis} distractor "
            "scenes and still leave 2 for training; add photos or lower n_test_photos"
        )
    order = [scenes[i] for i in _rng(seed, "split").permutation(len(scenes))]
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
class _Layout:
    train: list[tuple[_Plan, int]] = field(default_factory=list)  # plan, landmark id
    queries: list[_Plan] = field(default_factory=list)
    database: list[_Plan] = field(default_factory=list)
    landmarks: dict[int, str] = field(default_factory=dict)
    scene_of: dict[str, str] = field(default_factory=dict)  # plan key -> scene
    warnings: list[str] = field(default_factory=list)


def _plan_dataset(
    sources: list[PhotoSource], sizes: list[tuple[int, int]], roles: dict[str, str], cfg: dict[str, Any]
) -> _Layout:
    """Decide every view (geometry, occluders, photometry) and every label; no pixels yet."""
    seed, size = cfg["seed"], cfg["image_size"]
    grids = [_source_grid(*wh) for wh in sizes]
    by_scene: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_scene.setdefault(s.scene, []).append(i)
    out = _Layout()

    def plan(i: int, role: str, tier: str, tag: str, anchor: _Plan | None = None, fill: str = "photos") -> _Plan:
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
        db: list[_Plan] = []
        for qi, query in enumerate(queries):
            for tier in (_EASY, _HARD):
                for attempt in range(8):
                    view = plan(primary, "db", tier, f"q{qi}:{tier}:{attempt}", anchor=query)
                    if _label(query, view, grids[primary]) == tier:
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
                view.labels[query.key] = _label(query, view, grids[primary])
            got = {view.labels[query.key] for view in db}
            for need in (_EASY, _HARD):
                if need not in got:
                    out.warnings.append(f"query of scene {scene} has no {need} positive")
        out.queries.extend(queries)
        out.database.extend(db)
    for scene in sorted(s for s, r in roles.items() if r == "distractor"):
        for i in by_scene[scene]:
            for k in range(cfg["views_distractor"]):
                out.database.append(plan(i, "distractor", _DISTRACTOR_TIERS[k % len(_DISTRACTOR_TIERS)], str(k)))
    return out


def _view_id(key: str, seed: int) -> str:
    return hashlib.sha256(f"{DATASET_NAME}:{seed}:{key}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- writing


def build_minilandmarks(
    root: Path,
    photo_dirs: Sequence[Path] = (),
    *,
    seed: int = 0,
    image_size: int = 256,
    views_train: int = 10,
    views_db: int = 8,
    n_test_photos: int | None = None,
    views_distractor: int = 8,
    queries_per_landmark: int = 2,
    n_distractor_photos: int | None = None,
    include_skimage: bool = True,
    progress: bool = True,
) -> Path:
    """Build (or find) the dataset under ``root`` and return its directory.

    ``n_test_photos`` and ``n_distractor_photos`` count *scenes* (a scene may hold several
    photos); ``None`` takes about 30 % and 15 % of them. ``views_db`` is the number of database
    views of a test scene's first photo (its other photos get half as many each).
    """
    if image_size < 32 or views_train < 1 or views_db < 1 or queries_per_landmark < 1 or views_distractor < 0:
        raise ValueError(
            f"minilandmarks: need image_size >= 32 and positive view counts, got image_size={image_size}, "
            f"views_train={views_train}, views_db={views_db}, queries_per_landmark={queries_per_landmark}, "
            f"views_distractor={views_distractor}"
        )
    sources = load_photo_sources(photo_dirs, include_skimage=include_skimage)
    cfg = {
        "builder_version": BUILDER_VERSION, "seed": int(seed), "image_size": int(image_size),
        "views_train": int(views_train), "views_db": int(views_db), "n_test_photos": n_test_photos,
        "views_distractor": int(views_distractor), "queries_per_landmark": int(queries_per_landmark),
        "n_distractor_photos": n_distractor_photos, "jpeg_quality": JPEG_QUALITY,
        "sources": [[s.name, s.scene, s.sha256, s.texture] for s in sources],
    }
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    root = Path(root)
    target = root / f"{DATASET_NAME}-{digest[:12]}"
    if _is_complete(target, digest):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _build_into(tmp, sources, cfg, digest, progress)
        if target.exists() and not _is_complete(target, digest):
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target, digest):  # lost a race to another builder, or a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _is_complete(target: Path, digest: str) -> bool:
    marker = target / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("config_hash") == digest
    except (OSError, ValueError):
        return False


def _build_into(out: Path, sources: list[PhotoSource], cfg: dict[str, Any], digest: str, progress: bool) -> None:
    seed = cfg["seed"]
    photos = [_Photo(s) for s in sources]
    sizes = [(p.width, p.height) for p in photos]
    roles = _split_scenes(sources, seed, cfg["n_test_photos"], cfg["n_distractor_photos"])
    layout = _plan_dataset(sources, sizes, roles, cfg)
    fillers = [i for i, s in enumerate(sources) if roles[s.scene] == "distractor"]
    plans = [p for p, _ in layout.train] + layout.queries + layout.database
    ids = {p.key: _view_id(p.key, seed) for p in plans}
    if len(set(ids.values())) != len(ids):
        raise RuntimeError("minilandmarks: view id collision; change the seed")

    gld = out / GLDV2_SUBDIR
    rop = out / REVISITOP_SUBDIR / DATASET_NAME
    (rop / "jpg").mkdir(parents=True)
    gld.mkdir(parents=True)

    def path_of(p: _Plan) -> Path:
        vid = ids[p.key]
        if p.role == "train":
            return gld / "train" / vid[0] / vid[1] / vid[2] / f"{vid}.jpg"
        return rop / "jpg" / f"{vid}.jpg"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda p: _render(p, photos, fillers, seed), plans)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(plans), desc="minilandmarks", unit="view")
        bboxes = {}
        for p, (jpeg, bbx) in zip(plans, results):
            dest = path_of(p)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(jpeg)
            bboxes[p.key] = bbx

    _write_gldv2(gld, layout, ids, sources)
    imlist = sorted(ids[p.key] for p in layout.database)
    index = {name: i for i, name in enumerate(imlist)}
    queries = sorted(layout.queries, key=lambda q: ids[q.key])
    gnd = []
    for q in queries:
        q.bbx = bboxes[q.key]
        lists: dict[str, list[int]] = {_EASY: [], _HARD: [], _JUNK: []}
        for view in layout.database:
            label = view.labels.get(q.key)
            if label is not None:
                lists[label].append(index[ids[view.key]])
        gnd.append({"bbx": list(q.bbx), **{k: sorted(v) for k, v in lists.items()}})
    with (rop / f"gnd_{DATASET_NAME}.pkl").open("wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": [ids[q.key] for q in queries], "gnd": gnd}, fh, protocol=4)

    with (out / "sources.tsv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["name", "scene", "split", "sha256", "width", "height"])
        for s, (w, h) in zip(sources, sizes):
            writer.writerow([s.name, s.scene, roles[s.scene], s.sha256, w, h])
    with (out / "views.jsonl").open("w", encoding="utf-8") as fh:
        for p in plans:
            record = _view_record(p, ids, sources, sizes, path_of(p).relative_to(out), layout)
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    counts = {
        "train_images": len(layout.train), "train_landmarks": len(layout.landmarks),
        "queries": len(layout.queries), "database": len(layout.database),
        "distractors": sum(p.role == "distractor" for p in layout.database),
        "test_landmarks": sum(r == "test" for r in roles.values()),
        **{label: sum(len(g[label]) for g in gnd) for label in (_EASY, _HARD, _JUNK)},
    }
    manifest = {"config_hash": digest, "config": cfg, "counts": counts, "warnings": layout.warnings}
    (out / COMPLETE_MARKER).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _write_gldv2(gld: Path, layout: _Layout, ids: dict[str, str], sources: list[PhotoSource]) -> None:
    """``train.csv``, ``train_clean.csv`` and ``train_label_to_category.csv`` in the GLDv2 format."""
    members: dict[int, list[str]] = {}
    with (gld / "train.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "url", "landmark_id"])
        for p, landmark in layout.train:
            writer.writerow([ids[p.key], f"file:{sources[p.photo].name}#{p.key.rsplit(':', 1)[1]}", landmark])
            members.setdefault(landmark, []).append(ids[p.key])
    with (gld / "train_clean.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["landmark_id", "images"])
        for landmark in sorted(members):
            writer.writerow([landmark, " ".join(members[landmark])])
    with (gld / "train_label_to_category.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["landmark_id", "category"])
        for landmark, scene in sorted(layout.landmarks.items()):
            writer.writerow([landmark, f"file:{scene}"])


def _view_record(
    p: _Plan, ids: dict[str, str], sources: list[PhotoSource], sizes: list[tuple[int, int]], rel: Path, layout: _Layout
) -> dict[str, Any]:
    """One line of ``views.jsonl``: where a view came from and exactly how it was made."""
    src = sources[p.photo]
    quad = np.asarray(p.params["quad"])
    w, h = sizes[p.photo]
    lo, hi = np.maximum(quad.min(axis=0), 0.0), np.minimum(quad.max(axis=0), [w, h])
    crop = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    record = {
        "name": ids[p.key], "file": rel.as_posix(), "role": p.role,
        "split": "train" if p.role == "train" else "test", "scene": layout.scene_of[p.key],
        "source": src.name, "source_sha256": src.sha256, "source_size": [w, h], "size": list(p.size),
        "homography": (p.hom / p.hom[2, 2]).tolist(), "crop_box": _rounded(crop),
        "params": _rounded(p.params), "visible_fraction": round(float(p.visible.mean()), 6),
    }
    if p.role == "query":
        record["bbx"] = p.bbx
    if p.labels:
        record["labels"] = {ids[k]: v for k, v in p.labels.items()}
    return record


def _rounded(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value
