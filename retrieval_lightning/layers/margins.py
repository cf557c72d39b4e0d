"""Cosine classifiers with additive angular margins: ArcFace (DELG) and CurricularFace (CVNet).

Margin math runs in fp32 with autocast disabled, and cosines are clamped away from +-1 before
``acos`` (its gradient is infinite there, which turns into NaNs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_COS_EPS = 1e-7


class CosineClassifier(nn.Module):
    """Bias-free linear layer on L2-normalised inputs and weights: returns cosines (B, n_classes)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"a margin classifier needs num_classes > 0, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))


class ArcFaceMargin(nn.Module):
    """ArcFace: ``s * cos(theta_y + m)`` for the target class when ``theta_y <= pi - m``, only in training."""

    def __init__(self, scale: float, margin: float = 0.1) -> None:
        super().__init__()
        self.scale = float(scale)
        self.margin = float(margin)

    def forward(self, cosine: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cosine = cosine.float()
            if not self.training or self.margin == 0.0:
                return cosine * self.scale
            target = cosine.gather(1, labels[:, None]).clamp(-1 + _COS_EPS, 1 - _COS_EPS)
            theta = torch.acos(target)
            apply = theta <= math.pi - self.margin
            with_margin = torch.where(apply, torch.cos(theta + self.margin), target)
            logits = cosine.scatter(1, labels[:, None], with_margin)
            return logits * self.scale


class CurricularFaceMargin(nn.Module):
    """CurricularFace (Huang et al. 2020): ArcFace plus adaptive re-weighting of hard negatives.

    The running statistic ``t`` (moving average of the target cosine, momentum 0.01) is updated
    from the batch gathered over all DDP ranks, so every rank keeps the same value. It stays fp32
    whatever the module is converted to (``bf16-true`` casts every buffer): a bf16 ``t`` near 0.5
    has a step of 2^-9, larger than most momentum-0.01 updates, so it would stop moving.
    """

    def __init__(self, scale: float, margin: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__()
        self.scale = float(scale)
        self.margin = float(margin)
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros(1, dtype=torch.float32))
        self.threshold = math.cos(math.pi - self.margin)
        self.mm = math.sin(math.pi - self.margin) * self.margin

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Module conversions move ``t`` to the new device but keep it fp32 (and its value exact)."""
        t = self.t
        super()._apply(fn, recurse)
        self.t = t.to(device=self.t.device, dtype=torch.float32)
        return self

    def _update_t(self, target: Tensor) -> None:
        target = target.float()
        count = torch.tensor(float(target.numel()), dtype=torch.float32, device=target.device)
        stats = torch.stack([target.sum(), count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        if float(stats[1]) == 0:  # no target anywhere (a contrastive batch without positives): t stays
            return
        self.t.mul_(1.0 - self.momentum).add_(self.momentum * stats[0] / stats[1])

    def forward(self, cosine: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cosine = cosine.float().clamp(-1 + _COS_EPS, 1 - _COS_EPS)
            if not self.training:
                return cosine * self.scale
            with torch.no_grad():
                self._update_t(cosine.detach().gather(1, labels[:, None]))
            return self.margin_logits(cosine, labels)

    def margin_logits(self, cosine: Tensor, labels: Tensor) -> Tensor:
        """Training logits with the current ``t`` (not updated): rows of ``cosine`` may then be taken in
        chunks, with ``t`` updated once for all of them (:meth:`update_t`)."""
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cosine = cosine.float().clamp(-1 + _COS_EPS, 1 - _COS_EPS)
            target = cosine.gather(1, labels[:, None])
            sin_target = torch.sqrt(1.0 - target.pow(2))
            cos_target_m = target * math.cos(self.margin) - sin_target * math.sin(self.margin)
            hard = cosine > cos_target_m
            final_target = torch.where(target > self.threshold, cos_target_m, target - self.mm)
            t = self.t.to(cosine.dtype)
            logits = torch.where(hard, cosine * (t + cosine), cosine)
            logits = logits.scatter(1, labels[:, None], final_target)
            return logits * self.scale

    @torch.no_grad()
    def update_t(self, target_cosines: Tensor) -> None:
        """Move ``t`` towards the mean of these target cosines (of every rank); a collective under DDP."""
        self._update_t(target_cosines.detach().float().clamp(-1 + _COS_EPS, 1 - _COS_EPS))


def build_margin(kind: str, scale: float, margin: float) -> nn.Module:
    """Margin by name: ``arcface`` or ``curricularface``."""
    kinds = {"arcface": ArcFaceMargin, "curricularface": CurricularFaceMargin}
    if kind not in kinds:
        raise ValueError(f"unknown margin {kind!r}; choose one of {sorted(kinds)}")
    if not 0.0 <= margin < math.pi / 2:  # pytorch-metric-learning gives ArcFace's margin in degrees
        raise ValueError(f"margin must be in radians, in [0, pi/2), got {margin} (ArcFace/DELG: 0.1; "
                         f"{margin} degrees would be {math.radians(margin):.4g})")
    return kinds[kind](scale=scale, margin=margin)
