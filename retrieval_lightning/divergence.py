"""A run that diverges stops at once, and no checkpoint or store holds NaN weights or descriptors.

A loss that turns NaN (a learning rate too high, an fp16 overflow) used to train on to the end of the run and exit
0, while the step checkpoints rotated the last finite one away. Now the first non-finite loss stops the run with
one line naming the step and each loss; a checkpoint is never written, nor a run started, from non-finite weights,
and ``extract`` refuses non-finite descriptors before they reach a store.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from retrieval_lightning.distributed import gather_objects
from retrieval_lightning.errors import UsageError


class TrainingDivergedError(UsageError):
    """The training loss became NaN or infinite: the run stops there, its last checkpoint is the last finite one."""


class NonFiniteWeightsError(UsageError):
    """A model's weights hold NaN or Inf (a diverged run): they are neither saved nor loaded."""


def non_finite_tensors(state: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or Inf (one device sync for all)."""
    names = [name for name, t in state.items() if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    checks = [torch.isfinite(state[name]).all() for name in names]
    try:
        flags = torch.stack(checks).tolist()  # one sync when the tensors share a device
    except RuntimeError:  # tensors on several devices
        flags = [bool(check) for check in checks]
    return [name for name, finite in zip(names, flags) if not finite]


def check_finite_weights(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse the non-finite tensors of ``state`` (a checkpoint being loaded or saved), naming them."""
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(
            f"{what} holds NaN/Inf in {len(bad)} tensors ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): "
            "the run that wrote it diverged; start from an earlier checkpoint of that run, with a lower learning "
            "rate or a gradient clip (--trainer.gradient_clip_val)")


def labels_outside(labels: Tensor, num_classes: int) -> tuple[int, int] | None:
    """(lowest, highest) of ``labels`` when some fall outside 0 .. num_classes - 1 (``num_classes`` > 0), else None."""
    if num_classes <= 0 or not isinstance(labels, Tensor) or not labels.numel():
        return None
    low, high = (int(v) for v in labels.detach().aminmax())
    return (low, high) if low < 0 or high >= num_classes else None


def raise_labels_outside(every_rank: Sequence[tuple[int, int] | None], num_classes: int) -> None:
    """The one line, the same on every rank, naming the label ranges outside the classifier (rank by rank)."""
    shown = "; ".join(f"from {got[0]} to {got[1]}" + (f" on rank {rank}" if len(every_rank) > 1 else "")
                      for rank, got in enumerate(every_rank) if got is not None)
    raise UsageError(f"training labels run {shown}, but the classifier has num_classes {num_classes}: a datamodule "
                     "gives labels 0 .. num_classes - 1")


def check_labels(labels: Tensor, num_classes: int, synced: bool = False) -> None:
    """Training labels index the classifier: with ``num_classes`` > 0 they must be 0 .. num_classes - 1 (a plugin
    datamodule's own ids, or -1 for "unknown", hit it as an index error deep in a margin, a device-side assert on
    a GPU). Under DDP (``synced``) the flag is all-reduced, so every rank stops with the same line even when one
    rank's batch alone holds the bad label (that rank raising alone left the others in a collective)."""
    if num_classes <= 0 or not isinstance(labels, Tensor):
        return
    labels = labels.detach()
    if labels.numel():
        low, high = labels.aminmax()
        bad = ((low < 0) | (high >= num_classes)).float().reshape(1)
    else:
        bad = torch.zeros(1, device=labels.device)
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        mine = labels_outside(labels, num_classes)
        raise_labels_outside(gather_objects(mine) if synced else [mine], num_classes)


#: under ``16-mixed`` the loss scaler skips a step whose gradients overflow, and a loss that overflowed once is
#: such a step: so many non-finite losses in a row are taken before the run counts as diverged
FP16_TOLERATED_STEPS = 50


def check_loss(total: Tensor, losses: Mapping[str, Tensor], step: int, synced: bool, precision: str = "32-true",
               non_finite_before: int = 0, state_finite: Callable[[], bool] | None = None) -> int:
    """The step's loss is finite, with one device sync (the progress bar reads the loss every step anyway) and
    under DDP one all-reduce, so every rank stops at the same step: a rank's NaN reaches every rank's weights.
    Returns the count of non-finite steps in a row (``16-mixed`` tolerates :data:`FP16_TOLERATED_STEPS` while
    ``state_finite()``, e.g. the BatchNorm statistics the overflowing forward updated, holds on every rank)."""
    here = torch.isfinite(total.detach()).all().float().reshape(1)
    finite = here.clone()
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return 0
    in_a_row = non_finite_before + 1
    if precision == "16-mixed" and in_a_row <= FP16_TOLERATED_STEPS:
        intact = torch.tensor([float(state_finite() if state_finite is not None else True)], device=here.device)
        if synced and dist.is_available() and dist.is_initialized():
            dist.all_reduce(intact, op=dist.ReduceOp.MIN)  # one decision for every rank
        if intact.item():
            return in_a_row
    mine = {name: float(value.detach()) for name, value in losses.items()}
    every_rank = gather_objects((bool(here.item()), mine)) if synced else [(False, mine)]
    # one message, the same on every rank (so it is printed once): the losses of the ranks whose loss is not finite
    shown = "; ".join((f"rank {rank}: " if len(every_rank) > 1 else "") +
                      ", ".join(f"{name} = {value:.4g}" for name, value in values.items())
                      for rank, (finite, values) in enumerate(every_rank) if not finite)
    raise TrainingDivergedError(
        f"training diverged at step {step}: the loss is not finite ({shown}"
        f"{f'; {in_a_row} steps in a row under 16-mixed' if in_a_row > 1 else ''}); no checkpoint of this state "
        "is written, so the run's latest step checkpoint (or last.ckpt) is its last finite one: resume or "
        "--model.init_from it with a lower learning rate or a gradient clip (--trainer.gradient_clip_val)")


def check_finite_descriptors(descriptors: Tensor, indices: Sequence[int] | Tensor, what: str) -> None:
    """Refuse non-finite descriptors before a store takes them, naming the dataset indices (``extract``)."""
    finite = torch.isfinite(descriptors.detach()).reshape(len(descriptors), -1).all(dim=1).cpu()
    if not bool(finite.all()):
        bad = [int(i) for i, ok in zip(torch.as_tensor(indices).reshape(-1).tolist(), finite.tolist()) if not ok]
        from retrieval_lightning.evaluation import NonFiniteDescriptorError  # what evaluation raises for them

        raise NonFiniteDescriptorError(
            f"{what}: the descriptors of {len(bad)} images (dataset indices {bad[:5]}) hold NaN/Inf: the "
            "model diverged (its weights or a precision overflow); extract with a model that evaluates")
