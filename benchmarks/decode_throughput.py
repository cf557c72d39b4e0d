"""Decode throughput: ``load_image`` against plain PIL on the same photo-like JPEGs.

Writes ``--n`` JPEGs (default 60, 1600x1200, quality 90) into a temporary directory, each a grid of
tiles cut from the photos scikit-image ships (astronaut, coffee, chelsea, rocket, ...), so the
files carry real photographic detail. Then, best of ``--repeats`` passes over all files:

1. ``load_image(path, max_side=512)`` against ``Image.open(path).convert("RGB").resize(...)`` to the
   same size (bilinear, PIL's antialiased filter);
2. ``load_image(path)`` against ``Image.open(path).convert("RGB")``.

Passes alternate between the two sides; rates are reported by wall clock and by CPU time.
Intra-op threads default to 1, as in a DataLoader worker, so both sides use one core.

    python benchmarks/decode_throughput.py [--n 60] [--max-side 512] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from retrieval_lightning.data.io import load_image

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "retina", "hubble_deep_field")
_SCALES = (0.8, 1.0, 1.25, 1.5)


def _photos(tile: int) -> list[np.ndarray]:
    """Photos shipped inside scikit-image (no download), each at a few scales, at least tile px."""
    out = []
    for name in _PHOTOS:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        img = np.asarray(loader())
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        for scale in _SCALES:
            size = (max(tile, int(w * scale)), max(tile, int(h * scale)))
            out.append(np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)))
    return out


def make_jpegs(folder: Path, n: int, width: int, height: int, tile: int = 400, seed: int = 0) -> list[Path]:
    """Write ``n`` JPEGs tiled from random crops (rescaled 0.8-1.5x, random flips) of real photos."""
    rng = np.random.default_rng(seed)
    photos = _photos(tile)
    paths = []
    for i in range(n):
        canvas = np.zeros((height, width, 3), np.uint8)
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                resized = photos[rng.integers(len(photos))]
                oy = rng.integers(resized.shape[0] - tile + 1)
                ox = rng.integers(resized.shape[1] - tile + 1)
                crop = resized[oy : oy + tile, ox : ox + tile]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                hh, ww = min(tile, height - y), min(tile, width - x)
                canvas[y : y + hh, x : x + ww] = crop[:hh, :ww]
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(canvas).save(path, quality=90)
        paths.append(path)
    return paths


def _target(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def pil_resized(path: Path, max_side: int) -> Image.Image:
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return rgb.resize(_target(*rgb.size, max_side), Image.BILINEAR)


def pil_full(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _one_pass(fn: Callable[[Path], object], paths: list[Path]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        fn(path)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(
    ours: Callable[[Path], object], theirs: Callable[[Path], object], paths: list[Path], repeats: int
) -> dict[str, tuple[float, float]]:
    """Images/s (wall clock, CPU time) of both, best of ``repeats`` interleaved passes.

    Passes alternate between the two so that load from other processes hits both alike; CPU time
    is reported too because it is what a busy shared machine disturbs least.
    """
    best = {"ours": [float("inf")] * 2, "theirs": [float("inf")] * 2}
    _one_pass(ours, paths)
    _one_pass(theirs, paths)
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            times = _one_pass(fn, paths)
            best[name] = [min(b, t) for b, t in zip(best[name], times)]
    return {name: (len(paths) / wall, len(paths) / cpu) for name, (wall, cpu) in best.items()}


def _report(title: str, rates: dict[str, tuple[float, float]], theirs_name: str) -> None:
    (ours_wall, ours_cpu), (theirs_wall, theirs_cpu) = rates["ours"], rates["theirs"]
    print(title)
    print(f"  {'':<19} {'wall img/s':>11} {'CPU img/s':>11}")
    print(f"  {'load_image':<19} {ours_wall:11.1f} {ours_cpu:11.1f}")
    print(f"  {theirs_name:<19} {theirs_wall:11.1f} {theirs_cpu:11.1f}")
    print(f"  {'ratio':<19} {ours_wall / theirs_wall:10.2f}x {ours_cpu / theirs_cpu:10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n, args.width, args.height)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"{len(paths)} JPEGs of {args.width}x{args.height}, mean {mean_kb:.0f} KiB, torch threads {args.threads}")

        ours = partial(load_image, max_side=args.max_side)
        rates = compare(ours, partial(pil_resized, max_side=args.max_side), paths, args.repeats)
        _report(f"decode + resize to max_side={args.max_side}", rates, "PIL open+resize")
        rates = compare(load_image, pil_full, paths, args.repeats)
        _report("full-size decode", rates, "PIL open+convert")


if __name__ == "__main__":
    main()
