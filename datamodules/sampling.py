"""Training samplers and loader that a killed run resumes exactly, on one process or under DDP.

Why: a resumed run must see the same images, in the same order, with the same augmentation as an
uninterrupted run. Here an epoch's order is a pure function of ``(seed, epoch, rank)`` (no global
random state), each position carries its own augmentation seed, and the loader saves how many
batches it has handed out, so a mid-epoch checkpoint restarts the epoch where it stopped.

The samplers shard themselves (rank ``r`` takes positions ``r, r + W, ...`` of the epoch's list,
so ranks are disjoint). They subclass ``DistributedSampler`` so that Lightning neither wraps them
(``DistributedSamplerWrapper``) nor forgets to call :meth:`set_epoch`: every Lightning 2.x calls
``set_epoch`` on a loader's own ``DistributedSampler`` at each epoch start, whereas forwarding it
through the wrapper only exists in recent releases.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def run_seed(seed: int | None) -> int:
    """``seed``, or else the run's seed: what ``seed_everything`` set (Lightning records it in
    ``PL_GLOBAL_SEED``, which DDP's re-launched processes inherit), or 0 if nothing was seeded.

    Why: a data seed left unset follows ``seed_everything``, so a run with another seed also draws
    other batches (on the demos the data draw moves results more than the initialisation), while
    a resumed run, which repeats the config's ``seed_everything``, redraws the same ones.
    """
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def training_batches_before(trainer: Any) -> int:
    """How many training batches the run has taken before the one being transferred (across epochs,
    restored on resume): the key of per-batch draws. Unlike ``global_step`` it advances with every
    micro-batch of an accumulated step."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)


def rank_share(draws: torch.Tensor, rank: int, world_size: int, unit: int = 1) -> torch.Tensor:
    """This rank's rows of a step's draws made for every rank at once, in the order of one process
    with the whole batch.

    The samplers deal the step's units round-robin (single items, or a pair batch's groups of
    ``unit`` items): unit ``j * world_size + rank`` is this rank's ``j``-th. Drawing for all and
    keeping these rows, N processes draw what one process with N times the batch draws, so a batch
    transform's randomness does not depend on the number of processes.
    """
    if world_size == 1:
        return draws
    if draws.shape[0] % (world_size * unit):
        raise ValueError(f"{draws.shape[0]} draws are not {world_size} ranks' units of {unit}")
    return draws.reshape(-1, world_size, unit, *draws.shape[1:])[:, rank].reshape(-1, *draws.shape[1:])


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of a per-step batch transform at training step ``step``.

    It depends only on ``(seed, step, stream)``: a resumed run redraws the same values. A transform
    draws for every rank's items and keeps this rank's share (:func:`rank_share`). ``stream``
    separates transforms that share a seed.
    """
    return torch.Generator().manual_seed(mixed_seed(seed, step, int(stream)))


def mixed_seed(seed: int, major: int, minor: int) -> int:
    """One seed from ``(seed, major, minor)``, distinct for distinct ``major`` and ``minor`` < 1009."""
    return ((int(seed) * 1_000_003 + int(major)) * 1_009 + int(minor)) % 2**62


class EpochSampler(DistributedSampler):
    """Base: this rank's share of a seeded per-epoch list, yielded as ``(index, augmentation_seed)``.

    ``total`` positions per epoch (cut to a multiple of ``num_replicas`` so shares are disjoint and
    equal); :attr:`start` skips this rank's first positions once (set by :class:`ResumableDataLoader`).
    """

    def __init__(self, dataset_size: int, total: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.num_samples = total // num_replicas
        if self.num_samples == 0:
            raise ValueError(f"{total} samples per epoch cannot be shared by {num_replicas} ranks")
        self.total = total  # drawn whatever the world size, so shards are cuts of one list
        self.total_size = self.num_samples * num_replicas
        self.start = 0

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """The whole epoch's list of ``total`` dataset indices."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self.epoch_order(rng)
        aug_seeds = rng.integers(0, 2**62, size=self.total)
        positions = np.arange(self.rank, self.total_size, self.num_replicas)[self.start:]
        self.start = 0
        return iter(zip(order[positions].tolist(), aug_seeds[positions].tolist()))

    def __len__(self) -> int:
        return self.num_samples


class ShuffleSampler(EpochSampler):
    """A seeded permutation of the dataset per epoch (plain shuffling)."""

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset_size, dataset_size, num_replicas, rank, seed)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.dataset))


class ClassBalancedSampler(EpochSampler):
    """Draw a class with probability proportional to ``count ** power``, then one of its images.

    ``power=0`` gives uniform classes (the long tail is seen as often as the head), ``power=1`` the
    natural frequency. ``num_samples`` draws per epoch over all ranks (default: the number of
    images), with replacement; a new draw each epoch (:meth:`set_epoch`).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, power: float = 0.0, num_samples: int | None = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty 1-D label array")
        self._order = np.argsort(labels, kind="stable")
        _, self._starts, self._counts = np.unique(labels[self._order], return_index=True, return_counts=True)
        weights = self._counts.astype(np.float64) ** float(power)
        self._probs = weights / weights.sum()
        total = int(num_samples) if num_samples is not None else int(labels.size)
        super().__init__(int(labels.size), total, num_replicas, rank, seed)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        classes = rng.choice(self._probs.size, size=self.total, p=self._probs)
        offsets = np.floor(rng.random(self.total) * self._counts[classes]).astype(np.int64)
        return self._order[self._starts[classes] + offsets]


class PositionedDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is checkpointed (Lightning's stateful loaders).

    Lightning saves ``state_dict()`` of stateful training loaders into the checkpoint and calls
    ``load_state_dict`` when it resumes; the next iteration of the same epoch then skips the batches
    already trained on, in the sampler (no image is decoded for them). The iterator is lazy:
    Lightning creates it before it sets a resumed run's epoch. Loader workers draw their base seed
    from a private generator, so creating an iterator never consumes the global random state.
    Subclasses say how to read the epoch and how to skip in their sampler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self._epoch, self._yielded, self._skip = 0, 0, 0

    def _current_epoch(self) -> int:
        raise NotImplementedError

    def _skip_in_sampler(self, batches: int) -> int:
        """Make the sampler start ``batches`` batches in; returns how many it will skip."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch = self._current_epoch()
        resume = self._skip if self._skip and self._epoch == epoch else 0
        self._yielded = self._skip_in_sampler(resume) if resume else 0
        self._epoch, self._skip = epoch, 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._skip = int(state["epoch"]), int(state["batches"])

    def rewind_to(self, batches: int) -> None:
        """Count only the epoch's first ``batches`` batches (those Lightning processed) as given: an error stopped
        the step of those after them (in the step, or moving the batch to the device), so the checkpoint written
        on that error resumes with them (the core calls this). Under gradient accumulation the processed
        micro-batches of an unfinished optimiser step count as given, though no step applied them."""
        self._yielded = min(self._yielded, max(0, int(batches)))


class ResumableDataLoader(PositionedDataLoader):
    """A :class:`PositionedDataLoader` over an :class:`EpochSampler` (any other sampler, as
    Lightning's ``overfit_batches`` swaps in, has no position to restore)."""

    def _current_epoch(self) -> int:
        return self.sampler.epoch if isinstance(self.sampler, EpochSampler) else self._epoch

    def _skip_in_sampler(self, batches: int) -> int:
        if not isinstance(self.sampler, EpochSampler) or not self.batch_size:
            return 0
        self.sampler.start = batches * self.batch_size
        return batches
