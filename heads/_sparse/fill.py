"""What a dropped database location holds when the verifier scores a sparse entry.

Why fill at all: the 4D network was trained on dense correlation volumes. With 8 % of a level
kept and the rest zero, its input is a few isolated peaks in an empty volume, a distribution it
never saw, and its scores rank worse than its dense ones. Filling each dropped location with the
Gaussian-weighted average of the kept (L2-normalised) rows around it gives back a smooth, dense
volume built from the stored rows only: a dropped feature still cannot affect a score, no byte is
added to the store, and a kept row is used as stored, so keep ratio 1.0 is dense exactly.

The weighted average is a separable Gaussian blur of the masked map (two matrix products per
level), so it is differentiable in the mask: the sparsifier trains through the same fill it is
scored with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_weights(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, n) un-normalised Gaussian weights between the cells of one axis (sigma in cells)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    return torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2.0 * sigma * sigma)).to(dtype)


def _blur(x: Tensor, ky: Tensor, kx: Tensor) -> Tensor:
    """``ky @ x @ kx.T`` on every (b, p) plane of x (B, P, h, w), as two large matrix products
    (a batch of B*P small ones is several times slower on CPU)."""
    b, p, h, w = x.shape
    cols = torch.matmul(ky, x.permute(2, 0, 1, 3).reshape(h, b * p * w))  # along h
    planes = cols.reshape(h, b, p, w).permute(1, 2, 0, 3).reshape(b * p * h, w)
    return torch.matmul(planes, kx.t()).reshape(b, p, h, w)  # along w


def fill_dropped(units: Tensor, mask: Tensor, sigma: float) -> Tensor:
    """Units (B, P, h, w) with mask (B, h, w) applied: kept rows as they are, dropped rows the
    L2-normalised Gaussian average of the kept rows (zero when none is near enough to register).

    ``units`` are L2-normalised rows. ``mask`` may be a straight-through 0/1 mask (soft gradient),
    a 1 keeps a row, a 0 drops it. ``sigma <= 0`` drops to zero (the plain masked map).
    """
    mask = mask.unsqueeze(1).to(units.dtype)
    kept = units * mask
    if sigma <= 0:
        return kept
    h, w = units.shape[-2:]
    ky = gaussian_weights(h, sigma, units.device, units.dtype)
    kx = gaussian_weights(w, sigma, units.device, units.dtype)
    blurred = _blur(kept, ky, kx)  # sum_i K(j, i) m_i x_i for every j
    return kept + (1 - mask) * F.normalize(blurred, dim=1, eps=1e-12)


def fill_rows(rows: Tensor, positions: Tensor, hw: tuple[int, int], sigma: float) -> Tensor:
    """Decoded (h*w, P) rows of one level, zero where dropped -> dropped rows filled as
    :func:`fill_dropped` fills them; stored rows are returned as decoded, unit rows up to the codec's
    rounding (int4 norms within about 0.9 - 1.1), which the verifier scores as it scores stored dense rows:
    as they are, not normalised again."""
    if sigma <= 0 or positions.numel() == 0 or positions.numel() >= rows.shape[0]:
        return rows
    h, w = hw
    mask = torch.zeros(h * w, dtype=torch.float32)
    mask[positions.long()] = 1.0
    units = F.normalize(rows.float(), dim=1, eps=1e-12).t().reshape(1, -1, h, w)
    filled = fill_dropped(units, mask.reshape(1, h, w), sigma)[0].reshape(rows.shape[1], -1).t()
    out = filled.to(rows.dtype)
    out[positions.long()] = rows[positions.long()]
    return out
