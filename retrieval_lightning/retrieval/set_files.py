"""What ``extract`` writes beside an eval set's feature store, so ``search`` needs nothing else.

- ``<output_dir>/<set>/items.tsv`` names every item (``index, id, path``; absolute paths, so ``search`` finds
  them from any directory), for the results table and picture;
- ``<output_dir>/<set>/set.json`` says how many of the first items are the set's queries (``search`` ranks
  the database only: a query is stored as its box crop, and GLDv2's test images are no index results);
- ``<output_dir>/<set>/image_resize.json`` says how the set's images were sized, so a new query is sized
  the same way (a query at another size than its database is another descriptor: a DELG demo database
  image searched at its stored 256 px instead of the store's 224 px scored 0.98 against itself, with
  half the inliers).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from array import array
from pathlib import Path
from typing import Iterable, Iterator

from retrieval_lightning.data.types import EvalSet, ImageResize
from retrieval_lightning.errors import DataFormatError
from retrieval_lightning.retrieval.workdirs import atomic_write

ITEMS = "items.tsv"
IMAGE_RESIZE = "image_resize.json"
SET_RECORD = "set.json"


def _replace_atomically(path: Path, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` so a reader never sees half a file (``items.tsv``: 100 MB for +1M items, so
    no fsync of its own and no part left if it stops half-way)."""
    atomic_write(path, (line + "\n" for line in lines), fsync=False)


def _item_lines(spec: EvalSet) -> Iterator[str]:
    paths = getattr(spec.dataset, "paths", None)
    yield "index\tid\tpath"
    for i in range(len(spec.dataset)):  # type: ignore[arg-type]
        name = spec.image_ids[i] if i < len(spec.image_ids) else str(i)
        where = os.path.abspath(paths[i]) if paths is not None and i < len(paths) and paths[i] else ""
        yield f"{i}\t{name}\t{where}"


def write_set_files(spec: EvalSet, directory: Path) -> None:
    """``items.tsv``, ``set.json`` and, when the datamodule declares it, ``image_resize.json``, in ``directory``."""
    _replace_atomically(directory / ITEMS, _item_lines(spec))  # streamed: +1M sets have a million lines
    record = {"name": spec.name, "items": len(spec.dataset), "queries": spec.n_queries}  # type: ignore[arg-type]
    _replace_atomically(directory / SET_RECORD, [json.dumps(record)])
    resize = directory / IMAGE_RESIZE
    if spec.image_resize is None:
        resize.unlink(missing_ok=True)  # a stale record from another datamodule must not size queries
    else:
        record = {"max_side": spec.image_resize.max_side, "upscale": spec.image_resize.upscale}
        _replace_atomically(resize, [json.dumps(record)])


class ItemTable:
    """``dataset index -> (id, path)`` read from ``items.tsv`` on demand: only the byte offset of each line is
    held (8 bytes an item), since ``search`` prints a few names from sets of millions (a dict of every row
    of a 4.1M-item GLDv2 set held 1.2 GB). ``extract`` writes item ``i`` on line ``i + 1``; a file edited
    otherwise is read whole once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        offsets = array("q")
        with open(path, "rb") as f:
            position = len(f.readline())  # the header
            for line in f:
                offsets.append(position)
                position += len(line)
        self._offsets = offsets
        self._whole: dict[int, tuple[str, str]] | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def get(self, index: int, default: tuple[str, str] | None = None) -> tuple[str, str] | None:
        if self._whole is None:
            if not 0 <= index < len(self._offsets):
                return default
            with open(self.path, "rb") as f:
                f.seek(self._offsets[index])
                fields = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
            if len(fields) == 3 and fields[0] == str(index):
                return fields[1], fields[2]
            self._whole = self._read_whole()
        return self._whole.get(index, default)

    def _read_whole(self) -> dict[int, tuple[str, str]]:
        """Every row of an edited file; a file that is no items table leaves the results unnamed (a warning),
        not lost: they are computed before they are named."""
        try:
            with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
                return {int(r["index"]): (r["id"], r["path"]) for r in csv.DictReader(f, delimiter="\t")}
        except (KeyError, ValueError, TypeError, csv.Error) as exc:
            print(f"warning: {self.path} is not an items table of `extract` ({type(exc).__name__}: {exc}); "
                  "results are shown by their dataset index", file=sys.stderr)
            return {}


def read_items(directory: Path) -> ItemTable | dict[int, tuple[str, str]]:
    """``dataset index -> (id, path)`` from ``directory/items.tsv`` (empty if there is none)."""
    path = directory / ITEMS
    return ItemTable(path) if path.is_file() else {}


def read_query_count(directory: Path) -> int | None:
    """How many of the set's first items are its queries, or ``None`` when ``extract`` did not record it."""
    path = directory / SET_RECORD
    if not path.is_file():
        return None
    try:
        queries = json.loads(path.read_text(encoding="utf-8"))["queries"]
        if not isinstance(queries, int) or queries < 0:
            raise ValueError(f"queries must be a non-negative integer, got {queries!r}")
        return queries
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a set record of `extract` ({exc})") from exc


def read_image_resize(directory: Path) -> ImageResize | None:
    """How the set's images were sized, or ``None`` when ``extract`` did not record it."""
    path = directory / IMAGE_RESIZE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return ImageResize(record["max_side"], bool(record.get("upscale", False)))  # it checks max_side
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not an image-resize record of `extract` ({exc})") from exc
