"""DELG multi-scale local-feature extraction: pyramid, attention selection, keypoints, packing.

Kept apart from the head's training code: these are the inference-only steps between the
backbone's conv4 maps and the stored entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from heads._delg.receptive_field import CellCentres
from retrieval_lightning.layers.scale_resize import scaled_size

#: DELG's 7-scale image pyramid (REFERENCE.md §1), written as its released config writes it
#: (r50delg_gldv2clean_config.pbtxt). Rounded to 4 digits (0.3536), round(side * scale) would
#: differ by a pixel for 1 side in 40.
PAPER_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)


@dataclass
class ScaleFeatures:
    """One pyramid level's cells: keypoints in original-image pixels, attention, raw descriptors."""

    keypoints: Tensor  # (n, 2) float32 x, y
    attention: Tensor  # (n,)
    descriptors: Tensor  # (n, d) not yet normalised
    scale: float


def usable_scales(height: int, width: int, scales: tuple[float, ...], min_side: int) -> list[float]:
    """Scales whose resized image keeps its short side >= ``min_side`` (else the largest one)."""
    kept = [s for s in scales if min(scaled_size(height, width, s)) >= min_side]
    return kept or [max(scales)]


#: how a pyramid level is resized: ``antialias`` averages when shrinking (as an area resize would);
#: ``bilinear`` samples without a low-pass, as DELG's extractor (``tf.image.resize``, half-pixel centres)
PYRAMID_RESIZES = ("antialias", "bilinear")


def resize(image: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """(3, H, W) -> (1, 3, h, w), bilinear; with ``antialias`` low-passed when shrinking."""
    x = image[None].float()
    if tuple(x.shape[-2:]) == size:
        return x
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out.clamp_(0.0, 1.0)


def cell_keypoints(
    centres: CellCentres, map_size: tuple[int, int], resized: tuple[int, int], original: tuple[int, int]
) -> Tensor:
    """(h*w, 2) x, y of every cell's receptive-field centre in ORIGINAL-image pixels.

    Pixel-index coordinates (pixel (0, 0)'s centre is (0, 0), as OpenCV). A pixel ``u`` of the
    image resized from ``H`` to ``h`` rows has its centre at ``(u + 0.5) * H / h - 0.5`` in the
    original (the half-pixel convention of ``align_corners=False``); centres are clipped to the
    image (a border cell's receptive field may extend into the padding). The official DELG divides the
    centre by the scale instead (``32 y / s``): 0.5 / s - 0.5 pixels apart, at most 1.5 (scale 0.25),
    against RANSAC's 20-pixel threshold.
    """
    ys, xs = centres.centres(*map_size)
    (rh, rw), (oh, ow) = resized, original
    ys = ((ys + 0.5) * (oh / rh) - 0.5).clamp(0, oh - 1)
    xs = ((xs + 0.5) * (ow / rw) - 0.5).clamp(0, ow - 1)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1).float()


def select(levels: list[ScaleFeatures], threshold: float | None, top_n: int | None) -> dict[str, Tensor]:
    """Cells of all scales with attention >= ``threshold``, the ``top_n`` strongest, L2-normalised."""
    keypoints = torch.cat([lv.keypoints for lv in levels])
    attention = torch.cat([lv.attention for lv in levels]).float()
    descriptors = torch.cat([lv.descriptors for lv in levels]).float()
    scales = torch.cat([torch.full((len(lv.attention),), lv.scale) for lv in levels])
    keep = torch.ones_like(attention, dtype=torch.bool) if threshold is None else attention >= threshold
    order = torch.argsort(attention.masked_fill(~keep, float("-inf")), descending=True, stable=True)
    order = order[: int(keep.sum())]
    if top_n is not None:
        order = order[:top_n]
    return {
        "keypoints": keypoints[order],
        "descriptors": F.normalize(descriptors[order], dim=-1),
        "attention": attention[order],
        "scale": scales[order],
    }


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def pack_signs(descriptors: Tensor) -> Tensor:
    """(n, d) -> (n, d/8) uint8 sign bits, most significant bit first (``numpy.packbits`` order)."""
    n, d = descriptors.shape
    if d % 8:
        raise ValueError(f"binarised descriptors need a dimension divisible by 8, got {d}")
    bits = (descriptors > 0).to(torch.int32).view(n, d // 8, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1).to(torch.uint8)
