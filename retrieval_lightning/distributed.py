"""Collectives over the default process group that work alone too (one process: no group, nothing to gather)."""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def torch_all_gather_object() -> Callable[[Any], list[Any]] | None:
    """``all_gather_object`` over the default process group, or ``None`` when running alone."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return gather


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when running alone."""
    gather = torch_all_gather_object()
    return gather(obj) if gather is not None else [obj]
