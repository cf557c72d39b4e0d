"""A run that diverges stops at once, and no checkpoint or store holds NaN weights or descriptors.

A loss that turns NaN (a learning rate too high, an fp16 overflow) used to train on to the end of the run and exit
0, while the step checkpoints rotated the last finite one away. Now the first non-finite loss stops the run with
one line naming the step and each loss; a checkpoint is never written, nor a run started, from non-finite weights,
and ``extract`` refuses non-finite descriptors before they reach a store.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

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


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Training labels index the classifier (``num_classes`` > 0): a plugin datamodule's own ids, or a -1 for
    "unknown", otherwise hit it as an index error deep in a margin (a device-side assert on a GPU). Checked on
    the CPU batch, before it moves to the device: no sync."""
    if num_classes <= 0 or not isinstance(labels, Tensor) or not labels.numel():
        return
    low, high = (int(v) for v in labels.aminmax())
    if low < 0 or high >= num_classes:
        raise UsageError(f"training labels run from {low} to {high}, but the classifier has num_classes "
                         f"{num_classes}: a datamodule gives labels 0 .. num_classes - 1")


def check_loss(total: Tensor, losses: Mapping[str, Tensor], step: int, synced: bool) -> None:
    """The step's loss is finite, with one device sync (the progress bar reads the loss every step anyway) and
    under DDP one all-reduce, so every rank stops at the same step: a rank's NaN reaches every rank's weights."""
    finite = torch.isfinite(total.detach()).all().float().reshape(1)
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        shown = ", ".join(f"{name} = {float(value.detach()):.4g}" for name, value in losses.items())
        raise TrainingDivergedError(
            f"training diverged at step {step}: the loss is not finite ({shown}); no checkpoint of this state is "
            "written, so the run's latest step checkpoint (or last.ckpt) is its last finite one: resume or "
            "--model.init_from it with a lower learning rate or a gradient clip (--trainer.gradient_clip_val)")


def check_finite_descriptors(descriptors: Tensor, indices: Sequence[int] | Tensor, what: str) -> None:
    """Refuse non-finite descriptors before a store takes them, naming the dataset indices (``extract``)."""
    finite = torch.isfinite(descriptors.detach()).reshape(len(descriptors), -1).all(dim=1).cpu()
    if not bool(finite.all()):
        bad = [int(i) for i, ok in zip(torch.as_tensor(indices).reshape(-1).tolist(), finite.tolist()) if not ok]
        raise NonFiniteWeightsError(
            f"{what}: the descriptors of {len(bad)} images (dataset indices {bad[:5]}) hold NaN/Inf: the "
            "model diverged (its weights or a precision overflow); extract with a model that evaluates")
