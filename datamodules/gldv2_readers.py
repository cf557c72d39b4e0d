"""Readers of the Google Landmarks Dataset v2 (cvdfoundation/google-landmark, v2.1) metadata.

Why separate from the datamodule: the CSV formats, the label remap and the validation split are
facts of the dataset that scripts and tests use without Lightning. Image paths follow
``{split}/{id[0]}/{id[1]}/{id[2]}/{id}.jpg`` under ``root``. The readers follow
tensorflow/models ``research/delf``:

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

import numpy as np

from datamodules._compact import StringArray
from retrieval_lightning.errors import DataFormatError

log = logging.getLogger(__name__)

USAGES = ("Public", "Private", "Ignored")
_FIELD_LIMIT = 2**31 - 1


class GLDv2FormatError(DataFormatError):
    """A GLDv2 metadata file does not have the official format (names file and row)."""


@dataclass
class TrainTable:
    """Training images in file order: ids (one compact bytes array: 4.1M in the full set) and
    their original ``landmark_id``."""

    ids: StringArray
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
    handle = open(path, newline="", encoding="utf-8-sig", errors="replace")  # -sig: a spreadsheet's byte-order mark
    reader = csv.reader(handle, strict=True)  # strict: a stray quote is an error, not a field that eats rows
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


def _records(reader: Any, errors: _RowErrors) -> Iterator[tuple[int, list[str]]]:
    """Each record with the line it starts on. No GLDv2 field holds a line break, so a record running over
    several lines is an unclosed quote that swallowed the rows after it: reported, not read as data."""
    while True:
        start = reader.line_num + 1
        failure = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            failure = str(exc)
        if failure is not None:  # reported outside the except: an error raised there would chain the csv one
            errors(start, f"malformed quoting ({failure}; the record ends on line {reader.line_num})")
            continue
        if reader.line_num > start:
            shown = repr(row)[:300]
            errors(start, f"a quoted field runs over lines {start} - {reader.line_num} (an unclosed quote?): {shown}")
            continue
        yield start, row


def _width_error(columns: dict[str, int], row: list[str]) -> str:
    """A row whose field count is not the header's: the header is named, as it may be the one at fault."""
    return f"expected {len(columns)} fields as the header ({','.join(columns)}), got {len(row)}: {row!r}"


#: the longest image id taken (GLDv2's are 16 hex characters): a row whose ids ran together is one "valid" id, and
#: the id table pads every id to the longest (one 2,016-character id made 24 MiB of ids 3 GiB, silently)
MAX_ID_CHARS = 64


def _valid_id(image_id: str) -> bool:
    return 3 <= len(image_id) <= MAX_ID_CHARS and image_id.isascii() and image_id.isalnum()


def _shown(image_id: str) -> str:
    """An id for an error line: a long one cut, with its length."""
    return repr(image_id) if len(image_id) <= 40 else f"{image_id[:40]!r}... ({len(image_id)} characters)"


def read_train_csv(path: str, on_error: str = "raise") -> TrainTable:
    """Read ``train.csv`` (``id,url,landmark_id``); rows are numbered from 1 (the header).

    One pass of the csv module (quoted URLs with commas are fine): about 2 s per million rows on
    a slow 2-core machine. The first bad row raises; ``on_error="skip"`` skips, counts and logs.
    """
    reader, col, handle = _open_csv(path, ("id", "url", "landmark_id"))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    landmarks: list[int] = []
    lines: list[int] = []
    i_id, i_lm, width = col["id"], col["landmark_id"], len(col)
    with handle:
        for line, row in _records(reader, errors):
            if len(row) != width:
                errors(line, _width_error(col, row))
                continue
            image_id = row[i_id]
            if not _valid_id(image_id):
                errors(line, f"bad image id {_shown(image_id)} (alphanumeric, 3 - {MAX_ID_CHARS} characters)")
                continue
            try:
                landmark = int(row[i_lm])
            except ValueError:
                errors(line, f"landmark_id {row[i_lm]!r} is not an integer")
                continue
            ids.append(image_id)
            landmarks.append(landmark)
            lines.append(line)
    repeats = _repeated(ids)
    for position, first in repeats.items():  # one image under two rows: maybe two classes, maybe both splits
        errors(lines[position], f"image id {ids[position]!r} listed again (first on row {lines[first]})")
    if repeats:
        kept = [i for i in range(len(ids)) if i not in repeats]
        ids, landmarks = [ids[i] for i in kept], [landmarks[i] for i in kept]
    errors.finish()
    return TrainTable(StringArray(ids), np.asarray(landmarks, dtype=np.int64))


def _repeated(ids: list[str]) -> dict[int, int]:
    """Each position whose id occurs earlier in ``ids``, mapped to that first position. Found through the
    ids' hashes: a set of train.csv's four million strings would cost more memory than the table."""
    hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    first: dict[str, int] = {}
    out: dict[int, int] = {}
    for position in np.unique(np.concatenate([order[same], order[same + 1]])).tolist():  # in file order
        out_of = first.setdefault(ids[position], position)
        if out_of != position:
            out[position] = out_of
    return out


def read_train_clean_csv(path: str, on_error: str = "raise") -> TrainTable:
    """Read ``train_clean.csv`` (``landmark_id,images``, images space-separated), one entry per image."""
    reader, col, handle = _open_csv(path, ("landmark_id", "images"))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    landmarks: list[int] = []
    seen: set[str] = set()
    i_lm, i_im, width = col["landmark_id"], col["images"], len(col)
    with handle:
        for line, row in _records(reader, errors):
            if len(row) != width:
                errors(line, _width_error(col, row))
                continue
            try:
                landmark = int(row[i_lm])
            except ValueError:
                errors(line, f"landmark_id {row[i_lm]!r} is not an integer")
                continue
            images = row[i_im].split()
            bad = [x for x in images if not _valid_id(x)] or (["<none>"] if not images else [])
            if bad:
                errors(line, f"bad image id(s) {', '.join(map(_shown, bad[:3]))} for landmark {landmark} "
                             f"(alphanumeric, 3 - {MAX_ID_CHARS} characters)")
                continue
            dup = [x for x in images if x in seen]
            if dup or len(set(images)) != len(images):
                errors(line, f"image id(s) listed twice: {(dup or images)[:3]!r}")
                continue
            seen.update(images)
            ids.extend(images)
            landmarks.extend([landmark] * len(images))
    errors.finish()
    return TrainTable(StringArray(ids), np.asarray(landmarks, dtype=np.int64))


def read_id_csv(path: str, on_error: str = "raise") -> list[str]:
    """Read the ``id`` column of ``index.csv`` / ``test.csv``."""
    reader, col, handle = _open_csv(path, ("id",))
    errors = _RowErrors(path, on_error)
    ids: list[str] = []
    i_id = col["id"]
    with handle:
        for line, row in _records(reader, errors):
            if len(row) <= i_id or not _valid_id(row[i_id]):
                errors(line, f"bad image id in {row!r}")
                continue
            ids.append(row[i_id])
    errors.finish()
    return ids


def selected_usages(usage: str) -> set[str]:
    """The solution ``Usage`` tags that ``usage`` (``Public``, ``Private`` or ``All``) selects; raises otherwise."""
    if usage == "All":
        return {"Public", "Private"}
    if usage not in ("Public", "Private"):
        raise ValueError(f"usage must be 'Public', 'Private' or 'All', got {usage!r}")
    return {usage}


def _read_solution(path: str, column: str, usage: str, parse, on_error: str) -> dict:
    wanted = selected_usages(usage)
    reader, col, handle = _open_csv(path, ("id", column, "Usage"))
    errors = _RowErrors(path, on_error)
    solution: dict = {}
    i_id, i_gt, i_use, width = col["id"], col[column], col["Usage"], len(col)
    with handle:
        for line, row in _records(reader, errors):
            if len(row) != width:
                errors(line, _width_error(col, row))
                continue
            tag = row[i_use]
            if tag not in USAGES:
                errors(line, f"Usage {tag!r} is not one of {USAGES}")
                continue
            if tag not in wanted:
                continue
            if not _valid_id(row[i_id]) or row[i_id] in solution:
                errors(line, f"bad or repeated test id {row[i_id]!r}")
                continue
            try:
                solution[row[i_id]] = parse(row[i_gt])
            except ValueError as exc:
                errors(line, f"{column} {row[i_gt]!r}: {exc}")
    errors.finish()
    return solution


def _parse_retrieval(field: str) -> list[str]:
    if field.strip() == "None":
        return []
    images = field.split()
    bad = next((x for x in images if not _valid_id(x)), None)
    if bad is not None:
        raise ValueError(f"index id {_shown(bad)} is not 3 to {MAX_ID_CHARS} ASCII letters and digits")
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
        self._ids = [StringArray(ids).data for _, ids in segments]
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
