"""Image transforms shared by the built-in datamodules (their loaders: :mod:`retrieval_lightning.data.loaders`).

Training follows the DELG recipe (``_ImageNetCrop`` in tensorflow/models ``research/delf``
``googlelandmarks.py``): a random box as TF's ``sample_distorted_bounding_box`` draws it
(aspect ratio 3/4-4/3 drawn uniformly, area 8-100 % of the image, the box covering at least
10 % of the image, 100 attempts, else the whole image), resized to a square with area
interpolation; no flip, no colour jitter.

Evaluation follows DELG's ``ResizeImage``: the long side is capped at ``max_side`` (never
enlarged unless ``upscale``), new size ``round(side * factor)``, bilinear with antialiasing as
PIL's resize does. A query is first cropped to its box with PIL's ``crop`` semantics
(coordinates rounded half-to-even) and then resized by the factor the full image would get, so
crop and database share one scale. The box is applied in the stored pixel frame (the revisitop
reference loaders ignore EXIF orientation, so the ground truth was drawn there); the crop is
then turned upright like every database image. A box reaching outside the image is an error, but
for an edge rounded up to at most one pixel past it, which is cut there (:data:`BOX_EDGE_SLACK`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from retrieval_lightning.data.io import (
    LoadPolicy,
    apply_orientation,
    exif_orientation,
    load_image_or_skip,
    resize_by,
    to_float,
)
from retrieval_lightning.data.types import ImageResize


def datamodule_policy(on_error: str) -> LoadPolicy:
    """A datamodule's image-load policy; its errors say which option switches to skipping."""
    return LoadPolicy(on_error=on_error, hint="--data.init_args.on_error=skip skips unreadable images, logging each")


def _to_float(image: Tensor) -> Tensor:
    """uint8 (3,H,W) -> float32 in [0, 1]; float input is returned as float32."""
    if image.dtype == torch.uint8:
        return to_float(image)
    return image.float()


def sample_crop_box(
    height: int,
    width: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw a crop ``(top, left, h, w)`` the way TF's ``sample_distorted_bounding_box`` does.

    Each attempt draws an aspect ratio (w/h) uniformly, then an integer height uniformly
    between the heights giving the smallest and largest allowed area; the box is kept when it
    fits and its area fraction lies in ``area_range`` and is at least ``min_object_covered``
    (the whole image is the only object). After ``max_attempts`` misses the whole image is used.
    """
    total = float(height * width)
    lo_area = max(area_range[0], min_object_covered) * total
    hi_area = area_range[1] * total
    for _ in range(max_attempts):
        u = torch.rand((), generator=generator).item()
        aspect = aspect_range[0] + u * (aspect_range[1] - aspect_range[0])
        min_h = int(round(math.sqrt(lo_area / aspect)))
        max_h = int(round(math.sqrt(hi_area / aspect)))
        max_h = min(max_h, height, int((width + 0.5 - 1e-7) / aspect))
        if max_h < 1 or min_h > max_h:
            continue
        h = min_h + int(torch.randint(max_h - min_h + 1, (), generator=generator).item())
        w = int(round(h * aspect))
        area = h * w
        if w < 1 or w > width or h > height or area < lo_area or area > hi_area:
            continue
        top = int(torch.randint(height - h + 1, (), generator=generator).item())
        left = int(torch.randint(width - w + 1, (), generator=generator).item())
        return top, left, h, w
    return 0, 0, height, width


class TrainTransform:
    """DELG training augmentation: random box (see :func:`sample_crop_box`) -> square ``image_size``.

    Takes a uint8 or float (3,H,W) tensor and returns float32 (3, image_size, image_size) in [0, 1].
    ``interpolation`` is ``"area"`` (DELG; box averaging) or ``"bilinear"`` (antialiased).
    """

    def __init__(
        self,
        image_size: int = 512,
        area_range: tuple[float, float] = (0.08, 1.0),
        aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
        min_object_covered: float = 0.1,
        interpolation: str = "area",
    ) -> None:
        if interpolation not in ("area", "bilinear"):
            raise ValueError(f"interpolation must be 'area' or 'bilinear', got {interpolation!r}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if not 0.0 < area_range[0] <= area_range[1] <= 1.0:  # above 1 no box fits: the whole image every time
            raise ValueError(f"the crop's area fractions (crop_area_min, max) must satisfy 0 < min <= max <= 1, "
                             f"got {tuple(area_range)}")
        if not 0.0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"the crop's aspect range must satisfy 0 < min <= max, got {tuple(aspect_range)}")
        self.image_size = int(image_size)
        self.area_range = (float(area_range[0]), float(area_range[1]))
        self.aspect_range = (float(aspect_range[0]), float(aspect_range[1]))
        self.min_object_covered = float(min_object_covered)
        self.interpolation = interpolation

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _, height, width = image.shape
        top, left, h, w = sample_crop_box(
            height, width, self.area_range, self.aspect_range, self.min_object_covered,
            generator=generator,
        )
        crop = _to_float(image[:, top : top + h, left : left + w])
        size = [self.image_size, self.image_size]
        if self.interpolation == "area":
            out = F.interpolate(crop[None], size=size, mode="area")[0]
        else:
            out = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False,
                                antialias=True)[0]
        return out.clamp_(0.0, 1.0)


BOX_ROUNDINGS = ("round", "truncate")
BOX_FRAMES = ("stored", "upright")  # the pixels a query box is drawn on: as stored, or turned upright per EXIF


def box_pixels(box: Sequence[float], rounding: str = "round") -> tuple[int, int, int, int]:
    """Integer ``(x1, y1, x2, y2)`` of a query box: ``round`` as ``PIL.Image.crop`` (half to even;
    the revisitop reference and DELG), ``truncate`` as ``int()`` (the official CVNet tester)."""
    if rounding not in BOX_ROUNDINGS:
        raise ValueError(f"box rounding must be one of {BOX_ROUNDINGS}, got {rounding!r}")
    if len(box) != 4:
        raise ValueError(f"crop box must have 4 numbers (x1, y1, x2, y2), got {list(box)!r}")
    to_int = (lambda v: int(round(float(v)))) if rounding == "round" else (lambda v: int(float(v)))
    x0, y0, x1, y1 = (to_int(v) for v in box)
    return x0, y0, x1, y1


#: pixels a query box may reach past the image's edge (an edge drawn on the last pixel and rounded up): they
#: are cut off, not zero-filled; the revisitop MATLAB reference clamps the far edges alike (``crop_qim.m``)
BOX_EDGE_SLACK = 1


def check_box(box: Sequence[float], height: int, width: int, rounding: str = "round") -> tuple[int, int, int, int]:
    """The query box made integer (:func:`box_pixels`), within the image; refused when it is empty or
    leaves the image by more than :data:`BOX_EDGE_SLACK` pixels (a box of another image, or in another
    frame, rather than a rounded edge)."""
    x0, y0, x1, y1 = box_pixels(box, rounding)
    inside = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    beyond = max(-x0, -y0, x1 - width, y1 - height)  # pixels past the farthest edge
    if beyond > BOX_EDGE_SLACK or inside[0] >= inside[2] or inside[1] >= inside[3]:
        raise ValueError(f"query box {list(box)!r} (as pixels {[x0, y0, x1, y1]}) is empty or lies outside "
                         f"the {width}x{height} image")
    return inside


class EvalTransform:
    """Evaluation resize: long side capped at ``max_side`` (DELG default 1024), aspect kept.

    ``__call__(image, box=None)`` takes a uint8 (3,H,W) full image; with ``box`` the image is
    cropped first (:func:`check_box`, its coordinates made integer by ``box_rounding``) and scaled
    by the factor of the full image. Returns float32 (3,h,w) in [0, 1].
    """

    def __init__(self, max_side: int | None = 1024, upscale: bool = False, box_rounding: str = "round") -> None:
        if box_rounding not in BOX_ROUNDINGS:
            raise ValueError(f"box_rounding must be one of {BOX_ROUNDINGS}, got {box_rounding!r}")
        self.resize = ImageResize(max_side, upscale)  # recorded with extracted features, for `search`
        self.box_rounding = box_rounding

    @property
    def max_side(self) -> int | None:
        return self.resize.max_side

    @property
    def upscale(self) -> bool:
        return self.resize.upscale

    def __call__(self, image: Tensor, box: Sequence[float] | None = None) -> Tensor:
        _, height, width = image.shape
        factor = self.resize.factor(height, width)
        if box is not None:
            x0, y0, x1, y1 = check_box(box, height, width, self.box_rounding)
            image = image[:, y0:y1, x0:x1]
        return _to_float(resize_by(image, factor)).clamp_(0.0, 1.0)


class EvalImageDataset(Dataset):
    """Eval images in EvalSet order: ``{"image": float (3,h,w) in [0, 1], "index": int}``.

    ``boxes[i]`` (optional, one per leading item) crops item ``i`` as a query. ``box_frame``
    ``stored`` (default) applies the box to the stored pixels and then turns the crop upright per
    EXIF (the revisitop reference loaders ignore EXIF orientation, so the ground truth was drawn
    there); ``upright`` turns the image upright first and crops that, as ``cv2.imread`` (which applies
    EXIF orientation) does in the official CVNet tester. They differ only for EXIF-rotated queries. With
    ``fast_decode`` a whole image is shrunk while it is decoded (``load_image(max_side=...)``,
    reduced-DCT JPEG decoding): the same factor, but a side ending in exactly .5 rounds up
    there rather than half-to-even as DELG does, so keep it off where exactness matters more
    than decoding time. With a skip policy an unreadable image becomes a black
    ``placeholder_size`` square, so every index keeps its place in the ground truth; the policy
    counts and logs it.
    """

    def __init__(self, paths: Sequence[str], transform: EvalTransform, policy: LoadPolicy,
                 boxes: Sequence[Sequence[float]] | None = None, placeholder_size: int = 64,
                 fast_decode: bool = False, box_frame: str = "stored") -> None:
        if box_frame not in BOX_FRAMES:
            raise ValueError(f"box_frame must be one of {BOX_FRAMES}, got {box_frame!r}")
        self.box_frame = box_frame
        self.paths = paths
        self.boxes = list(boxes) if boxes is not None else []
        if len(self.boxes) > len(self.paths):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.paths)} images")
        self.transform, self.policy, self.placeholder_size = transform, policy, placeholder_size
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        box = self.boxes[index] if index < len(self.boxes) else None
        whole = box is None and not self.transform.upscale
        cap = self.transform.max_side if self.fast_decode and whole else None
        path = self.paths[index]
        upright_first = box is None or self.box_frame == "upright"
        loaded = load_image_or_skip(path, self.policy, max_side=cap, orient=upright_first, sized=True)
        image, original = loaded if loaded is not None else (None, None)
        if image is None:
            side = self.placeholder_size
            return {"image": torch.zeros(3, side, side), "index": index, "unreadable": True,
                    "resize_factor": (1.0, 1.0)}
        if box is None:
            out = self.transform(image)  # the factor is of the file's own size, also when decoded shrunk
            return {"image": out, "index": index,
                    "resize_factor": (out.shape[1] / original[0], out.shape[2] / original[1])}
        try:
            crop = self.transform(image, box)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not upright_first:
            crop = apply_orientation(crop, exif_orientation(path)).contiguous()
        factor = self.transform.resize.factor(*image.shape[1:])  # a crop is scaled by its whole image's factor
        return {"image": crop, "index": index, "resize_factor": (factor, factor)}
