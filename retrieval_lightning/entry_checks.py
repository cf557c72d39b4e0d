"""What a re-ranking head (or a sparsifier) declares it stores, and what it returns, checked against each other.

A store is laid out from a head's ``entry_kinds()`` before anything is extracted; a plugin's mismatch is named here,
in one line, rather than as a shape clash in a shard or a silent cast much later."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import EntryKind
from retrieval_lightning.retrieval.store import check_kind_name


def check_entries(entries: Sequence[Mapping[str, Tensor]], kinds: Mapping[str, EntryKind], producer: str) -> None:
    """Entries as their head declares them (``entry_kinds``): the same names, one row of ``shape`` per
    image, or ``(n, *shape)`` rows for a ragged kind. A store is laid out from the declaration, so a
    mismatch is the head's error, named here rather than as a shape clash in a shard much later."""
    for i, entry in enumerate(entries):
        if set(entry) != set(kinds):
            raise UsageError(f"{producer} returned entries {sorted(entry)} for image {i}, but its entry_kinds() "
                             f"declares {sorted(kinds)}")
        for name, value in entry.items():
            kind = kinds[name]
            shape = tuple(value.shape)
            fits = shape[1:] == tuple(kind.shape) if kind.ragged else shape == tuple(kind.shape)
            if not fits:
                declared = f"(n, {', '.join(map(str, kind.shape))})" if kind.ragged else str(tuple(kind.shape))
                raise UsageError(f"{producer} entry {name!r} of image {i} has shape {shape}, but entry_kinds() "
                                 f"declares {declared}{' (ragged)' if kind.ragged else ''}")
            check_entry_dtype(value, kind.dtype, f"{producer} entry {name!r} of image {i}")


def check_entry_kinds(kinds: Mapping[str, EntryKind], producer: str, prefix: str) -> None:
    """A head's declared kinds, before anything is extracted: a store is laid out from them, so a name that
    is no file name, a shape that is no tuple of sizes or a dtype torch cannot read back failed later, as a
    traceback (or, for ``float128``, after the whole extraction, at scoring)."""
    if not isinstance(kinds, Mapping):
        raise UsageError(f"{producer} returned {type(kinds).__name__}, not a dict of EntryKind")
    for name, kind in kinds.items():
        what = f"{producer}: kind {name!r}"
        if not isinstance(kind, EntryKind):
            raise UsageError(f"{what} is {type(kind).__name__}, not an EntryKind")
        try:
            check_kind_name(f"{prefix}{name}")
        except ValueError as err:
            raise UsageError(f"{what}: {err}") from None
        shape = kind.shape
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
            raise UsageError(f"{what}: shape {shape!r} is not a tuple of sizes (one row's shape, e.g. (128,))")
        try:
            torch.from_numpy(np.zeros(0, dtype=np.dtype(kind.dtype)))
        except TypeError as err:
            raise UsageError(f"{what}: dtype {kind.dtype!r} cannot be stored and read back ({err})") from None


def check_entry_dtype(value: Tensor, declared: str, what: str) -> None:
    """The store casts an entry to its declared dtype. Narrowing a float (float32 into ``float16``) is what
    a declaration asks for; a float into an integer kind, or integers beyond its range, would be
    truncated or wrapped without a word, so they are refused here."""
    target = np.dtype(declared)
    if target.kind == "b":  # True for any value but 0: descriptors or counts would all become True
        if value.is_floating_point() or value.is_complex():
            raise UsageError(f"{what} is {value.dtype}, but entry_kinds() declares bool: the store would make every "
                             "non-zero value True (threshold it in the head)")
        if value.dtype != torch.bool and value.numel() and not bool(((value == 0) | (value == 1)).all()):
            raise UsageError(f"{what} holds values other than 0 and 1, but entry_kinds() declares bool: the store "
                             "would make every non-zero value True")
        return
    if target.kind not in "iu":
        return
    if value.is_floating_point() or value.is_complex():
        raise UsageError(f"{what} is {value.dtype}, but entry_kinds() declares {declared}: the store would "
                         "truncate it (round or quantise it in the head, or declare a float kind)")
    if value.numel() and value.dtype != torch.bool:
        info = np.iinfo(target)
        low, high = int(value.min()), int(value.max())
        if low < info.min or high > info.max:
            raise UsageError(f"{what} holds values in [{low}, {high}], beyond {declared}'s "
                             f"[{info.min}, {info.max}]: the store would wrap them")
