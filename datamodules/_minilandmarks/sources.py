"""Source photos of minilandmarks: find them, hash them, drop duplicates and group them into scenes.

Why separate: which photos a build uses (and their scenes) fixes the dataset's hash, so this must
stay deterministic and readable on its own. The rules are in the docstring of
:mod:`datamodules.minilandmarks_build` (section "Sources").
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)
SKIMAGE_TEXTURES = frozenset({"brick", "grass", "gravel"})


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
        counts = count_items(stems.values())
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
    counts = count_items(keys.values())
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


def count_items(items: Iterable[Any]) -> dict[Any, int]:
    """How often each item occurs (a dict, in order of first occurrence)."""
    counts: dict[Any, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
