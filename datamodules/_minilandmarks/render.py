"""Pixels of minilandmarks: decode photos, warp them into views, add background, occluders, photometry.

Why separate: rendering is the slow, pixel-level half of a build; it only executes a plan and
draws its own randomness from a generator keyed by the view (``<key>#render``).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from datamodules._minilandmarks.geometry import local_scale, sample_geometry
from datamodules._minilandmarks.plan import Plan, view_rng
from datamodules._minilandmarks.sources import PhotoReadError, PhotoSource

JPEG_QUALITY = 90


class Photo:
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
    """8-bit RGB of any PIL mode: 16-bit stretched to 0..255, transparency over mid grey."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a * 255.0 / max(a.max(), 1.0), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        back = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(back, im)
    return im.convert("RGB")


def warp_photo(photo: Photo, hom: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear inverse warp of ``photo`` into a (height, width) view; returns image and inside-mask."""
    inv = np.linalg.inv(hom)
    centre = inv @ np.array([width / 2, height / 2, 1.0])
    scale = local_scale(hom, centre[:2] / centre[2])
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


def _colour_field(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field with mild noise: background or occluder that is no photo."""
    cells = int(rng.integers(2, 7))
    low = Image.fromarray(rng.uniform(30, 225, (cells, cells, 3)).astype(np.uint8))
    field_ = np.asarray(low.resize(size, Image.BILINEAR), dtype=np.float32)
    return field_ + rng.normal(0, 6, field_.shape[:2])[..., None].astype(np.float32)


def _photo_patch(rng: np.random.Generator, photo: Photo, size: tuple[int, int]) -> np.ndarray:
    """A random warped crop of ``photo`` (grey where it does not reach): a distractor-photo patch."""
    hom, _ = sample_geometry(rng, "background", (photo.width, photo.height), size)
    img, inside = warp_photo(photo, hom, *size)
    return np.where(inside[..., None], img, 128.0).astype(np.float32)


def render_view(plan: Plan, photos: list[Photo], fillers: list[int], seed: int) -> tuple[bytes, list[float]]:
    """Draw the planned view; returns its JPEG bytes and the bounding box of the photo in it."""
    rng = view_rng(seed, plan.key + "#render")
    vw, vh = plan.size
    img, inside = warp_photo(photos[plan.photo], plan.hom, vw, vh)
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
