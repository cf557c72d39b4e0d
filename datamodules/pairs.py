"""Pair batches for training a verifier: groups of (anchor, positive, hard negatives).

Why: a verifier (CVNet's correlation network) learns same/different from pairs formed inside a
batch; random pairs of a landmark dataset are almost all trivially different, so every batch is
composed of groups ``[anchor, positive, n_1 .. n_k]`` where the positive shares the anchor's
label and the negatives are images of *other* labels that the current global descriptor places
nearest to the anchor (Radenović et al.'s mining; CVNet's recipe, CVPR 2022, names hard-negative mining).

Who does what:

- :class:`PairMiner` owns the mined table (shared by every copy of the sampler, because Lightning
  re-instantiates the batch sampler under DDP with the same arguments). It implements the
  duck-typed protocol of :class:`retrieval_lightning.callbacks.HardNegativeMining`: ``pool(epoch)``,
  ``pool_dataset(positions)``, ``labels``, ``table_width``, ``distinct_labels``, ``set_negatives``.
- :class:`PairBatchSampler` draws the epoch's groups from ``(seed, epoch)``; before the first
  mining (or for an anchor the table does not cover) the negatives are random images of other
  labels. Every rank draws the same list and keeps its own strided share, so ranks are disjoint.
- :class:`PairCollate` adds the group structure to the batch as ``pairs`` rows ``(i, j, same)``:
  (anchor, positive, 1) and (anchor, negative, 0) for every group. A head whose ``losses`` takes
  ``pairs`` trains on exactly these (the mined pairs), instead of pairs drawn from labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, Dataset, Sampler, default_collate

from datamodules.sampling import PositionedDataLoader, mixed_seed, run_seed
from retrieval_lightning.errors import UsageError


@dataclass
class PairSampling:
    """Options of pair-batch training (``sampling: pairs`` in the GLDv2 / minilandmarks datamodules).

    Args:
        groups_per_batch: groups per batch; a batch holds ``groups_per_batch * (2 + negatives)`` images.
        negatives: hard negatives per anchor.
        candidates: negatives are drawn among the ``candidates`` nearest other-label images
            (``None``: exactly the ``negatives`` nearest).
        distinct_labels: the negatives of one anchor come from distinct labels.
        pool_size: mine over a random subset of this many training images, redrawn at each mining
            (``None``: the whole training set, CVNet's choice; with a frozen global model the mining
            callback embeds it once and keeps the table, so only a global model that trains needs a
            subset at GLDv2 scale). Anchors come from the pool of the latest mining, so every anchor
            has mined negatives also between minings.
        groups_per_epoch: groups per epoch over all ranks (``None``: one per pool image).
        mining_max_side: long side of the images embedded for mining.
        same_image_positives: share of groups whose positive is the anchor image itself (the
            dataset gives it another random crop). Such a positive shares content with the
            anchor unless both crops are small and far apart, so it teaches a verifier
            correspondence; a same-label positive may show another side of the landmark, and on
            little data the verifier then learns the landmarks' look instead (a demo verifier
            trained without it scored an image against itself no higher than unrelated pairs).
        shuffled_negatives: extra negatives per group that are another crop of the anchor with its
            ``shuffle_grid x shuffle_grid`` tiles in a random order (:mod:`datamodules.patch_shuffle`):
            the anchor's own local features without their layout, so the verifier learns that only
            geometrically consistent matches count. The slots hold the anchor's position; the
            collate marks them and the datamodule shuffles them on the device. Off by default: on the
            demo it did not raise mAP (docs/cvnet_demo_experiments.md).
        shuffle_grid: tiles per side of those mosaics.
        crops_per_image: see each training image only through a fixed pool of this many random
            crops (the crop seeds depend on ``seed`` and the image, not on the epoch), instead of a
            fresh crop every time (``None``). A same-image positive takes another crop of the pool
            than its anchor. This is the data of a verifier trained on cached crop features; on the
            demo it did not change re-ranked mAP beyond the spread between runs
            (docs/cvnet_demo_experiments.md), and the demo config keeps it as part of the recipe
            measured best there. Off by default.
        hard_start, hard_warmup_batches: CVNet's curriculum for negatives: the share of each group's
            negatives taken from the mined candidates rises linearly from ``hard_start`` to 1 over the
            first ``hard_warmup_batches`` batches of training (the rest are random other-label images),
            as its Hide-and-Seek share rises. Default: every negative mined from the start.
        seed: seed of the draws (combined with the epoch); ``None``: the run's ``seed_everything``
            (:func:`~datamodules.sampling.run_seed`), resolved when the options are made.
    """

    groups_per_batch: int = 4
    negatives: int = 5
    candidates: int | None = None
    distinct_labels: bool = True
    pool_size: int | None = None
    groups_per_epoch: int | None = None
    mining_max_side: int = 512
    same_image_positives: float = 0.0
    shuffled_negatives: int = 0
    shuffle_grid: int = 4
    crops_per_image: int | None = None
    hard_start: float = 1.0
    hard_warmup_batches: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.seed = run_seed(self.seed)
        if self.groups_per_batch < 1 or self.negatives < 1:
            raise ValueError(f"PairSampling needs groups_per_batch >= 1 and negatives >= 1, got groups_per_batch="
                             f"{self.groups_per_batch!r} and negatives={self.negatives!r}")
        for name in ("pool_size", "groups_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"PairSampling needs {name} >= 1 (or null: every training image), got {value}")
        if self.mining_max_side < 1:
            raise ValueError(f"PairSampling needs mining_max_side >= 1, got {self.mining_max_side}")
        if self.candidates is not None and self.candidates < self.negatives:
            raise ValueError(f"candidates ({self.candidates}) must be >= negatives ({self.negatives})")
        if not 0.0 <= self.same_image_positives <= 1.0:
            raise ValueError(f"same_image_positives must be in [0, 1], got {self.same_image_positives}")
        if self.shuffled_negatives < 0 or self.shuffle_grid < 2:
            raise ValueError(f"PairSampling needs shuffled_negatives >= 0 and shuffle_grid >= 2, got "
                             f"{self.shuffled_negatives} and {self.shuffle_grid}")
        if not 0.0 <= self.hard_start <= 1.0 or self.hard_warmup_batches < 0:
            raise ValueError(f"PairSampling needs hard_start in [0, 1] and hard_warmup_batches >= 0, got "
                             f"{self.hard_start} and {self.hard_warmup_batches}")
        if self.crops_per_image is not None and not 2 <= self.crops_per_image <= 1009:
            raise ValueError(f"crops_per_image must be in [2, 1009] (a same-image positive needs another crop; "
                             f"crop seeds are unique per image up to 1009), got {self.crops_per_image}")

    def hard_share(self, batch: int) -> float:
        """Share of a group's negatives taken from the mined candidates at training batch ``batch``."""
        if self.hard_warmup_batches <= 0 or batch >= self.hard_warmup_batches:
            return 1.0
        return self.hard_start + (1.0 - self.hard_start) * batch / self.hard_warmup_batches

    @property
    def group_size(self) -> int:
        return 2 + self.negatives + self.shuffled_negatives

    @property
    def batch_size(self) -> int:
        return self.groups_per_batch * self.group_size


def check_pair_options(sampling: str, pairs: PairSampling | dict | None) -> None:
    """Refuse pair options that would go unread: a datamodule reads ``pairs`` with ``sampling: pairs`` only."""
    if pairs is not None and sampling != "pairs":
        raise ValueError(f"pairs options are read only with sampling: pairs (got sampling: {sampling!r}); "
                         f"set --data.init_args.sampling pairs, or drop pairs")


class PairMiner:
    """Mining state: the epoch's pool and the nearest other-label images of every mined anchor.

    ``make_dataset(positions)`` returns a Dataset of ``{"image": (3,h,w) float in [0,1], "index": i}``
    with ``i`` the row in ``positions`` (deterministic eval-style images of those training images).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, config: PairSampling,
                 make_dataset: Callable[[np.ndarray], Dataset] | None = None, identity: str | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.ndim != 1 or self.labels.size == 0:
            raise ValueError("PairMiner needs a non-empty 1-D label array")
        self.config = config
        self._make_dataset = make_dataset
        #: what the training images are (a digest of their paths), so a saved table is loaded only for them
        self.identity = identity
        order = np.argsort(self.labels, kind="stable")
        uniq, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
        self.members = {int(c): order[s:s + n] for c, s, n in zip(uniq, starts, counts)}
        self.classes = uniq
        self.has_positive = (counts >= 2)[np.searchsorted(uniq, self.labels)]
        if int((counts >= 2).sum()) == 0:  # a one-line error, not a traceback from the mining callback
            raise UsageError(f"pair sampling needs at least one label with two images (positives): the training "
                             f"set has {self.labels.size} images of {uniq.size} labels, one image each")
        if uniq.size < 2:
            raise UsageError(f"pair sampling needs at least two labels (negatives are other labels): the training "
                             f"set has {self.labels.size} images, all of label {int(uniq[0])}")
        self._table_pos = np.zeros(0, dtype=np.int64)  # mined anchors, sorted
        self._table = np.zeros((0, self.table_width), dtype=np.int64)
        self.mined_epoch: int | None = None
        #: set by the mining callback: called with the epoch just before that epoch's groups are drawn
        self.request: Callable[[int], None] | None = None
        #: set by the datamodule: the batches a training epoch really takes (``limit_train_batches``), or
        #: None when unknown; the negatives' curriculum counts batches with it, as Hide-and-Seek's does
        self.epoch_batches: Callable[[], int | None] | None = None
        self.warned_unmined = False

    # ---------------------------------------------------------------- protocol of the mining callback
    @property
    def table_width(self) -> int:
        return int(self.config.candidates or self.config.negatives)

    @property
    def distinct_labels(self) -> bool:
        return bool(self.config.distinct_labels)

    @property
    def mining_max_side(self) -> int:
        return int(self.config.mining_max_side)

    def pool(self, epoch: int) -> np.ndarray:
        """Training positions mined (and used as anchors) in ``epoch``: all, or a seeded subset, sorted."""
        n = self.labels.size
        size = self.config.pool_size
        if size is None or size >= n:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.config.seed, int(epoch), 1])
        return np.sort(rng.choice(n, size=int(size), replace=False)).astype(np.int64)

    def pool_dataset(self, positions: np.ndarray) -> Dataset:
        if self._make_dataset is None:
            raise RuntimeError("this PairMiner was made without make_dataset: it cannot be mined")
        return self._make_dataset(np.asarray(positions, dtype=np.int64))

    def set_negatives(self, epoch: int, positions: np.ndarray, neighbours: np.ndarray) -> None:
        """Install the mined table: ``neighbours[i]`` = nearest other-label positions of ``positions[i]``
        (nearest first, ``-1`` where fewer were found)."""
        positions = np.asarray(positions, dtype=np.int64)
        neighbours = np.asarray(neighbours, dtype=np.int64).reshape(len(positions), -1)
        order = np.argsort(positions, kind="stable")
        self._table_pos, self._table = positions[order], neighbours[order]
        self.mined_epoch = int(epoch)

    # ---------------------------------------------------------------- drawing groups
    def mined_negatives(self, anchor: int) -> np.ndarray | None:
        """The anchor's mined row (valid entries only), or ``None`` if the table does not cover it."""
        i = int(np.searchsorted(self._table_pos, anchor))
        if i >= self._table_pos.size or self._table_pos[i] != anchor:
            return None
        row = self._table[i]
        return row[row >= 0]

    def _random_negatives(self, anchor_label: int, count: int, exclude_labels: set[int],
                          rng: np.random.Generator) -> list[int]:
        """``count`` random images of labels other than the anchor's (and, with ``distinct_labels``,
        of distinct labels not in ``exclude_labels`` while enough remain); rejection sampling, so
        the cost does not grow with the number of classes."""
        out: list[int] = []
        banned = set(exclude_labels) | {anchor_label}
        distinct = self.config.distinct_labels and self.classes.size - len(banned) >= count
        while len(out) < count:
            label = int(self.classes[rng.integers(self.classes.size)])
            if label == anchor_label or (distinct and label in banned):
                continue
            banned.add(label)
            members = self.members[label]
            out.append(int(members[rng.integers(members.size)]))
        return out

    def group(self, anchor: int, rng: np.random.Generator, hard_share: float = 1.0) -> list[int]:
        """``[anchor, positive, negatives...]`` (dataset positions); ``hard_share`` of the negatives (drawn per
        negative) come from the mined candidates when there are any, the rest are random."""
        label = int(self.labels[anchor])
        members = self.members[label]
        others = members[members != anchor]
        positive = int(others[rng.integers(others.size)])
        share = self.config.same_image_positives
        if share > 0 and rng.random() < share:  # no extra draw when off: earlier runs' groups are unchanged
            positive = int(anchor)
        k = self.config.negatives
        negatives: list[int] = []
        mined = self.mined_negatives(anchor)
        hard = k if hard_share >= 1.0 else int(rng.binomial(k, hard_share))  # no draw when off: runs unchanged
        if mined is not None and mined.size and hard:
            take = min(hard, mined.size)
            if mined.size > take:  # a random subset of the candidates, kept nearest-first
                mined = mined[np.sort(rng.choice(mined.size, size=take, replace=False))]
            negatives = [int(x) for x in mined[:take]]
        if len(negatives) < k:
            used = {int(self.labels[n]) for n in negatives} if self.config.distinct_labels else set()
            negatives += self._random_negatives(label, k - len(negatives), used, rng)
        return [int(anchor), positive] + negatives[:k] + [int(anchor)] * self.config.shuffled_negatives


class PairBatchSampler(BatchSampler):
    """Batches of ``groups_per_batch`` groups; one epoch's groups depend only on ``(seed, epoch)``
    and the mined table.

    DDP: ``rank``/``world_size`` come from ``sampler`` when Lightning injects a
    ``DistributedSampler`` (it re-instantiates this class with the same arguments and
    ``sampler=DistributedSampler(...)``, whose ``set_epoch`` it then calls), else from the
    arguments, else from ``torch.distributed``. Each rank keeps ``groups[rank::world_size]``,
    truncated so every rank has the same number of batches.
    """

    def __init__(self, miner: PairMiner, sampler: Sampler | None = None, batch_size: int | None = None,
                 drop_last: bool = True, rank: int | None = None, world_size: int | None = None,
                 augmentation_seeds: bool = False) -> None:
        self.miner = miner
        # items as (position, seed) even without a crop pool: for datasets that take them (GLDv2's)
        self.augmentation_seeds = bool(augmentation_seeds)
        self.config = miner.config
        self.batch_size = self.config.batch_size  # images per batch; the argument is for Lightning only
        self.drop_last = True
        self.sampler = sampler if sampler is not None else self  # Lightning calls sampler.set_epoch
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skip = 0  # batches to skip at the start of the next iteration (resume mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _current_epoch(self) -> int:
        if self.sampler is not self and hasattr(self.sampler, "epoch"):
            return int(self.sampler.epoch)
        return self.epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.sampler is not self and hasattr(self.sampler, "num_replicas"):
            return int(self.sampler.rank), int(self.sampler.num_replicas)
        if self._world is not None:
            return int(self._rank or 0), int(self._world)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _groups_per_epoch(self) -> int:
        if self.config.groups_per_epoch is not None:
            return int(self.config.groups_per_epoch)
        size = self.config.pool_size
        n = self.miner.labels.size
        return n if size is None else min(int(size), n)

    def __len__(self) -> int:
        _, world = self._rank_world()
        return (self._groups_per_epoch() // world) // self.config.groups_per_batch

    def require_batches(self) -> None:
        """Refuse an epoch of no batch: ``fit`` would end at once, status 0, having trained nothing."""
        if len(self) == 0:
            _, world = self._rank_world()
            raise ValueError(f"pairs: {self._groups_per_epoch()} groups per epoch over {world} rank(s) make no "
                             f"batch of groups_per_batch={self.config.groups_per_batch} groups; lower "
                             f"--data.init_args.pairs.groups_per_batch or raise pairs.groups_per_epoch")

    def _batches_per_epoch(self) -> int:
        """Batches an epoch takes: the trainer's count when the datamodule tells it (fewer than
        ``len(self)`` under ``limit_train_batches``), else every batch of the sampler."""
        taken = self.miner.epoch_batches() if self.miner.epoch_batches is not None else None
        return len(self) if taken is None else min(int(taken), len(self))

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        """All ranks' groups of ``epoch`` (anchors from the epoch's pool, shuffled, cycled as needed)."""
        if self.miner.request is not None:
            self.miner.request(int(epoch))  # refresh the mined table first (a no-op when not due)
        elif self.miner.mined_epoch is None and not self.miner.warned_unmined:
            self.miner.warned_unmined = True
            rank_zero_warn("sampling: pairs draws random negatives only: no hard-negative mining fills the table. "
                           "Add retrieval_lightning.callbacks.hard_negatives.HardNegativeMining to trainer.callbacks "
                           "(as experiments/cvnet_demo.yaml does) for the mined negatives the pair recipe means")
        rng = np.random.default_rng([self.config.seed, int(epoch), 0])
        mined = self.miner.mined_epoch
        pool = self.miner.pool(epoch if mined is None else mined)  # the anchors the mined table covers
        eligible = pool[self.miner.has_positive[pool]]
        if eligible.size == 0:
            raise ValueError(f"epoch {epoch}: no image of the pool has a positive (a same-label image)")
        total = self._groups_per_epoch()
        reps = -(-total // eligible.size)
        anchors = np.concatenate([rng.permutation(eligible) for _ in range(reps)])[:total]
        _, world = self._rank_world()
        first_batch, per_batch = int(epoch) * self._batches_per_epoch(), self.config.groups_per_batch * world
        return [self.miner.group(int(a), rng, self.config.hard_share(first_batch + i // per_batch))
                for i, a in enumerate(anchors)]

    def crop_seed(self, position: int, crop: int) -> int:
        """Augmentation seed of crop ``crop`` of the pool of training image ``position``."""
        return mixed_seed(self.config.seed, position, crop)

    def with_crops(self, groups: list[list[int]], epoch: int) -> list[list[tuple[int, int]]]:
        """``(position, augmentation_seed)`` items of ``groups`` (``crops_per_image``): a crop of each
        image's pool, a different one for a positive that is the anchor itself. Own random stream,
        so the groups are the same with and without the option."""
        pool = int(self.config.crops_per_image or 0)
        rng = np.random.default_rng([self.config.seed, int(epoch), 2])
        out = []
        for group in groups:
            crops = rng.integers(pool, size=len(group))
            if group[1] == group[0] and crops[1] == crops[0]:
                crops[1] = (crops[0] + 1 + rng.integers(pool - 1)) % pool
            out.append([(int(p), self.crop_seed(p, int(c))) for p, c in zip(group, crops)])
        return out

    def with_seeds(self, groups: list[list[int]], epoch: int,
                   places: Sequence[int] | None = None) -> list[list[tuple[int, int]]]:
        """``(position, augmentation_seed)`` items without a crop pool: one seed per place of the epoch,
        a function of ``(seed, epoch, place)`` alone. Without it a crop came from the loader worker's random
        state, which a run resumed mid-epoch restarts: it redrew the epoch's first crops. ``places``: only the
        groups at those places (a rank's share; the items of all of them took 1 GB per rank at 1.3M groups)."""
        rng = np.random.default_rng([self.config.seed, int(epoch), 3])
        seeds = rng.integers(0, 2**62, size=(len(groups), max((len(g) for g in groups), default=0)))
        places = range(len(groups)) if places is None else places
        return [[(int(p), int(s)) for p, s in zip(groups[i], seeds[i])] for i in places]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        rank, world = self._rank_world()
        epoch = self._current_epoch()
        groups: list = self.epoch_groups(epoch)
        places = range(rank, world * (len(groups) // world), world)  # this rank's share
        if self.config.crops_per_image:  # one random stream over all groups: drawn for all, then shared
            crops = self.with_crops(groups, epoch)
            mine = [crops[i] for i in places]
            del crops
        elif self.augmentation_seeds:
            mine = self.with_seeds(groups, epoch, places)
        else:
            mine = [groups[i] for i in places]
        del groups  # the other ranks' groups: not held while this epoch's batches are drawn
        gpb = self.config.groups_per_batch
        first, self.skip = self.skip * gpb, 0
        for start in range(first, len(mine) - gpb + 1, gpb):
            yield [i for g in mine[start:start + gpb] for i in g]


class PairLoader(PositionedDataLoader):
    """A :class:`~datamodules.sampling.PositionedDataLoader` over a :class:`PairBatchSampler`: the
    epoch's groups (and the mining they trigger) are drawn only after Lightning has set the
    resumed epoch, also with loader workers."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not isinstance(self.batch_sampler, PairBatchSampler):
            raise TypeError("PairLoader needs batch_sampler=PairBatchSampler")

    def _current_epoch(self) -> int:
        return self.batch_sampler._current_epoch()

    def _skip_in_sampler(self, batches: int) -> int:
        self.batch_sampler.skip = batches
        return batches


class PairCollate:
    """Default collation plus ``pairs``: (M, 3) long rows ``(i, j, same)`` of each group of a batch
    made by :class:`PairBatchSampler` (batch positions; anchor-positive and anchor-negative pairs).

    With ``shuffled`` > 0 the last ``shuffled`` items of every group are patch-shuffle negatives:
    ``batch["shuffled"]`` is then a (B,) bool mask of them, for the datamodule's batch transform.

    ``same`` comes from the labels of the images actually loaded (a shuffled mosaic is always
    "different"): with ``on_error: skip`` an unreadable image is replaced by the next readable one,
    which may be of another landmark, so a slot's role alone would mislabel the pair.
    """

    def __init__(self, group_size: int, shuffled: int = 0) -> None:
        if group_size < 3:
            raise ValueError("a group is anchor, positive and at least one negative")
        if not 0 <= shuffled <= group_size - 3:
            raise ValueError(f"{shuffled} shuffled negatives do not fit groups of {group_size} "
                             "(anchor, positive and at least one mined negative come first)")
        self.group_size = int(group_size)
        self.shuffled = int(shuffled)

    def pairs(self, batch_size: int) -> torch.Tensor:
        if batch_size % self.group_size:
            raise ValueError(f"batch of {batch_size} items is not made of groups of {self.group_size}")
        rows = []
        for base in range(0, batch_size, self.group_size):
            rows.append((base, base + 1, 1))
            rows.extend((base, base + j, 0) for j in range(2, self.group_size))
        return torch.tensor(rows, dtype=torch.long)

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        pairs = self.pairs(len(items))
        labels = torch.as_tensor(batch["label"])
        same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        if self.shuffled:
            slot = torch.arange(len(items)) % self.group_size
            batch["shuffled"] = slot >= self.group_size - self.shuffled
            same &= ~batch["shuffled"][pairs[:, 1]]
        pairs[:, 2] = same.long()
        batch["pairs"] = pairs
        return batch
