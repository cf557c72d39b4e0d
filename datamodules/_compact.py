"""Compact string sequences for eval sets with millions of items (revisitop+1M, GLDv2 recognition).

Why it exists: a million Python strings cost ~70 bytes each plus a list slot, and forked
DataLoader workers copy them page by page as reference counts change. Here names live in one
fixed-width UTF-8 bytes array and paths are built on access; both are read-only ``Sequence[str]``,
so consumers (metrics, the gallery callback) index and iterate them as they would a list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC
from typing import Iterable, Iterator, Sequence, overload

import numpy as np

_ITER_CHUNK = 65536


class StringArray(SequenceABC):
    """Read-only strings stored as one fixed-width bytes array (``numpy`` dtype ``S``).

    Compares equal to any sequence with the same strings; ``take`` and ``concat`` stay compact.
    Names must not end in NUL characters (the fixed-width dtype strips them).
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, values: Iterable[str] | np.ndarray | StringArray = ()) -> None:
        if isinstance(values, StringArray):
            data = values.data
        elif isinstance(values, np.ndarray) and values.dtype.kind == "S":
            data = values
        else:
            data = np.array([str(v).encode("utf-8") for v in values], dtype=bytes)
        self.data: np.ndarray = data.reshape(-1)

    @classmethod
    def concat(cls, *parts: Sequence[str]) -> StringArray:
        """One array holding ``parts`` one after the other."""
        arrays = [StringArray(part).data for part in parts]
        return cls(np.concatenate(arrays) if arrays else np.zeros(0, dtype="S1"))

    def take(self, positions: Sequence[int] | np.ndarray) -> StringArray:
        """The strings at ``positions``, as a new compact array."""
        return StringArray(self.data[np.asarray(positions, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> StringArray: ...

    def __getitem__(self, index: int | slice) -> str | StringArray:
        if isinstance(index, slice):
            return StringArray(self.data[index])
        return self.data[int(index)].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _ITER_CHUNK):
            for raw in self.data[start : start + _ITER_CHUNK].tolist():
                yield raw.decode("utf-8")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return bool(np.array_equal(self.data, other.data))
        if isinstance(other, SequenceABC) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class JoinedPaths(SequenceABC):
    """``os.path.join(directory, name + suffix)`` over consecutive segments, built on access."""

    def __init__(self, segments: Sequence[tuple[str, Sequence[str], str]]) -> None:
        self._dirs = [directory for directory, _, _ in segments]
        self._suffixes = [suffix for _, _, suffix in segments]
        self._names = [StringArray(names) for _, names, _ in segments]
        self._ends = np.cumsum([len(names) for names in self._names], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"path index {index} out of range [0, {len(self)})")
        seg = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[seg - 1]) if seg else 0
        return os.path.join(self._dirs[seg], self._names[seg][index - start] + self._suffixes[seg])
