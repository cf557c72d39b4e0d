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
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datamodules._minilandmarks.geometry import homography
from datamodules._minilandmarks.labels import EASY, HARD, JUNK
from datamodules._minilandmarks.plan import Layout, Plan, plan_dataset, split_scenes
from datamodules._minilandmarks.render import JPEG_QUALITY, Photo, render_view, warp_photo
from datamodules._minilandmarks.sources import (
    IMAGE_EXTENSIONS,
    SKIMAGE_PHOTOS,
    SKIMAGE_TEXTURES,
    PhotoReadError,
    PhotoSource,
    load_photo_sources,
    skimage_data_dir,
)

__all__ = [
    "BUILDER_VERSION",
    "COMPLETE_MARKER",
    "DATASET_NAME",
    "GLDV2_SUBDIR",
    "IMAGE_EXTENSIONS",
    "JPEG_QUALITY",
    "REVISITOP_SUBDIR",
    "SKIMAGE_PHOTOS",
    "SKIMAGE_TEXTURES",
    "PhotoReadError",
    "PhotoSource",
    "build_minilandmarks",
    "list_source_photos",
    "load_photo_sources",
    "skimage_data_dir",
]

BUILDER_VERSION = 1
DATASET_NAME = "minilandmarks"
GLDV2_SUBDIR = "gldv2"
REVISITOP_SUBDIR = "revisitop"
COMPLETE_MARKER = ".complete"

# The private names these helpers had when they lived here; tests reach them through this module.
_Photo, _warp, _homography = Photo, warp_photo, homography


def list_source_photos(photo_dirs: Sequence[Path] = (), include_skimage: bool = True) -> list[Path]:
    """Paths of the photos a build would use, in build order (duplicates by content dropped)."""
    return [s.path for s in load_photo_sources(photo_dirs, include_skimage=include_skimage)]


def _view_id(key: str, seed: int) -> str:
    return hashlib.sha256(f"{DATASET_NAME}:{seed}:{key}".encode()).hexdigest()[:16]


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
        # mkdtemp's 0700 would make a cache shared through RETRIEVAL_LIGHTNING_CACHE unreadable to others
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if target.exists() and not _is_complete(target, digest):
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=root))
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:  # another builder moved it aside first
                pass
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
    photos = [Photo(s) for s in sources]
    sizes = [(p.width, p.height) for p in photos]
    roles = split_scenes(sources, seed, cfg["n_test_photos"], cfg["n_distractor_photos"])
    layout = plan_dataset(sources, sizes, roles, cfg)
    fillers = [i for i, s in enumerate(sources) if roles[s.scene] == "distractor"]
    plans = [p for p, _ in layout.train] + layout.queries + layout.database
    ids = {p.key: _view_id(p.key, seed) for p in plans}
    if len(set(ids.values())) != len(ids):
        raise RuntimeError("minilandmarks: view id collision; change the seed")

    gld = out / GLDV2_SUBDIR
    rop = out / REVISITOP_SUBDIR / DATASET_NAME
    (rop / "jpg").mkdir(parents=True)
    gld.mkdir(parents=True)

    def path_of(p: Plan) -> Path:
        vid = ids[p.key]
        if p.role == "train":
            return gld / "train" / vid[0] / vid[1] / vid[2] / f"{vid}.jpg"
        return rop / "jpg" / f"{vid}.jpg"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda p: render_view(p, photos, fillers, seed), plans)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(plans), desc="minilandmarks", unit="view")
        bboxes = {}
        for (jpeg, bbx), p in zip(results, plans):  # the bar first: zip stopping on `plans` left it at N - 1
            dest = path_of(p)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(jpeg)
            bboxes[p.key] = bbx
        if progress:
            results.close()

    _write_gldv2(gld, layout, ids, sources)
    imlist = sorted(ids[p.key] for p in layout.database)
    index = {name: i for i, name in enumerate(imlist)}
    queries = sorted(layout.queries, key=lambda q: ids[q.key])
    gnd = []
    for q in queries:
        q.bbx = bboxes[q.key]
        lists: dict[str, list[int]] = {EASY: [], HARD: [], JUNK: []}
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
        **{label: sum(len(g[label]) for g in gnd) for label in (EASY, HARD, JUNK)},
    }
    manifest = {"config_hash": digest, "config": cfg, "counts": counts, "warnings": layout.warnings}
    (out / COMPLETE_MARKER).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _write_gldv2(gld: Path, layout: Layout, ids: dict[str, str], sources: list[PhotoSource]) -> None:
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
    p: Plan, ids: dict[str, str], sources: list[PhotoSource], sizes: list[tuple[int, int]], rel: Path, layout: Layout
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
