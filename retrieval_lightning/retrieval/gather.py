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


def _all_gather_rows(t: Tensor, device: torch.device) -> Tensor:
    """All-gather a (n, ...) tensor whose n differs per rank, as raw bytes; rank order is kept."""
    world = dist.get_world_size()
    n, trailing = t.shape[0], tuple(t.shape[1:])
    row_bytes = math.prod(trailing) * t.element_size()
    as_bytes = t.detach().contiguous().view(-1).view(torch.uint8).reshape(n, row_bytes)
    count = torch.tensor([n], dtype=torch.long, device=device)
    counts_t = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count)
    counts = [int(c.item()) for c in counts_t]
    padded = torch.zeros(max(counts), row_bytes, dtype=torch.uint8, device=device)
    padded[:n] = as_bytes.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
    return rows.reshape(-1).view(t.dtype).reshape(sum(counts), *trailing)


def dedupe_sort(index: Tensor, **arrays: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Keep the first row of each dataset index, ordered by index."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    chosen = order[keep]
    return index[chosen], {name: value[chosen.to(value.device)] for name, value in arrays.items()}


def gather_dedupe(owner: Any, index: Tensor, **arrays: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """All-gather ``index`` (n,) and per-sample ``arrays`` (n, ...) from every rank, then de-duplicate.

    ``owner`` is the LightningModule, Fabric or anything with a ``device`` (used only to pick
    the device NCCL gathers on; may be ``None``). Works without a process group (one process).
    Returns ``(index, arrays)`` sorted by dataset index, on the CPU, identical on every rank.
    """
    index = torch.as_tensor(index).reshape(-1).long()
    for name, value in arrays.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != index.shape[0]:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"gather_dedupe: array {name!r} must be a tensor with {index.shape[0]} rows, got {shape}")
    if _distributed():
        device = _comm_device(owner)
        index = _all_gather_rows(index, device)
        arrays = {name: _all_gather_rows(value, device) for name, value in arrays.items()}
    else:
        index = index.cpu()
        arrays = {name: value.detach().cpu() for name, value in arrays.items()}
    return dedupe_sort(index, **arrays)
