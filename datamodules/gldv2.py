"""Google Landmarks Dataset v2 (cvdfoundation/google-landmark, v2.1) readers and datamodule.

Layout under ``root`` (the official download): ``train/``, ``index/``, ``test/`` image trees with
``{split}/{id[0]}/{id[1]}/{id[2]}/{id}.jpg`` and the metadata CSVs (paths relative to ``root``
unless absolute). The readers follow tensorflow/models ``research/delf``:

- ``train_clean.csv`` (``landmark_id,images``): labels remapped to ``0..N-1`` in sorted order of
  ``landmark_id`` (``build_image_dataset.py``); ``train.csv`` (``id,url,landmark_id``) gets the
  same remap (the official code keeps raw ids for the full set; the remap keeps the classifier
  contiguous whatever ids the file holds).
- validation split: per class, in order of the class's first appearance, a permutation from one
  ``RandomState(MT19937(SeedSequence(seed)))`` shuffles the class's images and the first
  ``max(1, int(fraction * n))`` go to validation. So a class with a single image has it in
  validation and none in training (official behaviour, kept on purpose).
- solutions (``dataset_file_io.ReadSolution``): ``Usage`` is ``Public``, ``Private`` or ``Ignored``
  (skipped); anything else is an error. Retrieval ``images`` may be the literal ``None`` (read as
  no ground truth); recognition ``landmarks`` may be empty (a non-landmark image).

The official full-set reader lists images by globbing the image directory; this one keeps the CSV
order (the file system order is not reproducible).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TextIO

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules._transforms import EvalImageDataset, EvalTransform, TrainTransform, collate_eval
from retrieval_lightning.data.io import LoadPolicy, load_image_or_skip
from retrieval_lightning.data.types import EvalSet

log = logging.getLogger(__name__)

USAGES = ("Public", "Private", "Ignored")
EVAL_SET_KINDS = ("retrieval", "recognition", "holdout")
_FIELD_LIMIT = 2**31 - 1


class GLDv2FormatError(ValueError):
    """A GLDv2 metadata file does not have the official format (names file and row)."""


@dataclass
class TrainTable:
    """Training images in file order: ids and their original ``landmark_id``."""

    ids: list[str]
    landmark_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class _RowErrors:
    """Raise on the first malformed row, or (``on_error="skip"``) count, log and go on."""

    def __init__(self, path: str, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.on_error, self.count = path, on_error, 0

    def __call__(self, row: int, message: str) -> None:
        text = f"{self.path}: row {row}: {message}"
        if self.on_error == "raise":
            raise GLDv2FormatError(text)
        self.count += 1
        if self.count <= 10:
            log.warning("skipping malformed row: %s", text)

    def finish(self) -> None:
        if self.count:
            log.warning("%s: skipped %d malformed rows", self.path, self.count)


def _open_csv(path: str, required: Sequence[str]) -> tuple[Any, dict[str, int], TextIO]:
    """Open a CSV, check its header holds ``required`` columns, return (reader, column index, file).

    ``train_clean.csv`` lists thousands of ids in one field for the largest landmarks, beyond the
    csv module's default 128 KiB field limit, so the (process-wide) limit is raised first.
    """
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    handle = open(path, newline="", encoding="utf-8", errors="replace")
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        handle.close()
        raise GLDv2FormatError(f"{path}: row 1: empty file, expected header {','.join(required)}")
    columns = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in columns]
    if missing:
        handle.close()
        raise GLDv2FormatError(
            f"{path}: row 1: header {header!r} lacks column(s) {missing} (expected {','.join(required)})"
        )
    return reader, columns, handle


def _valid_id(image_id: str) -> bool:
    return len(image_id) >= 3 and image_id.isascii() and image_id.isalnum()


def read_train_csv(path: str, on_error: str = "raise") -> TrainTable:
    """Read ``train.csv`` (``id,url,landmark_id``); rows are numbered from 1 (the header).

    One pass of the csv module (quoted URLs with commas are fine): about 2 s per million rows on
    a slow 2-core machine. The first bad row raises; ``on_error="skip"`` skips, counts and logs.
    """
    reader, col, handle = _open_csv(path, ("id", "url", "landmark_id"))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    landmarks: list[int] = []
    i_id, i_lm, width = col["id"], col["landmark_id"], len(col)
    with handle:
        for row in reader:
            if len(row) != width:
                errors(reader.line_num, f"expected {width} fields, got {len(row)}: {row!r}")
                continue
            image_id = row[i_id]
            if not _valid_id(image_id):
                errors(reader.line_num, f"bad image id {image_id!r} (alphanumeric, >= 3 chars)")
                continue
            try:
                landmark = int(row[i_lm])
            except ValueError:
                errors(reader.line_num, f"landmark_id {row[i_lm]!r} is not an integer")
                continue
            ids.append(image_id)
            landmarks.append(landmark)
    errors.finish()
    return TrainTable(ids, np.asarray(landmarks, dtype=np.int64))


def read_train_clean_csv(path: str, on_error: str = "raise") -> TrainTable:
    """Read ``train_clean.csv`` (``landmark_id,images``, images space-separated), one entry per image."""
    reader, col, handle = _open_csv(path, ("landmark_id", "images"))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    landmarks: list[int] = []
    seen: set[str] = set()
    i_lm, i_im, width = col["landmark_id"], col["images"], len(col)
    with handle:
        for row in reader:
            if len(row) != width:
                errors(reader.line_num, f"expected {width} fields, got {len(row)}: {row!r}")
                continue
            try:
                landmark = int(row[i_lm])
            except ValueError:
                errors(reader.line_num, f"landmark_id {row[i_lm]!r} is not an integer")
                continue
            images = row[i_im].split()
            bad = [x for x in images if not _valid_id(x)] or (["<none>"] if not images else [])
            if bad:
                errors(reader.line_num, f"bad image id(s) {bad[:3]!r} for landmark {landmark}")
                continue
            dup = [x for x in images if x in seen]
            if dup or len(set(images)) != len(images):
                errors(reader.line_num, f"image id(s) listed twice: {(dup or images)[:3]!r}")
                continue
            seen.update(images)
            ids.extend(images)
            landmarks.extend([landmark] * len(images))
    errors.finish()
    return TrainTable(ids, np.asarray(landmarks, dtype=np.int64))


def read_id_csv(path: str, on_error: str = "raise") -> list[str]:
    """Read the ``id`` column of ``index.csv`` / ``test.csv``."""
    reader, col, handle = _open_csv(path, ("id",))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    i_id = col["id"]
    with handle:
        for row in reader:
            if len(row) <= i_id or not _valid_id(row[i_id]):
                errors(reader.line_num, f"bad image id in {row!r}")
                continue
            ids.append(row[i_id])
    errors.finish()
    return ids


def _usages(usage: str) -> set[str]:
    if usage == "All":
        return {"Public", "Private"}
    if usage not in ("Public", "Private"):
        raise ValueError(f"usage must be 'Public', 'Private' or 'All', got {usage!r}")
    return {usage}


def _read_solution(path: str, column: str, usage: str, parse, on_error: str) -> dict:
    wanted = _usages(usage)
    reader, col, handle = _open_csv(path, ("id", column, "Usage"))
    errors = _RowErrors(path, on_error)
    solution: dict = {}
    i_id, i_gt, i_use, width = col["id"], col[column], col["Usage"], len(col)
    with handle:
        for row in reader:
            if len(row) != width:
                errors(reader.line_num, f"expected {width} fields, got {len(row)}: {row!r}")
                continue
            tag = row[i_use]
            if tag not in USAGES:
                errors(reader.line_num, f"Usage {tag!r} is not one of {USAGES}")
                continue
            if tag not in wanted:
                continue
            if not _valid_id(row[i_id]) or row[i_id] in solution:
                errors(reader.line_num, f"bad or repeated test id {row[i_id]!r}")
                continue
            try:
                solution[row[i_id]] = parse(row[i_gt])
            except ValueError as exc:
                errors(reader.line_num, f"{column} {row[i_gt]!r}: {exc}")
    errors.finish()
    return solution


def _parse_retrieval(field: str) -> list[str]:
    if field.strip() == "None":
        return []
    images = field.split()
    if not all(_valid_id(x) for x in images):
        raise ValueError("index ids must be alphanumeric with >= 3 chars")
    return images


def _parse_recognition(field: str) -> list[int]:
    return [int(x) for x in field.split()]


def read_retrieval_solution(path: str, usage: str = "Private", on_error: str = "raise") -> dict[str, list[str]]:
    """``retrieval_solution_v2.1.csv`` -> ``{test id: [index ids]}`` for one Usage (or ``"All"``)."""
    return _read_solution(path, "images", usage, _parse_retrieval, on_error)


def read_recognition_solution(path: str, usage: str = "Private", on_error: str = "raise") -> dict[str, list[int]]:
    """``recognition_solution_v2.1.csv`` -> ``{test id: [landmark ids]}`` (empty: non-landmark)."""
    return _read_solution(path, "landmarks", usage, _parse_recognition, on_error)


def remap_labels(landmark_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``0..N-1`` in sorted order of ``landmark_id``; returns (labels, landmark id per label)."""
    classes, labels = np.unique(np.asarray(landmark_ids, dtype=np.int64), return_inverse=True)
    return labels.astype(np.int64), classes


def split_train_val(labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split of ``build_image_dataset.py``; returns (train positions, val positions).

    Classes are visited in order of first appearance; each is shuffled by one shared
    ``RandomState(MT19937(SeedSequence(seed)))`` and its first ``max(1, int(fraction * n))``
    images go to validation. Outputs are concatenated class by class, as the official code does.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
    train_parts, val_parts = [], []
    for k in np.argsort(first, kind="stable"):
        members = order[starts[k] : starts[k] + counts[k]]
        perm = np.arange(counts[k])
        rs.shuffle(perm)
        cut = max(1, int(fraction * int(counts[k])))
        val_parts.append(members[perm[:cut]])
        train_parts.append(members[perm[cut:]])
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(train_parts) if train_parts else empty,
            np.concatenate(val_parts) if val_parts else empty)


def image_path(root: str, split: str, image_id: str) -> str:
    """``{root}/{split}/{id[0]}/{id[1]}/{id[2]}/{id}.jpg``."""
    return os.path.join(root, split, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


class ImagePaths(SequenceABC):
    """Image paths of consecutive ``(split, ids)`` segments, built on access.

    Ids are held as one fixed-width bytes array per segment instead of millions of Python
    strings, so forked DataLoader workers do not copy them page by page as they read.
    """

    def __init__(self, root: str, segments: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.root = root
        self._splits = [split for split, _ in segments]
        self._ids = [np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=bytes)
                     for _, ids in segments]
        self._ends = np.cumsum([len(ids) for ids in self._ids])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range [0, {len(self)})")
        seg = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[seg - 1]) if seg else 0
        image_id = self._ids[seg][index - start].decode("ascii")
        return image_path(self.root, self._splits[seg], image_id)


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


@dataclass
class _TrainState:
    """The chosen training set once read: table, labels 0..N-1, their landmark ids, the split."""

    table: TrainTable
    labels: np.ndarray
    classes: np.ndarray
    train_pos: np.ndarray
    val_pos: np.ndarray


class GLDv2TrainDataset(Dataset):
    """Training images: ``{"image": float (3,S,S), "label": int, "index": int}``.

    With a skip policy an unreadable image is replaced by the next readable one (index order),
    so a batch never shrinks; the policy counts and logs the skips.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: TrainTransform,
                 policy: LoadPolicy, max_side: int | None = None) -> None:
        self.paths, self.labels = paths, np.asarray(labels, dtype=np.int64)
        self.transform, self.policy, self.max_side = transform, policy, max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        for step in range(min(len(self.paths), 50)):
            i = (int(index) + step) % len(self.paths)
            image = load_image_or_skip(self.paths[i], self.policy, max_side=self.max_side)
            if image is not None:
                return {"image": self.transform(image), "label": int(self.labels[i]), "index": i}
        raise RuntimeError(f"no readable training image near index {index} (first tried {self.paths[index]})")


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
    :class:`ClassBalancedSampler` (``balance_power``) instead of plain shuffling; Lightning shards
    either under DDP. Eval images are decoded at reduced size when they exceed ``eval_max_side``
    (see :class:`~datamodules._transforms.EvalImageDataset`); ``train_max_side`` does the same
    before the random crop. ``on_error="skip"`` skips malformed CSV rows and unreadable images,
    counting and logging them.
    """

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
        eval_max_side: int | None = 1024,
        eval_upscale: bool = False,
        sampling: str = "shuffle",
        balance_power: float = 0.0,
        sampler_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_sets: list[str] | None = None,
        test_sets: list[str] | None = None,
        holdout_num_classes: int | None = 1000,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if train_set not in ("clean", "full"):
            raise ValueError(f"train_set must be 'clean' or 'full', got {train_set!r}")
        if sampling not in ("shuffle", "balanced"):
            raise ValueError(f"sampling must be 'shuffle' or 'balanced', got {sampling!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
        _usages(usage)
        self.val_sets = list(val_sets) if val_sets is not None else ["holdout"]
        self.test_sets = list(test_sets) if test_sets is not None else ["retrieval", "recognition"]
        for kind in self.val_sets + self.test_sets:
            if kind not in EVAL_SET_KINDS:
                raise ValueError(f"unknown GLDv2 eval set {kind!r}; choose from {EVAL_SET_KINDS}")
        if "holdout" in self.val_sets + self.test_sets and validation_split <= 0:
            raise ValueError("the 'holdout' eval set needs validation_split > 0")
        self.save_hyperparameters()
        self.root, self.train_set, self.usage = root, train_set, usage
        self.policy = LoadPolicy(on_error=on_error)
        self.train_transform = TrainTransform(image_size, interpolation=interpolation)
        self.eval_transform = EvalTransform(eval_max_side, upscale=eval_upscale)
        self._state: _TrainState | None = None
        self._eval_cache: dict[str, EvalSet] = {}
        self.train_dataset: GLDv2TrainDataset | None = None

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
        if self.train_set == "clean":
            table = read_train_clean_csv(self._path(hp.train_clean_csv), hp.on_error)
        else:
            table = read_train_csv(self._path(hp.train_csv), hp.on_error)
        if len(table) == 0:
            raise GLDv2FormatError(f"no training images listed for train_set={self.train_set!r}")
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
        return [st.table.ids[i] for i in (st.train_pos if which == "train" else st.val_pos)]

    def setup(self, stage: str | None = None) -> None:
        st = self._train_state()
        if stage in (None, "fit") and self.train_dataset is None:
            if st.train_pos.size == 0:
                raise GLDv2FormatError("the training split is empty (every class went to validation)")
            self.train_dataset = GLDv2TrainDataset(
                ImagePaths(self.root, [("train", [st.table.ids[i] for i in st.train_pos])]),
                st.labels[st.train_pos], self.train_transform, self.policy, self.hparams.train_max_side,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        hp = self.hparams
        sampler = None
        if hp.sampling == "balanced":
            sampler = ClassBalancedSampler(self.train_dataset.labels, hp.balance_power, seed=hp.sampler_seed)
        return DataLoader(
            self.train_dataset, batch_size=hp.batch_size, shuffle=sampler is None, sampler=sampler,
            drop_last=True, num_workers=hp.num_workers, pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
        )

    def _eval_set(self, kind: str) -> EvalSet:
        if kind in self._eval_cache:
            return self._eval_cache[kind]
        hp = self.hparams
        st = self._train_state()
        if kind == "retrieval":
            solution_csv, index_csv = self._path(hp.retrieval_solution_csv), self._path(hp.index_csv)
            solution = read_retrieval_solution(solution_csv, self.usage, hp.on_error)
            db_ids = read_id_csv(index_csv, hp.on_error)
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
            query_ids, db_ids = list(solution), list(st.table.ids)
            paths = ImagePaths(self.root, [("test", query_ids), ("train", db_ids)])
            truth = {"solution": solution, "query_ids": query_ids, "db_labels": st.table.landmark_ids.tolist()}
            protocol, name = "gldv2_recognition", "gldv2_recognition"
        else:
            query_pos, db_pos = self._holdout_positions(st)
            ids, landmarks = st.table.ids, st.table.landmark_ids
            query_ids = [ids[i] for i in query_pos]
            db_ids = [ids[i] for i in db_pos]
            solution = {ids[i]: [int(landmarks[i])] for i in query_pos}
            paths = ImagePaths(self.root, [("train", query_ids + db_ids)])
            truth = {"solution": solution, "query_ids": query_ids, "db_labels": landmarks[db_pos].tolist()}
            protocol, name = "gldv2_recognition", "gldv2_holdout"
        if not query_ids:
            raise GLDv2FormatError(f"GLDv2 eval set {name!r} has no queries (usage={self.usage!r})")
        dataset = EvalImageDataset(paths, self.eval_transform, self.policy, fast_decode=True)
        result = EvalSet(name=name, dataset=dataset, n_queries=len(query_ids), protocol=protocol,
                         ground_truth=truth, image_ids=query_ids + db_ids)
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
        return [
            DataLoader(s.dataset, batch_size=hp.eval_batch_size, shuffle=False, collate_fn=collate_eval,
                       num_workers=hp.num_workers, pin_memory=hp.pin_memory)
            for s in self.eval_sets(stage)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("predict")
