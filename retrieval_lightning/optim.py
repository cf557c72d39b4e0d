"""Optimiser and learning-rate schedule from plain config values (DELG: SGD + linear decay to 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


#: the optimisers and learning-rate schedules ``OptimConfig`` names
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class OptimConfig:
    """Optimiser settings.

    Args:
        name: ``sgd`` (DELG: momentum 0.9) or ``adamw``.
        lr: base learning rate of the heads.
        backbone_lr_mult: backbone lr = ``lr * backbone_lr_mult`` (fine-tuning uses < 1).
        head_lr_mult: lr multiplier per head role, e.g. ``{verifier: 0.1}``: a later stage that trains a new
            head (a sparsifier) at ``lr`` while fine-tuning an already trained one (the verifier) gently.
            Roles not named train at ``lr``.
        momentum: as in torch.
        weight_decay: decay of weight matrices and kernels; biases, normalisation scales and GeM's p
            (parameters of fewer than 2 dimensions) are not decayed.
        schedule: ``linear`` (decay to 0 over training, DELG), ``cosine`` or ``constant``.
        warmup_steps: linear warm-up steps before the schedule.
        reference_batch: the global batch (images per optimiser step, over all processes and
            accumulated micro-batches) that ``lr`` was set for, as a recipe states it (DELG: 0.01 at
            256). A run whose global batch differs (``devices: auto`` on fewer GPUs) warns at its
            first step with the linearly scaled lr; ``None``: no check.
    """

    name: str = "sgd"
    lr: float = 0.01
    backbone_lr_mult: float = 1.0
    head_lr_mult: dict[str, float] = field(default_factory=dict)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    reference_batch: int | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:  # when the config is read, not after the data's set-up and imprinting
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("lr", "backbone_lr_mult", "momentum", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for role, mult in self.head_lr_mult.items():
            if not isinstance(mult, (int, float)) or mult < 0:
                raise ValueError(f"optim.head_lr_mult.{role} must be a number >= 0, got {mult!r}")
        if self.reference_batch is not None and self.reference_batch < 1:
            raise ValueError(f"optim.reference_batch must be >= 1 or null, got {self.reference_batch}")

    def batch_mismatch(self, per_process: int, processes: int, accumulated: int) -> str | None:
        """Why ``lr`` may not suit a run of this global batch (``None`` when it is the reference)."""
        total = per_process * processes * accumulated
        if self.reference_batch is None or total == self.reference_batch:
            return None
        scaled = self.lr * total / self.reference_batch
        return (f"optim.lr {self.lr:g} is set for a global batch of {self.reference_batch} images "
                f"(optim.reference_batch), but this run's is {total} ({per_process} per process x {processes} "
                f"processes x {accumulated} accumulated): the linear scaling rule gives --model.optim.lr {scaled:g}, "
                f"or set trainer.devices / accumulate_grad_batches to reach {self.reference_batch}")


class UnboundedScheduleError(ValueError):
    """A schedule that decays over the run was asked for, but the run has no step bound."""


def _schedule(cfg: OptimConfig, total_steps: int):
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


def check_total_steps(cfg: OptimConfig, total_steps: float | int | None) -> int:
    """The step count a decaying schedule spans; an unbounded run is an error, not a 1-step schedule.

    Lightning reports ``estimated_stepping_batches`` as ``inf`` when neither ``max_steps`` nor
    ``max_epochs`` bounds the run, or the training loader has no length (an iterable dataset).
    A linear or cosine decay over "1 step" would train the whole run at learning rate 0.
    """
    if cfg.schedule == "constant":
        return 1 if total_steps is None or not math.isfinite(float(total_steps)) else max(1, int(total_steps))
    if total_steps is not None and 0 <= float(total_steps) < 1:
        raise UnboundedScheduleError(
            f"the run trains no optimiser step (Lightning estimates {total_steps}: trainer.max_steps=0, or a "
            "training loader with no batch), so there is nothing to fit. Set trainer.max_steps >= 1, or evaluate "
            "with `test` instead"
        )
    if total_steps is None or not math.isfinite(float(total_steps)) or int(total_steps) < 1:
        raise UnboundedScheduleError(
            f"the {cfg.schedule!r} learning-rate schedule decays over the whole run, but the run has no "
            f"step bound (Lightning estimates {total_steps} optimiser steps: max_steps=-1 with max_epochs=-1, "
            "or a training loader without a length, e.g. an iterable dataset). Set trainer.max_steps "
            "(or max_epochs with a sized loader), or use optim.schedule=constant"
        )
    return int(total_steps)


def split_decay(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each group without its own ``weight_decay`` split in two: matrices and kernels decayed, vectors
    (biases, BatchNorm/GroupNorm scales) not; decaying those only pulls normalisation towards zero."""
    out = []
    for group in groups:
        if "weight_decay" in group or weight_decay == 0:
            out.append({"weight_decay": weight_decay, **group})
            continue
        params = list(group["params"])
        split = (([p for p in params if p.ndim >= 2], weight_decay), ([p for p in params if p.ndim < 2], 0.0))
        for chosen, decay in split:
            if chosen:
                out.append({**group, "params": chosen, "weight_decay": decay})
    return out


def build_optimizer(cfg: OptimConfig, groups: list[dict], total_steps: float | int | None) -> dict[str, Any]:
    """Optimiser over ``groups`` (which may carry their own lr/decay) and a per-step LambdaLR.

    ``total_steps`` is the run's optimiser-step count (``trainer.estimated_stepping_batches``);
    linear and cosine schedules need it finite (:class:`UnboundedScheduleError` otherwise).
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use one of {SCHEDULES}")
    total = check_total_steps(cfg, total_steps)
    groups = split_decay(groups, cfg.weight_decay)
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; use sgd or adamw")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
