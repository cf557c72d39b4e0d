"""Optimiser and learning-rate schedule from plain config values (DELG: SGD + linear decay to 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class OptimConfig:
    """Optimiser settings.

    Args:
        name: ``sgd`` (DELG: momentum 0.9) or ``adamw``.
        lr: base learning rate of the heads.
        backbone_lr_mult: backbone lr = ``lr * backbone_lr_mult`` (fine-tuning uses < 1).
        momentum, weight_decay: as in torch.
        schedule: ``linear`` (decay to 0 over training, DELG), ``cosine`` or ``constant``.
        warmup_steps: linear warm-up steps before the schedule.
    """

    name: str = "sgd"
    lr: float = 0.01
    backbone_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0


def _schedule(cfg: OptimConfig, total_steps: int):
    import math

    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return 1.0 - progress
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_optimizer(cfg: OptimConfig, groups: list[dict], total_steps: float | int) -> dict[str, Any]:
    """Optimiser over ``groups`` (which may carry their own lr/decay) and a per-step LambdaLR."""
    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use linear, cosine or constant")
    for group in groups:
        group.setdefault("weight_decay", cfg.weight_decay)
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; use sgd or adamw")
    if total_steps in (None, float("inf")):
        total_steps = 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, int(total_steps)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
