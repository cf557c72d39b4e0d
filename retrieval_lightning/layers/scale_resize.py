"""How the multi-scale global descriptor resizes an image to each scale.

Why a choice: published numbers come from testers that resize differently, and a descriptor is
sensitive enough to the resampling that matching a paper needs its tester's rule.

- ``antialias``: bilinear with antialiasing, sizes ``floor(side * s)`` (this framework's default).
- ``bilinear``: bilinear without antialiasing (half-pixel centres), sizes ``round(side * s)``:
  ``tf.image.resize`` in DELG's extractor.
- ``opencv``: the official CVNet tester, ``cv2.resize`` of the 8-bit image with ``fx = fy = s``:
  area averaging when shrinking (``INTER_AREA``, fractional pixel coverage), bilinear when
  enlarging (``INTER_LINEAR``), sizes ``round(side * s)``, results rounded to 8-bit levels.
  An image on 8-bit levels (as decoded, not resized before) goes through ``cv2.resize`` itself on
  the CPU: OpenCV's fixed-point bilinear differs from exact weights by one level on about 12 % of
  the pixels at 1.4142, which moved a descriptor by 1 - cos = 3e-4. Other images (resized in
  float by the datamodule) take the same kernels in float (:func:`area_matrix`,
  :func:`linear_matrix`), rounded to 8-bit levels after.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SCALE_RESIZES = ("antialias", "bilinear", "opencv")


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(round(h * s), round(w * s))``, at least 1 (Python's, TF's and OpenCV's rounding agree)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def area_matrix(n_in: int, n_out: int, span: float, device: torch.device | None = None) -> Tensor:
    """(n_out, n_in) weights of area averaging along one axis (OpenCV's ``INTER_AREA`` shrinking).

    Output pixel ``i`` covers ``[i * span, (i + 1) * span)`` of the input (``span`` = 1 / scale,
    as OpenCV maps with the requested factor, not with the ratio of the rounded sizes), clipped
    to the image; each input pixel weighs the length of its overlap divided by the clipped span.
    As OpenCV, partial overlaps of at most 1e-3 pixel are dropped without renormalising.
    """
    starts = torch.arange(n_out, dtype=torch.float64, device=device) * span
    ends = (starts + span).clamp_(max=float(n_in))
    pixel = torch.arange(n_in, dtype=torch.float64, device=device)
    overlap = (torch.minimum(ends[:, None], pixel[None] + 1) - torch.maximum(starts[:, None], pixel[None])).clamp_(min=0)
    overlap[overlap <= 1e-3] = 0.0
    return overlap / (ends - starts)[:, None]


def linear_matrix(n_in: int, n_out: int, span: float, device: torch.device | None = None) -> Tensor:
    """(n_out, n_in) weights of bilinear sampling along one axis (OpenCV's ``INTER_LINEAR``):
    output ``i`` reads input ``(i + 0.5) * span - 0.5``, clamped to the edge pixels."""
    src = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * span - 0.5
    left = src.floor()
    frac = src - left
    left_i = left.long()
    weights = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    weights.index_put_((rows, left_i.clamp(0, n_in - 1)), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, (left_i + 1).clamp(0, n_in - 1)), frac, accumulate=True)
    return weights


def separable_resize(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, h, w) through per-axis weight matrices (h, H) and (w, W)."""
    return torch.einsum("hH,bcHW,wW->bchw", rows.to(x.dtype), x, cols.to(x.dtype))


def resize_to_scale(x: Tensor, scale: float, mode: str = "antialias") -> Tensor:
    """Resize a (B, C, H, W) batch of images in [0, 1] by ``scale`` as ``mode`` says (module docstring)."""
    if mode not in SCALE_RESIZES:
        raise ValueError(f"eval_resize must be one of {SCALE_RESIZES}, got {mode!r}")
    if scale == 1.0:
        return x
    size = scaled_size(x.shape[-2], x.shape[-1], scale)
    # a side the scale would take below one pixel (a 1-px-wide image at 0.7071; `scale_factor` floors the size,
    # cv2 rounds it) keeps one pixel
    degenerate = min(x.shape[-2], x.shape[-1]) * scale < 1.0
    if mode == "antialias":
        if degenerate:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    levels = x * 255.0
    if not degenerate and x.shape[1] <= 4 and bool(((levels - levels.round()).abs() <= 1e-3).all()):
        return _cv2_resize(levels.round(), scale).to(device=x.device, dtype=x.dtype) / 255.0
    matrix = area_matrix if scale < 1.0 else linear_matrix
    rows = matrix(x.shape[-2], size[0], 1.0 / scale, x.device)
    cols = matrix(x.shape[-1], size[1], 1.0 / scale, x.device)
    # half up, as OpenCV; the 1e-4 keeps exact ties (a 2x2 mean ending in .5) from flipping on float error
    return torch.floor(separable_resize(x, rows, cols).clamp(0.0, 1.0) * 255.0 + (0.5 + 1e-4)) / 255.0


def _cv2_resize(levels: Tensor, scale: float) -> Tensor:
    """``cv2.resize(uint8 image, fx=fy=scale)`` per image of a (B, C, H, W) batch of 8-bit levels."""
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    images = levels.to(device="cpu", dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
    out = [cv2.resize(np.ascontiguousarray(image), (0, 0), fx=scale, fy=scale, interpolation=interpolation)
           for image in images]
    out = [o[..., None] if o.ndim == 2 else o for o in out]  # one channel comes back without its axis
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
