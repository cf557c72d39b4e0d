"""What training on several processes needs beyond one process: each rank its own random stream for the heads'
draws, and DDP told when the trained backbone computes stages that no trained head reads."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info

from retrieval_lightning.backbone import STAGE_NAMES

#: torch's seeds are 64-bit
_SEEDS = 1 << 64


def decorrelate_ranks(rank: int) -> None:
    """Give rank ``rank`` > 0 a torch stream of its own (the initial seed + rank).

    Why: Lightning seeds every rank alike, so the random draws heads make in training (the sparsifier's Gumbel
    noise, the verifier's in-batch shuffle) were the same on every rank: N copies of one draw on N GPUs, where one
    process with the whole batch draws N times as many. Rank 0, and a single process, keep the stream they had;
    a resumed run restores every rank's saved states after this."""
    if rank > 0:
        torch.manual_seed((torch.initial_seed() + rank) % _SEEDS)


def unreached_stages(head_stages: Mapping[str, Iterable[str]], frozen: set[str], detached: set[str]) -> list[str]:
    """Backbone stages beyond the deepest one a trained, attached head reads (``head_stages``: role -> stages):
    their parameters get no gradient. None when the backbone is frozen."""
    if "backbone" in frozen:
        return []
    read = [STAGE_NAMES.index(stage) for role, stages in head_stages.items()
            if role not in frozen and role not in detached for stage in stages]
    return list(STAGE_NAMES[max(read, default=-1) + 1:])


def allow_unreached_parameters(trainer: Any, stages: list[str]) -> None:
    """Under DDP, let parameters without a gradient be (``find_unused_parameters``) when ``stages`` of a trained
    backbone feed no trained head: DDP stopped the first step with "parameters that were not used in producing
    the loss" (a verifier trained with the backbone and the global head frozen). Said once; one process needs
    nothing (its optimiser skips parameters without a gradient)."""
    kwargs = getattr(getattr(trainer, "strategy", None), "_ddp_kwargs", None)
    if not stages or trainer.world_size < 2 or not isinstance(kwargs, dict) or kwargs.get("find_unused_parameters"):
        return
    kwargs["find_unused_parameters"] = True  # read when DDP wraps the model, after the setup hooks
    rank_zero_info(f"DDP: the backbone trains, but its stage(s) {', '.join(stages)} feed no trained head, so DDP "
                   "looks for parameters without a gradient at every step (freeze the backbone to avoid it)")
