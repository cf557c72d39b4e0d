"""Hide-and-Seek (Singh & Lee, ICCV 2017) as a curriculum: hidden patches whose share grows.

Why: a verifier trained on whole, clean views learns to rely on the single most distinctive
region; hiding random grid patches forces it to match whatever remains (occlusion, partial
views), and growing the hidden share over training (CVNet's curriculum, CVPR 2022) starts easy.

Applied as a batch transform after the batch reaches the device (the datamodules call
:meth:`HideAndSeek.apply` from ``on_after_batch_transfer`` with the trainer's global step and batch
count), so it costs nothing in the loader workers and sees the true step under any number of workers. Images
are RGB in [0, 1] before the backbone's normalisation; a hidden patch takes the ImageNet mean
colour, which the normalisation maps to zero, as the original fills patches with the data mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from datamodules.sampling import rank_share, run_seed, step_generator

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)


@dataclass
class HideAndSeek:
    """Grid Hide-and-Seek with a linear schedule of the hiding probability.

    Args:
        start: probability of hiding each patch at ``delay_steps``.
        end: probability reached after ``warmup_steps`` more steps (kept afterwards).
        warmup_steps: length of the linear ramp from ``start`` to ``end``.
        delay_steps: steps with probability 0 before the ramp starts (0: ramp from step 0).
        grid: patches per side (``grid * grid`` patches; boundaries ``round(i * side / grid)``).
        fill: RGB colour of hidden patches, in [0, 1].
        seed: the masks of training batch ``b`` depend only on ``(seed, b)`` and each item's place in
            the batch over all ranks (exact resume; N processes hide what one process with N times the
            batch hides); ``None``: the run's ``seed_everything`` (:func:`~datamodules.sampling.run_seed`).
            ``b`` counts batches, not optimiser steps, so the micro-batches of an accumulated step
            hide different patches; without accumulation the two counts are equal.
    """

    start: float = 0.0
    end: float = 0.5
    warmup_steps: int = 1000
    delay_steps: int = 0
    grid: int = 4
    fill: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN_RGB))
    seed: int | None = None

    def __post_init__(self) -> None:
        self.seed = run_seed(self.seed)
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"HideAndSeek.{name} must be a probability in [0, 1], got {value}")
        if self.grid < 1 or self.warmup_steps < 0 or self.delay_steps < 0:
            raise ValueError(f"HideAndSeek needs grid >= 1, warmup_steps >= 0 and delay_steps >= 0, got "
                             f"grid={self.grid!r}, warmup_steps={self.warmup_steps!r}, "
                             f"delay_steps={self.delay_steps!r}")
        if len(self.fill) != 3:
            raise ValueError(f"HideAndSeek.fill must be an RGB triple, got {self.fill}")

    def share(self, step: int) -> float:
        """Probability of hiding a patch at training step ``step``."""
        if step < self.delay_steps:
            return 0.0
        if self.warmup_steps == 0:
            return float(self.end)
        t = min(1.0, (step - self.delay_steps) / self.warmup_steps)
        return float(self.start + t * (self.end - self.start))

    def masks(self, batch: int, height: int, width: int, step: int, rank: int = 0, world_size: int = 1,
              unit: int = 1, draw: int | None = None) -> Tensor:
        """Boolean (batch, height, width), True where hidden; each patch hidden independently with the
        probability of ``step``. Drawn for all ``world_size`` ranks' batches from the generator of
        ``draw`` (the training batch's count; ``step`` when ``None``), this rank keeping its units of
        ``unit`` items (:func:`~datamodules.sampling.rank_share`)."""
        generator = step_generator(self.seed, step if draw is None else draw)
        draws = torch.rand(batch * world_size, self.grid, self.grid, generator=generator)
        hidden = rank_share(draws, rank, world_size, unit) < self.share(step)
        rows = _cell_index(height, self.grid)
        cols = _cell_index(width, self.grid)
        return hidden[:, rows][:, :, cols]

    def apply(self, images: Tensor, step: int, rank: int = 0, world_size: int = 1, unit: int = 1,
              draw: int | None = None) -> Tensor:
        """Return ``images`` (B, 3, H, W) with the batch's hidden patches filled (a new tensor); ``draw``
        as in :meth:`masks`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"HideAndSeek expects (B, 3, H, W) images, got {tuple(images.shape)}")
        if self.share(step) <= 0.0:
            return images
        b, _, h, w = images.shape
        mask = self.masks(b, h, w, step, rank, world_size, unit, draw).to(images.device)[:, None]
        fill = torch.tensor(self.fill, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return torch.where(mask, fill, images)


def _cell_index(side: int, grid: int) -> Tensor:
    """Grid cell of every pixel along one side: cell ``i`` covers ``[round(i*side/grid), round((i+1)*side/grid))``."""
    bounds = torch.tensor([round(i * side / grid) for i in range(grid + 1)])
    return torch.bucketize(torch.arange(side), bounds[1:], right=True).clamp_(max=grid - 1)
