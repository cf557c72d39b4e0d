"""All-gather per-sample results from every rank, drop the distributed sampler's repeats, sort.

Lightning's ``DistributedSampler`` pads the last batches with repeats of the first samples, and
ranks may end with different counts, so results are gathered as (size-padded) raw bytes, trimmed,
de-duplicated by dataset index and sorted by it. Every rank computes the same result, so metrics
computed from it agree everywhere (a checkpoint monitor never sees rank-dependent values).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .spill import SpillConfig, gather_into_file


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(owner: Any) -> torch.device:
    """NCCL gathers CUDA tensors; every other backend gathers on the CPU."""
    if dist.get_backend() == "nccl":
        device = getattr(owner, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: bytes one all-gather call moves in total (all ranks' slices): the rows travel in slices of this
#: size, so the communication device (a GPU under NCCL) never holds more than this at once; gathered
#: whole, the global descriptors of ROxford+1M at 2048-D fp32 would take 8 GB there, twice.
GATHER_SLICE_BYTES = 256 << 20


def _all_gather_rows(t: Tensor, device: torch.device, slice_bytes: int | None = None,
                     destination: Tensor | None = None, into: Tensor | None = None,
                     keep: bool = True) -> Tensor | None:
    """All-gather a (n, ...) tensor whose n differs per rank, as raw bytes; rank order is kept.

    The result is assembled on the CPU from slices of at most ``slice_bytes`` (default
    :data:`GATHER_SLICE_BYTES`) over all ranks. With ``destination`` (one entry per gathered row, in
    rank order), row ``i`` lands in row ``destination[i]`` of the result, or nowhere if it is negative:
    the de-duplicated, sorted result is then built without a second full-size copy. ``into``: a
    ``(rows, row bytes)`` uint8 tensor to assemble the result in (a file mapping) instead of new memory;
    ``keep=False``: take part in the collective but drop what arrives (``None`` is returned)."""
    slice_bytes = GATHER_SLICE_BYTES if slice_bytes is None else int(slice_bytes)
    world = dist.get_world_size()
    n, trailing = t.shape[0], tuple(t.shape[1:])
    row_bytes = math.prod(trailing) * t.element_size()
    as_bytes = t.detach().contiguous().view(-1).view(torch.uint8).reshape(n, row_bytes)
    count = torch.tensor([n], dtype=torch.long, device=device)
    counts_t = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count)
    counts = [int(c.item()) for c in counts_t]
    offsets = [sum(counts[:r]) for r in range(world)]
    if destination is not None and destination.shape[0] != sum(counts):
        raise ValueError(f"destination has {destination.shape[0]} entries for {sum(counts)} gathered rows")
    out_rows = sum(counts) if destination is None else int((destination >= 0).sum())
    out = None
    if keep:
        out = torch.empty(out_rows, row_bytes, dtype=torch.uint8) if into is None else into
        if tuple(out.shape) != (out_rows, row_bytes) or out.dtype != torch.uint8:
            raise ValueError(f"into is {out.dtype} {tuple(out.shape)}, the gather needs uint8 {(out_rows, row_bytes)}")
    rows_per_slice = max(1, min(slice_bytes // max(1, row_bytes * world), max(counts)))
    for start in range(0, max(counts), rows_per_slice):  # the same number of calls on every rank
        mine = as_bytes[start:start + rows_per_slice]
        padded = torch.zeros(rows_per_slice, row_bytes, dtype=torch.uint8, device=device)
        padded[: mine.shape[0]] = mine.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for rank, part in enumerate(parts):
            take = min(max(counts[rank] - start, 0), rows_per_slice)
            if not take or out is None:
                continue
            first = offsets[rank] + start
            if destination is None:
                out[first:first + take] = part[:take].cpu()
            else:
                where, rows = destination[first:first + take], part[:take].cpu()
                kept = where >= 0
                if not bool(kept.all()):  # the sampler's repeats
                    where, rows = where[kept], rows[kept]
                out.index_copy_(0, where, rows)
    return None if out is None else as_rows(out, t.dtype, trailing)


def as_rows(raw: Tensor, dtype: torch.dtype, trailing: tuple[int, ...]) -> Tensor:
    """A ``(rows, row bytes)`` uint8 tensor seen as ``(rows, *trailing)`` of ``dtype`` (no copy)."""
    return raw.reshape(-1).view(dtype).reshape(raw.shape[0], *trailing)


def all_gather_rows(owner: Any, t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` (n may differ per rank), in rank order, on the CPU under DDP;
    ``t`` itself without a process group. ``owner`` as for :func:`gather_dedupe`."""
    if not _distributed():
        return t.detach()
    return _all_gather_rows(t, _comm_device(owner))


def _first_of_each(index: Tensor) -> Tensor:
    """Positions of the first row of each dataset index, ordered by index."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[keep]


def dedupe_sort(index: Tensor, **arrays: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Keep the first row of each dataset index, ordered by index (no copy when it already is: one process)."""
    if bool((index[1:] > index[:-1]).all()):
        return index, dict(arrays)
    chosen = _first_of_each(index)
    return index[chosen], {name: value[chosen.to(value.device)] for name, value in arrays.items()}


def gather_dedupe(owner: Any, index: Tensor, *, spill: SpillConfig | None = None,
                  **arrays: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """All-gather ``index`` (n,) and per-sample ``arrays`` (n, ...) from every rank, then de-duplicate.

    ``owner`` is the LightningModule, Fabric or anything with a ``device`` (used only to pick
    the device NCCL gathers on; may be ``None``). Works without a process group (one process).
    Returns ``(index, arrays)`` sorted by dataset index, on the CPU, identical on every rank. Under
    DDP, an array that ``spill`` spills is returned as a mapping of one file per
    machine rather than in each rank's memory (:mod:`~retrieval_lightning.retrieval.spill`).
    """
    index = torch.as_tensor(index).reshape(-1).long()
    for name, value in arrays.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != index.shape[0]:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"gather_dedupe: array {name!r} must be a tensor with {index.shape[0]} rows, got {shape}")
    if _distributed():
        device = _comm_device(owner)
        index = _all_gather_rows(index, device)
        chosen = _first_of_each(index)
        destination = torch.full_like(index, -1)
        destination[chosen] = torch.arange(chosen.shape[0])
        gathered = {name: _gather_array(name, value, device, destination, int(chosen.shape[0]), spill)
                    for name, value in arrays.items()}
        return index[chosen], gathered
    return dedupe_sort(index.cpu(), **{name: value.detach().cpu() for name, value in arrays.items()})


def _gather_array(name: str, value: Tensor, device: torch.device, destination: Tensor, rows: int,
                  spill: SpillConfig | None) -> Tensor:
    """One array of :func:`gather_dedupe` under DDP: in memory, or into a machine-shared file."""
    trailing = tuple(value.shape[1:])
    row_bytes = math.prod(trailing) * value.element_size()
    if spill is None or not spill.spills(rows * row_bytes):
        return _all_gather_rows(value, device, destination=destination)

    def fill(into: Tensor | None) -> None:
        _all_gather_rows(value, device, destination=destination, into=into, keep=into is not None)

    raw = gather_into_file(rows, row_bytes, spill.directory, name, fill)
    return as_rows(raw, value.dtype, trailing)
