"""Google Landmarks Dataset v2 (cvdfoundation/google-landmark, v2.1): training dataset and datamodule.

Layout under ``root`` (the official download): ``train/``, ``index/``, ``test/`` image trees with
``{split}/{id[0]}/{id[1]}/{id[2]}/{id}.jpg`` and the metadata CSVs (paths relative to ``root``
unless absolute). The CSV readers, the label remap and the validation split live in
:mod:`datamodules.gldv2_readers`, the class-balanced sampler in :mod:`datamodules.sampling`;
both are re-exported here so ``from datamodules.gldv2 import read_train_csv`` keeps working.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from datamodules._compact import StringArray
from datamodules._loader_options import check_loader_options
from datamodules._transforms import EvalImageDataset, EvalTransform, TrainTransform, datamodule_policy
from datamodules.hide_and_seek import HideAndSeek
from datamodules.patch_shuffle import shuffle_tiles, step_permutations
from datamodules.gldv2_readers import (USAGES, GLDv2FormatError, ImagePaths, TrainTable, image_path, read_id_csv,
                                      read_recognition_solution, read_retrieval_solution, read_train_clean_csv,
                                      read_train_csv, remap_labels, selected_usages, split_train_val)
from datamodules.pairs import PairBatchSampler, PairCollate, PairLoader, PairMiner, PairSampling, check_pair_options
from datamodules.sampling import (ClassBalancedSampler, EpochSampler, ResumableDataLoader, ShuffleSampler, run_seed,
                                training_batches_before)
from retrieval_lightning.data.loaders import eval_loaders
from retrieval_lightning.data.io import ImageLoadError, LoadPolicy, load_image_or_skip
from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.errors import UsageError

__all__ = [
    "EVAL_SET_KINDS",
    "USAGES",
    "ClassBalancedSampler",
    "GLDv2DataModule",
    "GLDv2FormatError",
    "GLDv2TrainDataset",
    "ImagePaths",
    "TrainTable",
    "image_path",
    "read_id_csv",
    "read_recognition_solution",
    "read_retrieval_solution",
    "read_train_clean_csv",
    "read_train_csv",
    "remap_labels",
    "selected_usages",
    "split_train_val",
]

EVAL_SET_KINDS = ("retrieval", "recognition", "holdout")


@dataclass
class _TrainState:
    """The chosen training set once read: table, labels 0..N-1, their landmark ids, the split."""

    table: TrainTable
    labels: np.ndarray
    classes: np.ndarray
    train_pos: np.ndarray
    val_pos: np.ndarray


#: unreadable training images skipped in a row (``on_error: skip``) before the run stops
SKIP_RUN = 50


class GLDv2TrainDataset(Dataset):
    """Training images: ``{"image": float (3,S,S), "label": int, "index": int}``.

    With a skip policy an unreadable image is replaced by the next readable one (index order),
    so a batch never shrinks; the policy counts and logs the skips. :data:`SKIP_RUN` unreadable in a row stop the
    run (a partial download: ``present_only``).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: TrainTransform,
                 policy: LoadPolicy, max_side: int | None = None) -> None:
        self.paths, self.labels = paths, np.asarray(labels, dtype=np.int64)
        self.transform, self.policy, self.max_side = transform, policy, max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """``index`` or ``(index, augmentation_seed)`` (from :class:`~datamodules.sampling.EpochSampler`):
        with a seed, the random crop depends on it alone, not on the process or worker state."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for step in range(min(len(self.paths), SKIP_RUN)):
            i = (int(index) + step) % len(self.paths)
            image = load_image_or_skip(self.paths[i], self.policy, max_side=self.max_side)
            if image is not None:
                return {"image": self.transform(image, generator=generator), "label": int(self.labels[i]), "index": i}
        raise ImageLoadError(f"none of the {min(len(self.paths), SKIP_RUN)} training images from index {index} on is "
                             f"readable (first tried {self.paths[index]}); with a partial download, "
                             "--data.init_args.present_only=true trains on the images present")


def without_empty_queries(solution: dict[str, list[str]], path: str) -> dict[str, list[str]]:
    """The retrieval queries that have ground truth: mAP@100 is taken over those only. A row of ``None``
    (no index image shows the landmark) is left out here, with a warning, rather than failing the metric
    once the whole index has been embedded."""
    kept = {qid: images for qid, images in solution.items() if images}
    if len(kept) < len(solution):
        dropped = [qid for qid in solution if qid not in kept]
        rank_zero_warn(f"{path}: {len(dropped)} retrieval queries have no ground-truth index images "
                       f"(e.g. {dropped[:3]}); they are not queries of mAP@100 and are left out")
    return kept


class GLDv2DataModule(L.LightningDataModule):
    """GLDv2 training (clean or full) and its retrieval / recognition / held-out evaluations.

    Eval sets per stage (``val_sets`` for ``validate``/``fit``, ``test_sets`` for ``test`` and
    ``predict``), each an :class:`EvalSet` with the queries first:

    - ``retrieval``: Usage-selected test images vs ``index.csv``; protocol ``gldv2_retrieval``.
    - ``recognition``: Usage-selected test images vs all training images (kNN label transfer);
      protocol ``gldv2_recognition``, ``db_labels`` are original landmark ids.
    - ``holdout``: validation-split images of ``holdout_num_classes`` classes vs the training
      split of those classes; protocol ``gldv2_recognition``. Cheap enough to run every epoch.

    ``train_set`` picks ``clean`` (81,313 classes in v2.1) or ``full`` (203,094); ``num_classes``
    reads that CSV on first use, so the CLI can link it into the model before ``setup``.
    ``usage`` is ``Public``, ``Private`` or ``All``. ``sampling="balanced"`` uses
    :class:`ClassBalancedSampler` (``balance_power``) instead of plain shuffling; both shard
    themselves under DDP and resume mid-epoch (:mod:`datamodules.sampling`). With ``eval_fast_decode`` eval images are
    decoded at reduced size when they exceed ``eval_max_side`` (see
    :class:`~datamodules._transforms.EvalImageDataset`); ``train_max_side`` does the same before
    the random crop, whose ``crop_area_min`` (DELG: 0.08) acts as 0.1 below 0.1: DELG's crop also keeps at
    least 10 % of the image (``min_object_covered``). ``on_error="skip"`` skips malformed CSV rows and
    unreadable images, counting and logging them. ``sampling="pairs"`` trains a verifier: batches of (anchor,
    positive, hard negatives) groups (:mod:`datamodules.pairs`, options ``pairs``; ``batch_size``
    is then ``pairs.batch_size``), mined by the ``HardNegativeMining`` callback through
    :attr:`pair_miner`. ``hide_and_seek`` hides grid patches of training images, more as steps pass.
    ``sampler_seed`` (like ``pairs.seed`` and ``hide_and_seek.seed``) seeds the training order;
    unset, it is the run's ``seed_everything`` (:func:`~datamodules.sampling.run_seed`).
    ``present_only`` keeps only the training images found under ``root/train`` (a partial download,
    ``download --max_archives N``): the classes, the split, the held-out set and the recognition
    database are then those of the images present, so a model trained so fits only that subset.
    """

    #: arguments that change only the training batches, not an evaluation image (a store's identity skips them)
    training_only_arguments = ("image_size", "train_max_side", "interpolation", "crop_area_min", "sampling",
                               "balance_power", "sampler_seed", "pairs", "hide_and_seek")

    def __init__(
        self,
        root: str = "data/gldv2",
        train_set: str = "clean",
        train_csv: str = "train.csv",
        train_clean_csv: str = "train_clean.csv",
        index_csv: str = "index.csv",
        retrieval_solution_csv: str = "retrieval_solution_v2.1.csv",
        recognition_solution_csv: str = "recognition_solution_v2.1.csv",
        usage: str = "Private",
        validation_split: float = 0.2,
        split_seed: int = 0,
        image_size: int = 512,
        train_max_side: int | None = None,
        interpolation: str = "area",
        crop_area_min: float = 0.08,
        eval_max_side: int | None = 1024,
        eval_upscale: bool = False,
        eval_fast_decode: bool = False,
        sampling: str = "shuffle",
        balance_power: float = 0.0,
        sampler_seed: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_sets: list[str] | None = None,
        test_sets: list[str] | None = None,
        holdout_num_classes: int | None = 1000,
        on_error: str = "raise",
        pairs: PairSampling | None = None,
        hide_and_seek: HideAndSeek | None = None,
        present_only: bool = False,
    ) -> None:
        super().__init__()
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if train_set not in ("clean", "full"):
            raise ValueError(f"train_set must be 'clean' or 'full', got {train_set!r}")
        if sampling not in ("shuffle", "balanced", "pairs"):
            raise ValueError(f"sampling must be 'shuffle', 'balanced' or 'pairs', got {sampling!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
        selected_usages(usage)
        self.val_sets = list(val_sets) if val_sets is not None else ["holdout"]
        self.test_sets = list(test_sets) if test_sets is not None else ["retrieval", "recognition"]
        for kind in self.val_sets + self.test_sets:
            if kind not in EVAL_SET_KINDS:
                raise ValueError(f"unknown GLDv2 eval set {kind!r}; choose from {EVAL_SET_KINDS}")
        if "holdout" in self.val_sets + self.test_sets and validation_split <= 0:
            raise ValueError("the 'holdout' eval set needs validation_split > 0")
        self.save_hyperparameters()
        self.hparams.sampler_seed = run_seed(sampler_seed)  # resolved now: checkpoints record it
        self.root, self.train_set, self.usage = os.path.expanduser(root), train_set, usage  # a config's ~/data
        self.policy = datamodule_policy(on_error)
        self.train_transform = TrainTransform(image_size, area_range=(crop_area_min, 1.0), interpolation=interpolation)
        self.eval_transform = EvalTransform(eval_max_side, upscale=eval_upscale)
        self._state: _TrainState | None = None
        self._eval_cache: dict[str, EvalSet] = {}
        self.train_dataset: GLDv2TrainDataset | None = None
        if isinstance(pairs, dict):  # from saved hyper-parameters / plain dicts
            pairs = PairSampling(**pairs)
        if isinstance(hide_and_seek, dict):
            hide_and_seek = HideAndSeek(**hide_and_seek)
        check_pair_options(sampling, pairs)
        self.pairs = (pairs or PairSampling()) if sampling == "pairs" else None
        self.hide_and_seek = hide_and_seek
        self._pair_miner: PairMiner | None = None

    @classmethod
    def download(
        cls,
        root: str,
        splits: str = "train,index,test",
        base_url: str | None = None,
        workers: int = 4,
        max_archives: int | None = None,
        keep_archives: bool = False,
    ) -> str:
        """Download GLDv2 (csv files and md5-checked image tars, resumable) into ``root``.

        ``splits`` is a comma-separated subset of train,index,test; ``max_archives`` fetches
        only the first archives of each split.
        """
        from datamodules.downloads import GLDV2_BASE_URL, download_gldv2

        summary = download_gldv2(root, splits=splits, base_url=base_url or GLDV2_BASE_URL, workers=workers,
                                 max_archives=max_archives, keep_archives=keep_archives)
        return str(summary)

    def _path(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.root, name)

    def _train_state(self) -> _TrainState:
        """Read the training CSV, remap labels and split, once."""
        if self._state is not None:
            return self._state
        hp = self.hparams
        path = self._path(hp.train_clean_csv if self.train_set == "clean" else hp.train_csv)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"GLDv2 training list not found: {path} (train_set={self.train_set!r}, root={self.root!r}); "
                f"fetch it with `retrieval-lightning download gldv2 --splits train --root {self.root}`"
            )
        read = read_train_clean_csv if self.train_set == "clean" else read_train_csv
        table = read(path, hp.on_error)
        if len(table) == 0:
            raise GLDv2FormatError(f"{path}: no training images listed (train_set={self.train_set!r})")
        if hp.present_only:
            table = keep_present(table, os.path.join(self.root, "train"), path)
        labels, classes = remap_labels(table.landmark_ids)
        if hp.validation_split > 0:
            train_pos, val_pos = split_train_val(labels, hp.validation_split, hp.split_seed)
        else:
            train_pos, val_pos = np.arange(len(table)), np.zeros(0, dtype=np.int64)
        self._state = _TrainState(table, labels, classes, train_pos, val_pos)
        return self._state

    @property
    def num_classes(self) -> int:
        """Number of classes of the chosen training set (reads its CSV once, before ``setup``)."""
        return int(self._train_state().classes.size)

    @property
    def class_landmark_ids(self) -> np.ndarray:
        """Original ``landmark_id`` of each label ``0..N-1``."""
        return self._train_state().classes

    def split_ids(self, which: str) -> list[str]:
        """Image ids of the ``"train"`` or ``"val"`` part of the split."""
        st = self._train_state()
        return list(st.table.ids.take(st.train_pos if which == "train" else st.val_pos))

    def setup(self, stage: str | None = None) -> None:
        st = self._train_state()
        if stage in (None, "fit") and self.train_dataset is None:
            if st.train_pos.size == 0:
                raise GLDv2FormatError("the training split is empty (every class went to validation)")
            self.train_dataset = GLDv2TrainDataset(
                ImagePaths(self.root, [("train", st.table.ids.take(st.train_pos))]),
                st.labels[st.train_pos], self.train_transform, self.policy, self.hparams.train_max_side,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        hp = self.hparams
        if self.pairs is not None:
            sampler = PairBatchSampler(self.pair_miner, augmentation_seeds=True)  # crops seeded: exact resume
            sampler.require_batches()
            return PairLoader(self.train_dataset, batch_sampler=sampler,
                              collate_fn=PairCollate(self.pairs.group_size, self.pairs.shuffled_negatives),
                              num_workers=hp.num_workers, pin_memory=hp.pin_memory,
                              persistent_workers=hp.num_workers > 0)
        # the sampler shards itself (rank, world size from the trainer) and is resumable mid-epoch
        trainer = self.trainer
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer is not None else {}
        sampler: EpochSampler
        if hp.sampling == "balanced":
            sampler = ClassBalancedSampler(self.train_dataset.labels, hp.balance_power, seed=hp.sampler_seed, **ranks)
        else:
            sampler = ShuffleSampler(len(self.train_dataset), seed=hp.sampler_seed, **ranks)
        if len(sampler) < hp.batch_size:  # drop_last: no batch, and fit would end at once having trained nothing
            raise UsageError(f"batch_size {hp.batch_size} exceeds the {len(sampler)} training images of each rank "
                             f"(whole batches only); lower --data.init_args.batch_size")
        return ResumableDataLoader(
            self.train_dataset, batch_size=hp.batch_size, sampler=sampler,
            drop_last=True, num_workers=hp.num_workers, pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
        )

    # ------------------------------------------------------------ pair batches (verifier training)
    @property
    def pair_miner(self) -> PairMiner | None:
        """The hard-negative state of ``sampling="pairs"`` (what ``HardNegativeMining`` fills), else None."""
        if self.pairs is None:
            return None
        if self._pair_miner is None:
            if self.train_dataset is None:
                self.setup("fit")
            assert self.train_dataset is not None
            digest = hashlib.sha256()
            for path in self.train_dataset.paths:
                digest.update(f"{path}\n".encode())
            identity = f"{len(self.train_dataset.paths)} images, sha256 {digest.hexdigest()}"
            self._pair_miner = PairMiner(self.train_dataset.labels, self.pairs, self._mining_dataset, identity)
            self._pair_miner.epoch_batches = self._epoch_batches
        return self._pair_miner

    def _epoch_batches(self) -> int | None:
        """Training batches per epoch as the trainer runs them (after ``limit_train_batches``), once known."""
        trainer = self.trainer
        taken = trainer.num_training_batches if trainer is not None else float("inf")
        return int(taken) if math.isfinite(taken) and taken > 0 else None

    def _mining_dataset(self, positions: np.ndarray) -> EvalImageDataset:
        """Deterministic (eval-transform) views of training positions, ``index`` = row in ``positions``."""
        assert self.train_dataset is not None and self.pairs is not None
        paths = [self.train_dataset.paths[int(i)] for i in positions]
        return EvalImageDataset(paths, EvalTransform(self.pairs.mining_max_side), self.policy, fast_decode=True)

    def train_batch_transform(self, batch: dict, step: int, rank: int = 0, world_size: int = 1,
                              draw: int | None = None) -> dict:
        """Patch-shuffle negatives, then Hide-and-Seek, on a training batch (on its device) at ``step``.

        Their random draws follow ``draw``, the count of training batches before this one (``step``
        when ``None``; it differs from the step count under gradient accumulation, whose micro-batches
        must not share masks), and each item's place in the batch over all ``world_size`` ranks
        (groups of a pair batch, items otherwise), so N processes transform as one process with N times
        the batch does, where the sampler deals the step's units round-robin (pairs, shuffle).
        """
        draw = step if draw is None else draw
        group = self.pairs.group_size if self.pairs is not None else 1
        if isinstance(batch, dict) and "shuffled" in batch and self.pairs is not None and bool(batch["shuffled"].any()):
            mask = batch["shuffled"].to(batch["image"].device)
            image = batch["image"].clone()
            perms = step_permutations(self.pairs.seed, draw, int(mask.sum()), self.pairs.shuffle_grid, rank, world_size,
                                      unit=self.pairs.shuffled_negatives)
            image[mask] = shuffle_tiles(image[mask], self.pairs.shuffle_grid, perms)
            batch = {**batch, "image": image}
        if self.hide_and_seek is not None and isinstance(batch, dict) and "label" in batch:
            images = self.hide_and_seek.apply(batch["image"], step, rank, world_size, unit=group, draw=draw)
            batch = {**batch, "image": images}
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            batch = self.train_batch_transform(batch, trainer.global_step, trainer.global_rank, trainer.world_size,
                                               draw=training_batches_before(trainer))
        return batch

    def _eval_set(self, kind: str) -> EvalSet:
        if kind in self._eval_cache:
            return self._eval_cache[kind]
        hp = self.hparams
        st = self._train_state()
        if kind == "retrieval":
            solution_csv, index_csv = self._path(hp.retrieval_solution_csv), self._path(hp.index_csv)
            solution = without_empty_queries(read_retrieval_solution(solution_csv, self.usage, hp.on_error),
                                             solution_csv)
            db_ids = StringArray(read_id_csv(index_csv, hp.on_error))
            known = set(db_ids)
            for qid, gt in solution.items():
                missing = [x for x in gt if x not in known]
                if missing:
                    raise GLDv2FormatError(
                        f"{solution_csv}: query {qid} lists index ids {missing[:3]} absent from {index_csv}")
            query_ids = list(solution)
            paths = ImagePaths(self.root, [("test", query_ids), ("index", db_ids)])
            truth = {"solution": solution, "query_ids": query_ids, "db_ids": db_ids}
            protocol, name = "gldv2_retrieval", "gldv2_retrieval"
        elif kind == "recognition":
            solution = read_recognition_solution(self._path(hp.recognition_solution_csv), self.usage, hp.on_error)
            query_ids, db_ids = list(solution), st.table.ids  # compact: 4.1M ids and labels in two arrays
            paths = ImagePaths(self.root, [("test", query_ids), ("train", db_ids)])
            truth = {"solution": solution, "query_ids": query_ids, "db_labels": st.table.landmark_ids}
            protocol, name = "gldv2_recognition", "gldv2_recognition"
        else:
            query_pos, db_pos = self._holdout_positions(st)
            ids, landmarks = st.table.ids, st.table.landmark_ids
            query_ids, db_ids = list(ids.take(query_pos)), ids.take(db_pos)
            solution = {qid: [int(landmarks[i])] for qid, i in zip(query_ids, query_pos)}
            paths = ImagePaths(self.root, [("train", StringArray.concat(query_ids, db_ids))])
            truth = {"solution": solution, "query_ids": query_ids, "db_labels": landmarks[db_pos]}
            protocol, name = "gldv2_recognition", "gldv2_holdout"
        if not query_ids:
            cause = ("holdout_num_classes and validation_split leave it none" if name == "gldv2_holdout"
                     else f"usage={self.usage!r}")
            raise GLDv2FormatError(f"GLDv2 eval set {name!r} has no queries ({cause})")
        dataset = EvalImageDataset(paths, self.eval_transform, self.policy, fast_decode=hp.eval_fast_decode)
        result = EvalSet(name=name, dataset=dataset, n_queries=len(query_ids), protocol=protocol,
                         ground_truth=truth, image_ids=StringArray.concat(query_ids, db_ids),
                         image_resize=self.eval_transform.resize)
        self._eval_cache[kind] = result
        return result

    def _holdout_positions(self, st: _TrainState) -> tuple[np.ndarray, np.ndarray]:
        """Val images (queries) and train images (database) of a seeded choice of classes."""
        both = np.intersect1d(st.labels[st.train_pos], st.labels[st.val_pos])
        n = self.hparams.holdout_num_classes
        if n is not None and n < both.size:
            both = np.sort(np.random.default_rng(self.hparams.split_seed).choice(both, n, replace=False))
        keep_q = st.val_pos[np.isin(st.labels[st.val_pos], both)]
        keep_db = st.train_pos[np.isin(st.labels[st.train_pos], both)]
        return keep_q, keep_db

    def eval_sets(self, stage: str) -> list[EvalSet]:
        """The EvalSets of ``stage`` (``fit``/``validate`` -> ``val_sets``, ``test``/``predict`` -> ``test_sets``)."""
        if stage in ("fit", "validate"):
            kinds = self.val_sets
        elif stage in ("test", "predict"):
            kinds = self.test_sets
        else:
            raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test or predict")
        return [self._eval_set(kind) for kind in kinds]

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        hp = self.hparams
        return eval_loaders(self.eval_sets(stage), hp.eval_batch_size, hp.num_workers, hp.pin_memory)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("predict")


def present_image_ids(directory: str) -> np.ndarray:
    """Ids of the ``<a>/<b>/<c>/<id>.jpg`` files under ``directory`` (the official layout), as bytes."""
    found: list[str] = []
    for _, _, files in os.walk(directory):
        found.extend(name[:-4] for name in files if name.endswith(".jpg"))
    return np.array(found, dtype=np.bytes_)


def keep_present(table: TrainTable, directory: str, listed_in: str) -> TrainTable:
    """The rows of ``table`` whose image is on disk under ``directory``, in file order (``present_only``)."""
    present = present_image_ids(directory)
    keep = np.flatnonzero(np.isin(table.ids.data, present))
    if keep.size == 0:
        raise GLDv2FormatError(f"present_only: none of the {len(table)} images of {listed_in} is under {directory} "
                               "(download some with `retrieval-lightning download gldv2 --max_archives N`)")
    rank_zero_info(f"present_only: training on the {keep.size} of {len(table)} images of {listed_in} found under "
                   f"{directory}")
    return TrainTable(table.ids.take(keep), table.landmark_ids[keep])
