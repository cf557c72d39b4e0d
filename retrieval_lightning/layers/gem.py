"""Generalised-mean pooling (Radenović et al.), fixed or learnable p."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GeM(nn.Module):
    """GeM pooling: ``(mean(clamp(x, eps)^p))^(1/p)`` over the spatial dimensions.

    ``learn_p=True`` makes ``p`` a parameter (cnnimageretrieval-pytorch); DELG keeps it fixed at 3.
    The power is computed in fp32 so bf16/fp16 autocast cannot overflow ``x^p``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be positive, got {p}")
        tensor = torch.tensor([float(p)])
        if learn_p:
            self.p = nn.Parameter(tensor)
        else:
            self.register_buffer("p", tensor)
        self.eps = eps
        self.learn_p = learn_p

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C): (mean x^p)^(1/p), computed as peak * (mean (x / peak)^p)^(1/p) (equal, as
        the mean is homogeneous) so that a large p (x^p above fp32's 3e38 from p = 100 at x = 2.5) stays finite."""
        p = self.p.float()
        x = x.float().clamp(min=self.eps)
        peak = x.amax(dim=(-2, -1), keepdim=True)
        pooled = (x / peak).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p) * peak.flatten(-3)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, eps={self.eps}, learn_p={self.learn_p}"
