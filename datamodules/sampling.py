"""Class-balanced sampling for long-tailed classification data (GLDv2 has classes of 1 to 1000s of images).

Why: with plain shuffling the head classes dominate every epoch; drawing classes first lets the
long tail be seen as often as wanted.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler[int]):
    """Draw a class with probability proportional to ``count ** power``, then one of its images.

    ``power=0`` gives uniform classes (the long tail is seen as often as the head), ``power=1``
    the natural frequency. ``num_samples`` draws per epoch (default: the number of images), with
    replacement. The draw depends only on ``(seed, epoch)``: call :meth:`set_epoch` (Lightning
    does) for a new draw each epoch.

    Under DDP, Lightning (``use_distributed_sampler=True``) wraps this sampler in
    ``DistributedSamplerWrapper``: every rank materialises the same list from ``(seed, epoch)``
    and takes its own strided share of positions, so the ranks' shares are disjoint and together
    cover the epoch's list (padded by repetition to a multiple of the world size). No
    distributed logic lives here.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, power: float = 0.0,
                 num_samples: int | None = None, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty 1-D label array")
        self._order = np.argsort(labels, kind="stable")
        _, self._starts, self._counts = np.unique(labels[self._order], return_index=True, return_counts=True)
        weights = self._counts.astype(np.float64) ** float(power)
        self._probs = weights / weights.sum()
        self.num_samples = int(num_samples) if num_samples is not None else int(labels.size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = rng.choice(self._probs.size, size=self.num_samples, p=self._probs)
        offsets = np.floor(rng.random(self.num_samples) * self._counts[classes]).astype(np.int64)
        picks = self._order[self._starts[classes] + offsets]
        return iter(picks.tolist())
