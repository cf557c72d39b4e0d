"""One image handed to the Python API (``embed_image``, ``rerank_entries``, ``rerank_scores``, ``explain_pair``)
as the model takes it: a float (C, H, W) tensor in [0, 1] with 1 or 3 channels.

Images come from many readers: torchvision's ``read_image`` gives uint8 in [0, 255], PIL conversions give
greyscale or RGBA. A uint8 image read as a float one was normalised with the mean and std cast to uint8 (zeros:
NaN descriptors) or scored as if 255 times brighter, silently; here it is scaled, and what cannot be an image is
refused naming what it is."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from retrieval_lightning.data.io import to_float


#: how far outside [0, 1] a float image may reach (a bicubic resize overshoots a little); beyond it is another scale
VALUE_SLACK = 0.25


def api_image(image: Any, what: str = "image") -> Tensor:
    """``image`` as a float32 (C, H, W) tensor in [0, 1], C 1 (greyscale, broadcast) or 3 (RGB); uint8 is
    scaled by 1/255, a 2-D (H, W) tensor is greyscale. Anything else is a ``ValueError`` naming ``what``: an empty
    image, NaN or Inf, values of another scale (``read_image(p).float()`` in [0, 255] gave descriptors 0.85 from the
    right ones and 24 inliers where the image matches itself with 415, silently)."""
    if not isinstance(image, Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor (C, H, W), got {type(image).__name__}")
    if image.dtype == torch.uint8:
        image = to_float(image)
    elif not image.is_floating_point():
        raise ValueError(f"{what}: dtype {image.dtype} is not an image type: give float in [0, 1] or uint8 in "
                         "[0, 255]")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        hint = (" (a batch: pass its images one by one, or as a list; embed_batch takes several)"
                if image.dim() == 4 else "")
        raise ValueError(f"{what}: expected one (C, H, W) image, got shape {tuple(image.shape)}{hint}")
    channels = image.shape[0]
    if channels not in (1, 3):
        hint = " (RGBA? drop the alpha channel: image[:3])" if channels == 4 else ""
        raise ValueError(f"{what}: expected 1 or 3 channels first, (C, H, W), got shape {tuple(image.shape)}{hint}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{what}: an empty image, shape {tuple(image.shape)}")
    image = image.float()
    low, high = torch.stack(torch.aminmax(image)).tolist()  # one pass, one device sync (NaN propagates)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what}: holds NaN or Inf values")
    if low < -VALUE_SLACK or high > 1 + VALUE_SLACK:
        raise ValueError(f"{what}: values span [{low:.3g}, {high:.3g}]; give a float image in [0, 1] (a uint8 "
                         "image made float without / 255? an image already normalised with a mean and std?)")
    return image
