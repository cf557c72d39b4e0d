"""On-disk feature store: memory-mapped ``.npy`` arrays described by a small JSON manifest.

Evaluating against ROxford+1M or the GLDv2 index cannot hold every descriptor in RAM, so database
features live in a directory that is opened read-only and memory-mapped; search streams through it
in chunks and re-ranking reads only the shortlisted rows.

Layout of a store directory (format version 1)::

    manifest.json          format name/version, model identity, count, one entry per kind
    index.npy              int64 (count,): dataset index of each row, strictly increasing
    <kind>.npy             fixed kind: (count, *shape); ragged kind: (total_rows, *shape)
    <kind>.offsets.npy     ragged kinds only: int64 (count + 1,); image i owns rows
                           offsets[i]:offsets[i + 1] of <kind>.npy

A *kind* is a named array with a fixed per-image shape (a global descriptor, a verifier map) or a
ragged one with a variable number of fixed-shape rows per image (local features). The manifest
records each kind's dtype, shape and ``bytes_per_image``, and the ``identity`` dict given by whoever
wrote the store (a hash of the model config and weights): :meth:`FeatureStore.open` refuses a store
whose identity differs from the expected one, naming the keys that differ.

A store is built in a hidden sibling directory and renamed into place only once complete, so a
directory with a ``manifest.json`` is never half-written. Replacing a store moves the old one
aside, renames the new one in, and only then deletes the old one. Hidden build folders left by a
crashed process (possibly many GB) are removed by the next :meth:`FeatureStore.create` of that path.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from retrieval_lightning.errors import DataFormatError

from .workdirs import atomic_write_text, clean_stale_builds, replace_dir, work_dir

FORMAT_NAME = "retrieval-lightning-feature-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.npy"
_KIND_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_RESERVED = {"index", "manifest"}


class StoreIdentityError(ValueError):
    """The store was written by a different model or configuration than the caller expects."""


@dataclass(frozen=True)
class KindSpec:
    """What one stored kind looks like: numpy dtype name, per-row shape, ragged or not."""

    dtype: str
    shape: tuple[int, ...]
    ragged: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "ragged": self.ragged}


def check_kind_name(name: str) -> None:
    """Kind names become file names: letters, digits, ``_`` and ``-`` only, not reserved."""
    if not _KIND_NAME.match(name) or name in _RESERVED:
        raise ValueError(
            f"feature kind name {name!r} is invalid: use letters, digits, '_' or '-' "
            f"and none of {sorted(_RESERVED)}"
        )


def normalize_identity(identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip so tuples and lists (or int keys and str keys) compare equal."""
    if identity is None:
        return {}
    try:
        return json.loads(json.dumps(dict(identity), sort_keys=True))
    except TypeError as err:
        raise TypeError(f"model identity must be JSON-serialisable: {err}") from None


#: identity keys that stores written by earlier versions lack (they are read as they are)
ADDED_LATER = frozenset({"items"})
#: identity key naming the datamodule's arguments left out of ``preprocessing`` (batch sizes, training-only
#: ones): never compared itself, it lets a store that still holds one of them (written when it counted) be read
UNCOUNTED_KEY = "preprocessing_uncounted"


def identity_differences(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "",
                         uncounted: frozenset[str] | None = None) -> list[str]:
    """Human-readable list of the keys whose values differ between two identities; nested dicts
    (the datamodule's preprocessing, a head's arguments) name the key inside, not the whole dict."""
    if uncounted is None:
        uncounted = frozenset(expected.get(UNCOUNTED_KEY) or ())
    diffs = []
    for key in sorted(set(stored) | set(expected)):
        name = f"{prefix}{key}"
        if not prefix and (key == UNCOUNTED_KEY or (key in ADDED_LATER and key not in stored)):
            continue  # which arguments count is no part of a store; a store written before this key existed
        if key not in stored:
            diffs.append(f"{name!r} missing in store (expected {expected[key]!r})")
        elif key not in expected and prefix == "preprocessing." and key in uncounted:
            continue  # an argument that counted when the store was written (now a batch size or training-only)
        elif key not in expected:
            diffs.append(f"{name!r}={stored[key]!r} in store but not expected")
        elif isinstance(stored[key], Mapping) and isinstance(expected[key], Mapping):
            diffs += identity_differences(stored[key], expected[key], prefix=f"{name}.", uncounted=uncounted)
        elif _same_length_lists(stored[key], expected[key]) and stored[key] != expected[key]:
            # a head's [class, {arguments}]: name the argument, not the whole list
            diffs += identity_differences(dict(enumerate(stored[key])), dict(enumerate(expected[key])),
                                          prefix=f"{name}.", uncounted=uncounted)
        elif stored[key] != expected[key]:
            diffs.append(f"{name!r}: store has {stored[key]!r}, expected {expected[key]!r}")
    return diffs


def _precision_hint(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """How to match a store extracted under another ``trainer.precision`` (recorded when not ``32-true``)."""
    was, now = stored.get("precision", "32-true"), expected.get("precision", "32-true")
    if was == now:
        return ""
    if "precision" not in stored:  # 32-true, or a store from before the precision was recorded
        return (f". The store records no trainer.precision (32-true, or extracted before the precision was "
                f"recorded), this run is {now}: extract again under {now}, or run with --trainer.precision=32-true "
                "if it was extracted in fp32")
    return (f". The store was extracted under trainer.precision {was}, this run is {now}: run with "
            f"--trainer.precision={was}, or extract again under {now}")


def _same_length_lists(a: Any, b: Any) -> bool:
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b)


class StoreBuilder:
    """A store being written: memory-mapped arrays to fill, then :meth:`commit` to publish it."""

    def __init__(
        self,
        path: Path,
        count: int,
        kinds: Mapping[str, KindSpec],
        identity: Mapping[str, Any] | None,
        ragged_lengths: Mapping[str, np.ndarray],
        overwrite: bool,
    ) -> None:
        self.path = path
        self.count = int(count)
        self.kinds = dict(kinds)
        self.identity = normalize_identity(identity)
        self._overwrite = overwrite
        self._tmp = work_dir(path, "building")
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._tmp.mkdir(parents=True)
        open_mm = np.lib.format.open_memmap
        self.index = open_mm(self._tmp / INDEX_FILE, mode="w+", dtype=np.int64, shape=(self.count,))
        self._arrays: dict[str, np.memmap] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name, spec in self.kinds.items():
            rows = self.count
            if spec.ragged:
                if name not in ragged_lengths:
                    raise ValueError(f"ragged kind {name!r} needs its per-image lengths at creation")
                lengths = np.asarray(ragged_lengths[name], dtype=np.int64)
                if lengths.shape != (self.count,) or (lengths < 0).any():
                    raise ValueError(
                        f"ragged kind {name!r}: lengths must be {self.count} non-negative ints, "
                        f"got shape {lengths.shape}"
                    )
                offsets = open_mm(
                    self._tmp / f"{name}.offsets.npy", mode="w+", dtype=np.int64, shape=(self.count + 1,)
                )
                offsets[0] = 0
                np.cumsum(lengths, out=offsets[1:])
                self.offsets[name] = offsets
                rows = int(offsets[-1])
            self._arrays[name] = open_mm(
                self._tmp / f"{name}.npy", mode="w+", dtype=np.dtype(spec.dtype), shape=(rows, *spec.shape)
            )

    def array(self, kind: str) -> np.memmap:
        """The writable array of ``kind`` (for ragged kinds: the concatenated rows)."""
        if kind not in self._arrays:
            raise KeyError(f"store being built has no kind {kind!r}; kinds: {sorted(self._arrays)}")
        return self._arrays[kind]

    def write_image(self, kind: str, position: int, rows: np.ndarray) -> None:
        """Write the rows of one image of a ragged kind."""
        offsets = self.offsets[kind]
        start, stop = int(offsets[position]), int(offsets[position + 1])
        row_shape = self._arrays[kind].shape[1:]
        if len(rows) != stop - start or (len(rows) and tuple(np.shape(rows)[1:]) != row_shape):  # no broadcasting
            raise ValueError(f"kind {kind!r} image {position}: expected {stop - start} rows of shape "
                             f"{list(row_shape)}, got {list(np.shape(rows))}")
        self._arrays[kind][start:stop] = rows

    def commit(self) -> FeatureStore:
        """Check the index, write the manifest, and move the finished store into place."""
        index = np.asarray(self.index)
        if self.count and (np.diff(index) <= 0).any():
            raise ValueError(f"store {self.path}: index must be strictly increasing (sorted, no duplicates)")
        kinds_json = {}
        for name, spec in self.kinds.items():
            arr = self._arrays[name]
            arr.flush()
            entry = spec.to_json()
            entry["rows"] = int(arr.shape[0])
            entry["bytes_per_image"] = _bytes_per_image(spec, arr.nbytes, self.count)
            kinds_json[name] = entry
            if spec.ragged:
                self.offsets[name].flush()
        self.index.flush()
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "identity": self.identity,
            "count": self.count,
            "kinds": kinds_json,
        }
        atomic_write_text(self._tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self._arrays.clear()
        self.offsets.clear()
        del self.index
        if self.path.exists() and not self._overwrite:
            shutil.rmtree(self._tmp)
            raise FileExistsError(f"feature store {self.path} already exists (pass overwrite=True)")
        replace_dir(self._tmp, self.path)
        return FeatureStore.open(self.path)

    def abort(self) -> None:
        """Throw the partial store away."""
        self._arrays.clear()
        self.offsets.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _bytes_per_image(spec: KindSpec, data_bytes: int, count: int) -> float:
    if not spec.ragged:
        return float(spec.row_bytes)
    return (data_bytes + 8 * (count + 1)) / max(count, 1)


def _read_manifest(path: Path) -> dict[str, Any]:
    """A store's manifest, checked for every key the store reads: another program's ``manifest.json``, another
    format version or a hand-edited file is one error naming the file, not a KeyError later."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: not a feature-store manifest (invalid JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataFormatError(f"{path}: not a feature-store manifest (format {found!r}, not {FORMAT_NAME!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataFormatError(f"{path}: format version {manifest.get('version')!r} is not supported (this code "
                              f"reads version {FORMAT_VERSION}); extract the store again with this version")
    problems = [f"{key!r} missing" for key in ("count", "identity", "kinds") if key not in manifest]
    kinds = manifest.get("kinds", {})
    if not isinstance(kinds, dict):
        problems.append("'kinds' is not a mapping")
    else:
        for name, entry in kinds.items():
            missing = [key for key in ("dtype", "shape", "ragged", "rows") if not isinstance(entry, dict)
                       or key not in entry]
            if missing:
                problems.append(f"kind {name!r} lacks {', '.join(missing)}")
    if problems:
        raise DataFormatError(f"{path}: malformed feature-store manifest ({'; '.join(problems)})")
    return manifest


class FeatureStore:
    """A finished store opened read-only; arrays are memory-mapped and read on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.count: int = int(manifest["count"])
        self.identity: dict[str, Any] = manifest["identity"]
        self.kinds: dict[str, KindSpec] = {
            name: KindSpec(e["dtype"], tuple(e["shape"]), bool(e["ragged"]))
            for name, e in manifest["kinds"].items()
        }
        self.index: np.ndarray = self._load(INDEX_FILE, np.dtype(np.int64), (self.count,))
        self._arrays: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._files: dict[str, int] = {}

    # construction -------------------------------------------------------------------------
    @staticmethod
    def create(
        path: str | os.PathLike,
        kinds: Mapping[str, KindSpec],
        count: int,
        identity: Mapping[str, Any] | None = None,
        ragged_lengths: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        overwrite: bool = False,
    ) -> StoreBuilder:
        """Start writing a store of ``count`` images; fill the builder, then ``commit()``."""
        path = Path(path)
        for name in kinds:
            check_kind_name(name)
        clean_stale_builds(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"feature store {path} already exists (pass overwrite=True)")
        lengths = {k: np.asarray(v) for k, v in (ragged_lengths or {}).items()}
        return StoreBuilder(path, count, kinds, identity, lengths, overwrite)

    @staticmethod
    def from_arrays(
        path: str | os.PathLike,
        arrays: Mapping[str, np.ndarray | Sequence[np.ndarray]],
        identity: Mapping[str, Any] | None = None,
        index: Sequence[int] | np.ndarray | None = None,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Write in-memory arrays (a list of per-image arrays makes a ragged kind) as a store."""
        kinds: dict[str, KindSpec] = {}
        lengths: dict[str, np.ndarray] = {}
        count = None
        for name, value in arrays.items():
            if isinstance(value, np.ndarray):
                kinds[name] = KindSpec(value.dtype.name, value.shape[1:])
                n = len(value)
            else:
                parts = [np.asarray(v) for v in value]
                if not parts:
                    raise ValueError(f"ragged kind {name!r} has no images")
                kinds[name] = KindSpec(parts[0].dtype.name, parts[0].shape[1:], ragged=True)
                lengths[name] = np.array([len(p) for p in parts], dtype=np.int64)
                n = len(parts)
            if count is not None and n != count:
                raise ValueError(f"kind {name!r} has {n} images, others have {count}")
            count = n
        if count is None:
            raise ValueError("from_arrays needs at least one kind")
        builder = FeatureStore.create(path, kinds, count, identity, lengths, overwrite)
        try:
            builder.index[:] = np.arange(count) if index is None else np.asarray(index, dtype=np.int64)
            for name, value in arrays.items():
                if kinds[name].ragged:
                    for i, part in enumerate(value):
                        builder.write_image(name, i, np.asarray(part, dtype=kinds[name].dtype))
                else:
                    builder.array(name)[:] = value
            return builder.commit()
        except BaseException:
            builder.abort()
            raise

    @staticmethod
    def open(path: str | os.PathLike, expect_identity: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open a finished store read-only; refuse it if its identity differs from ``expect_identity``."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            # given the eval set's folder, or extract's output directory
            inside = sorted(p.parent for p in [*path.glob(f"*/{MANIFEST}"), *path.glob(f"*/*/{MANIFEST}")])
            hint = (f"; did you mean {inside[0]}?" if len(inside) == 1
                    else f"; stores inside it: {', '.join(map(str, inside[:6]))}" if inside else "")
            raise FileNotFoundError(
                f"{path} is not a feature store: {MANIFEST} is missing (not written yet, or interrupted){hint}"
            )
        manifest = _read_manifest(manifest_path)
        if expect_identity is not None:
            diffs = identity_differences(manifest["identity"], normalize_identity(expect_identity))
            if diffs:
                raise StoreIdentityError(
                    f"feature store {path} was written by a different model or config; "
                    "re-extract it or point to the right store. Differences: " + "; ".join(diffs)
                    + _precision_hint(manifest["identity"], expect_identity)
                )
        return FeatureStore(path, manifest)

    # reading --------------------------------------------------------------------------------
    def _load(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        file = self.path / name
        if not file.is_file():
            raise FileNotFoundError(f"feature store {self.path}: {name} is missing")
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # truncated (a copy cut short, a full disk) or not .npy
            raise DataFormatError(f"feature store {self.path}: {name} is unreadable ({exc}); copy or extract it "
                                  "again") from None
        if arr.dtype != dtype or arr.shape != shape:
            raise DataFormatError(
                f"feature store {self.path}: {name} is {arr.dtype}{list(arr.shape)}, "
                f"manifest says {dtype}{list(shape)}"
            )
        return arr

    def _spec(self, kind: str) -> KindSpec:
        if kind not in self.kinds:
            raise KeyError(f"feature store {self.path} has no kind {kind!r}; it has {sorted(self.kinds)}")
        return self.kinds[kind]

    def array(self, kind: str) -> np.ndarray:
        """Read-only memory map of ``kind`` (for ragged kinds, the concatenated rows)."""
        spec = self._spec(kind)
        if kind not in self._arrays:
            rows = int(self.manifest["kinds"][kind]["rows"])
            self._arrays[kind] = self._load(f"{kind}.npy", np.dtype(spec.dtype), (rows, *spec.shape))
        return self._arrays[kind]

    def offsets(self, kind: str) -> np.ndarray:
        """Row offsets (count + 1,) of a ragged kind."""
        if not self._spec(kind).ragged:
            raise ValueError(f"kind {kind!r} of {self.path} is not ragged; it has no offsets")
        if kind not in self._offsets:
            self._offsets[kind] = self._load(f"{kind}.offsets.npy", np.dtype(np.int64), (self.count + 1,))
        return self._offsets[kind]

    def get(self, kind: str, rows: Sequence[int] | np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Copy only the given row positions into memory (a list of arrays for a ragged kind)."""
        positions = np.asarray(rows, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= self.count):
            bad = positions[(positions < 0) | (positions >= self.count)][0]
            raise IndexError(f"feature store {self.path}: row {bad} out of range [0, {self.count})")
        data = self.array(kind)
        if not self.kinds[kind].ragged:
            return np.asarray(data[positions])
        offsets = self.offsets(kind)
        return [self._read_rows(kind, data, int(offsets[p]), int(offsets[p + 1])) for p in positions]

    def _read_rows(self, kind: str, data: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a ragged kind read with ``pread`` into a private buffer.

        A memory-mapped slice would page in whole (possibly 2 MB) folios per image, so resident
        memory would grow with the store rather than with the rows actually read.
        """
        spec = self.kinds[kind]
        out = np.empty((stop - start, *spec.shape), dtype=np.dtype(spec.dtype))
        if out.nbytes == 0:
            return out
        offset = getattr(data, "offset", None)
        if offset is None:  # not a file-backed memory map
            out[...] = data[start:stop]
            return out
        if kind not in self._files:
            self._files[kind] = os.open(self.path / f"{kind}.npy", os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(np.uint8))
        position, done = int(offset) + start * spec.row_bytes, 0
        while done < len(view):
            n = os.preadv(self._files[kind], [view[done:]], position + done)
            if n <= 0:
                raise OSError(f"feature store {self.path}: {kind}.npy is shorter than its manifest says")
            done += n
        return out

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def rows_of(self, dataset_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions holding the given dataset indices (error naming the first one absent)."""
        wanted = np.asarray(dataset_indices, dtype=np.int64).reshape(-1)
        if self.count == 0 and wanted.size:
            raise KeyError(f"feature store {self.path} is empty: no entry for dataset index {int(wanted[0])}")
        pos = np.searchsorted(self.index, wanted)
        pos_clipped = np.minimum(pos, max(self.count - 1, 0))
        missing = (pos >= self.count) | (np.asarray(self.index[pos_clipped]) != wanted)
        if missing.any():
            raise KeyError(f"feature store {self.path} has no entry for dataset index {int(wanted[missing][0])}")
        return pos

    @property
    def bytes_per_image(self) -> dict[str, float]:
        """Storage cost per image of every kind (ragged: mean, offsets included)."""
        return {name: float(e["bytes_per_image"]) for name, e in self.manifest["kinds"].items()}

    @property
    def nbytes(self) -> int:
        """Total size of the store's array files on disk."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.suffix == ".npy")

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.kinds)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}:{s.dtype}{list(s.shape)}{'*' if s.ragged else ''}" for k, s in self.kinds.items())
        return f"FeatureStore({str(self.path)!r}, count={self.count}, kinds=[{kinds}])"
