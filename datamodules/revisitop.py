"""Revisited Oxford and Paris (revisitop) ground truth, query crops, +1M distractors, datamodule.

The ground truth is ``gnd_<name>.pkl`` (filipradenovic/revisitop, as cnnimageretrieval-pytorch
reads it): a dict with ``imlist`` (database names, no extension), ``qimlist`` (query names) and
``gnd`` (per query ``bbx`` = [x1, y1, x2, y2] and 0-based ``easy``/``hard``/``junk`` indices).
Images are ``<dataset dir>/jpg/<name>.jpg``; the dataset dir is ``<root>/<name>`` or, as the
official ``download.py`` lays it out, ``<root>/datasets/<name>``.

Queries are cropped to ``bbx`` with PIL's ``crop`` (coordinates rounded half-to-even) and resized
by the factor the full image would get, as DELG's ``extract_features.py`` does; database images
are used whole. ``revisitop1m.txt`` lists distractors by relative path with extension; they are
appended after the database so ground-truth indices stay valid. Names and paths are held
compactly (:mod:`datamodules._compact`): the +1M set is one bytes array, not a million strings.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from datamodules._compact import JoinedPaths, StringArray
from datamodules._loader_options import check_loader_options
from datamodules._transforms import BOX_FRAMES, EvalImageDataset, EvalTransform, datamodule_policy
from retrieval_lightning.data.loaders import eval_loaders
from retrieval_lightning.errors import DataFormatError
from retrieval_lightning.data.types import EvalSet

GT_KEYS = ("easy", "hard", "junk")


class RevisitopFormatError(DataFormatError):
    """A revisitop ground-truth or list file is malformed (names the file, query and key)."""


@dataclass
class RevisitopData:
    """One revisited dataset: names, validated ground truth and where its images are."""

    name: str
    directory: str
    gnd_path: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, list]]

    def image_path(self, image_name: str) -> str:
        return os.path.join(self.directory, "jpg", f"{image_name}.jpg")

    @property
    def query_paths(self) -> list[str]:
        return [self.image_path(q) for q in self.qimlist]

    @property
    def database_paths(self) -> list[str]:
        return [self.image_path(d) for d in self.imlist]


def find_dataset_dir(root: str, name: str) -> str:
    """``<root>/<name>`` if it holds ``gnd_<name>.pkl``, else ``<root>/datasets/<name>``."""
    candidates = [os.path.join(root, name), os.path.join(root, "datasets", name)]
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, f"gnd_{name}.pkl")):
            return directory
    tried = ", ".join(os.path.join(c, f"gnd_{name}.pkl") for c in candidates)
    raise FileNotFoundError(f"revisitop dataset {name!r}: no ground truth found (tried {tried}); fetch it with "
                            f"`retrieval-lightning download revisitop --datasets {name} --root <root>`")


def _as_index_list(value: Any, where: str, n_db: int) -> list[int]:
    items = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(items, (int, float)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise RevisitopFormatError(f"{where}: expected a list of indices, got {type(value).__name__}")
    out = []
    for v in items:
        if isinstance(v, bool) or not (
            isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())
        ):
            raise RevisitopFormatError(f"{where}: index {v!r} is not an integer")
        i = int(v)
        if not 0 <= i < n_db:
            raise RevisitopFormatError(f"{where}: index {i} out of range [0, {n_db})")
        out.append(i)
    return out


def _as_box(value: Any, where: str) -> list[float]:
    try:
        box = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError):
        raise RevisitopFormatError(f"{where}: bbx must be 4 numbers, got {value!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise RevisitopFormatError(f"{where}: bbx must be 4 finite numbers [x1, y1, x2, y2], got {box}")
    if box[2] < box[0] or box[3] < box[1]:
        raise RevisitopFormatError(f"{where}: bbx {box} has x2 < x1 or y2 < y1")
    return box


def validate_gnd(cfg: Any, path: str) -> tuple[list[str], list[str], list[dict[str, list]]]:
    """Check a loaded ``gnd_*.pkl`` dict; returns (imlist, qimlist, gnd) as plain lists."""
    if not isinstance(cfg, dict):
        raise RevisitopFormatError(f"{path}: expected a dict, got {type(cfg).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise RevisitopFormatError(f"{path}: missing key {key!r} (has {sorted(cfg)})")
        if not isinstance(cfg[key], (list, tuple, np.ndarray)):
            raise RevisitopFormatError(f"{path}: key {key!r} must be a list, got {type(cfg[key]).__name__}")
    imlist, qimlist = [str(x) for x in cfg["imlist"]], [str(x) for x in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(qimlist):
        raise RevisitopFormatError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(qimlist)} queries")
    gnd = []
    for q, entry in enumerate(cfg["gnd"]):
        label = f"{path}: query {q} ({qimlist[q]})"
        if not isinstance(entry, dict):
            raise RevisitopFormatError(f"{label}: expected a dict, got {type(entry).__name__}")
        for key in ("bbx",) + GT_KEYS:
            if key not in entry:
                raise RevisitopFormatError(f"{label}: missing key {key!r}")
        clean = {key: _as_index_list(entry[key], f"{label}: key {key!r}", len(imlist)) for key in GT_KEYS}
        clean["bbx"] = _as_box(entry["bbx"], f"{label}: key 'bbx'")
        gnd.append(clean)
    _warn_repeated_positives(gnd, qimlist, path)
    return imlist, qimlist, gnd


def _warn_repeated_positives(gnd: list[dict[str, list]], qimlist: list[str], path: str) -> None:
    """A database image listed twice among a query's positives (within ``easy`` or ``hard``, or in both)
    counts twice in the official ``compute_map`` (its positives are concatenated) and once here (a set):
    said, since the two mAPs then differ. The published files are not expected to hold any."""
    repeated = []
    for q, entry in enumerate(gnd):
        values, counts = np.unique(np.asarray(entry["easy"] + entry["hard"], dtype=np.int64), return_counts=True)
        if (counts > 1).any():
            repeated.append((q, values[counts > 1].tolist()))
    if repeated:
        q, ids = repeated[0]
        warnings.warn(f"{path}: {len(repeated)} queries list a database image twice among their positives (first: "
                      f"query {q} ({qimlist[q]}), images {ids[:5]}); the official revisitop evaluation counts such "
                      "an image twice, this one once, so their mAPs differ", stacklevel=2)


_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
    ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"),  # arrays' bytes in protocols 0 - 2
    ("collections", "OrderedDict"),
}


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a ground-truth file never runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (ground truth holds only lists and arrays)")


def load_revisitop(root: str, name: str) -> RevisitopData:
    """Read and validate ``gnd_<name>.pkl`` under ``root`` (see :func:`find_dataset_dir`)."""
    directory = find_dataset_dir(root, name)
    path = os.path.join(directory, f"gnd_{name}.pkl")
    with open(path, "rb") as handle:
        try:
            cfg = _GroundTruthUnpickler(handle).load()
        except Exception as exc:  # only allowed globals run, but they may be called with bad arguments
            raise RevisitopFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    imlist, qimlist, gnd = validate_gnd(cfg, path)
    return RevisitopData(name, directory, path, imlist, qimlist, gnd)


def read_distractor_list(path: str, limit: int | None = None) -> StringArray:
    """Relative image paths (with extension) from ``revisitop1m.txt``, in file order; the first ``limit``."""
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"max_distractors must be >= 0 or None, got {limit!r}")
    if limit == 0:
        return StringArray()
    names: list[str] = []
    line_no = 0
    with open(path, encoding="utf-8") as handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                entry = line.strip()
                if not entry:
                    continue
                if os.path.isabs(entry) or ".." in entry.split("/"):
                    raise RevisitopFormatError(f"{path}: line {line_no}: expected a relative path, got {entry!r}")
                names.append(entry)
                if limit is not None and len(names) >= limit:
                    break
        except UnicodeDecodeError as err:  # decoded a block at a time: the line is where reading stopped
            raise RevisitopFormatError(f"{path}: not UTF-8 text (about line {line_no + 1}: {err.reason})") from None
    if not names:
        raise RevisitopFormatError(f"{path}: lists no distractor images")
    return StringArray(names)


class RevisitopDataModule(L.LightningDataModule):
    """Evaluation on revisited Oxford/Paris (optionally +1M distractors); no training data.

    One :class:`EvalSet` per entry of ``datasets`` (protocol ``revisitop``), for every stage:
    70 cropped queries, then the database, then any distractors. ``ground_truth`` is the list
    of per-query ``{"easy", "hard", "junk", "bbx"}`` dicts (0-based database indices).
    ``distractors`` points at ``revisitop1m.txt``; its images are under ``distractors_root``
    (default: ``jpg/`` next to the list, the official layout). ``max_distractors`` keeps the first
    N (a scaled-down run; the set is then named ``+<N>d`` instead of ``+1m``; 0 adds none and
    keeps the plain name). ``box_rounding`` makes query boxes integer: ``round`` (PIL's crop, the
    revisitop reference and DELG) or ``truncate`` (``int()``, the official CVNet tester: use it to
    match CVNet's published numbers). ``box_frame``: ``stored`` (default; the revisitop reference
    crops the stored pixels, ignoring EXIF orientation) or ``upright`` (the official CVNet tester:
    ``cv2.imread`` turns the image upright per EXIF before the crop); only EXIF-rotated queries differ.
    """

    def __init__(
        self,
        root: str = "data",
        datasets: list[str] | None = None,
        distractors: str | None = None,
        distractors_root: str | None = None,
        max_distractors: int | None = None,
        max_side: int | None = 1024,
        upscale: bool = False,
        crop_queries: bool = True,
        box_rounding: str = "round",
        box_frame: str = "stored",
        eval_batch_size: int = 8,
        num_workers: int = 4,
        pin_memory: bool = False,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = os.path.expanduser(root)  # a config's ~/data: no shell expands it there
        self.datasets = list(datasets) if datasets is not None else ["roxford5k", "rparis6k"]
        if not self.datasets:
            raise ValueError("RevisitopDataModule needs at least one dataset name")
        check_loader_options(eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.policy = datamodule_policy(on_error)
        self.transform = EvalTransform(max_side, upscale=upscale, box_rounding=box_rounding)
        if box_frame not in BOX_FRAMES:
            raise ValueError(f"box_frame must be one of {BOX_FRAMES}, got {box_frame!r}")
        unused = [name for name, value in (("max_distractors", max_distractors), ("distractors_root", distractors_root))
                  if value is not None]
        if distractors is None and unused:
            raise ValueError(f"{' and '.join(unused)} set without distractors (the revisitop1m list, "
                             f"e.g. <root>/datasets/revisitop1m/revisitop1m.txt): the run would have no distractors")
        self._sets: list[EvalSet] | None = None

    @classmethod
    def download(
        cls,
        root: str,
        datasets: str = "roxford5k,rparis6k",
        base_url: dict[str, str] | None = None,
        workers: int = 4,
        max_archives: int | None = None,
        keep_archives: bool = False,
    ) -> str:
        """Download Revisited Oxford/Paris (and revisitop1m) into ``root`` in the official layout.

        ``datasets`` is a comma-separated subset of roxford5k,rparis6k,revisitop1m; ``base_url``
        overrides hosts by key (oxford, paris, gnd, revisitop1m); ``max_archives`` fetches only the
        first N of revisitop1m's 100 archives (Oxford and Paris always come whole).
        """
        from datamodules.downloads import download_revisitop

        summary = download_revisitop(root, datasets=datasets, base_url=base_url or {}, workers=workers,
                                     max_archives=max_archives, keep_archives=keep_archives)
        return str(summary)

    @property
    def num_classes(self) -> int:
        """0: revisitop is for evaluation only."""
        return 0

    def _distractors(self) -> tuple[StringArray, str]:
        hp = self.hparams
        if hp.distractors is None:
            return StringArray(), ""
        listed = os.path.expanduser(hp.distractors)
        names = read_distractor_list(listed, hp.max_distractors)
        return names, os.path.expanduser(hp.distractors_root or os.path.join(os.path.dirname(listed), "jpg"))

    def _build(self) -> list[EvalSet]:
        d_names, d_base = self._distractors()
        suffix = ""
        if len(d_names):
            suffix = "+1m" if self.hparams.max_distractors is None else f"+{len(d_names)}d"
        sets = []
        for name in self.datasets:
            data = load_revisitop(self.root, name)
            boxes = [g["bbx"] for g in data.gnd] if self.hparams.crop_queries else None
            jpg = os.path.join(data.directory, "jpg")
            paths = JoinedPaths([(jpg, data.qimlist, ".jpg"), (jpg, data.imlist, ".jpg"), (d_base, d_names, "")])
            dataset = EvalImageDataset(paths, self.transform, self.policy, boxes=boxes,
                                       box_frame=self.hparams.box_frame)
            sets.append(EvalSet(
                name=name + suffix, dataset=dataset, n_queries=len(data.qimlist), protocol="revisitop",
                ground_truth=data.gnd, image_ids=StringArray.concat(data.qimlist, data.imlist, d_names),
                image_resize=self.transform.resize,
            ))
        return sets

    def eval_sets(self, stage: str) -> list[EvalSet]:
        """The same sets for ``fit``/``validate``/``test``/``predict``, in ``datasets`` order."""
        if stage not in ("fit", "validate", "test", "predict"):
            raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test or predict")
        if self._sets is None:
            self._sets = self._build()
        return self._sets

    def setup(self, stage: str | None = None) -> None:
        self.eval_sets(stage or "test")

    def train_dataloader(self) -> DataLoader:
        raise RuntimeError(
            "RevisitopDataModule has no training data (revisited Oxford/Paris are evaluation "
            "benchmarks); train on another datamodule, e.g. gldv2, and evaluate with this one."
        )

    def _loaders(self, stage: str) -> list[DataLoader]:
        hp = self.hparams
        return eval_loaders(self.eval_sets(stage), hp.eval_batch_size, hp.num_workers, hp.pin_memory)

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._loaders("predict")
