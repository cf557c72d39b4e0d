"""Momentum contrast on the global descriptor: CVNet-Global's second loss (Lee et al., CVPR 2022).

CVNet trains its global descriptor with a CurricularFace classifier *and* a momentum-contrastive term:
a momentum copy of the network (backbone and global head, updated as an exponential moving average,
never by the optimiser) describes every training image, and a first-in-first-out queue keeps those
descriptors with their labels. Each query descriptor is contrasted against the queue: entries of its
own class are positives, all others negatives, with the CurricularFace margin (its own running
``t``) on the cosines, so the contrastive logits are shaped like the classifier's.

How this reads the paper's equation (its training code was never released):

- one loss term per (query, positive) pair: a softmax over that positive and every negative of the
  query, the positive being the target; averaged over a query's positives, then over the queries
  that have at least one (a query without any adds nothing);
- the candidates are the queue plus the momentum descriptors of the current batch (of every rank);
  the query's own momentum descriptor is left out: both branches see the same crop, so it would
  be a positive by construction;
- the momentum copy runs in eval mode (its BatchNorm uses the running statistics, copied from the
  trained network), so the keys do not depend on which images share a batch; it is updated before
  the keys of each step are computed, as MoCo does.

The momentum copy's tensors are in the module's state dict (``momentum_contrast.*``, training-only:
an evaluation model loads checkpoints without them); the queue travels in the checkpoint beside it
(:meth:`MomentumContrast.state_for_checkpoint`), outside the state dict, so DDP does not broadcast
it as a buffer at every step. A resumed run continues with the same queue and momentum weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.head import GlobalHead
from retrieval_lightning.layers.margins import CurricularFaceMargin
from retrieval_lightning.retrieval.gather import all_gather_rows

#: state-dict prefix of the momentum copy (training-only)
PREFIX = "momentum_contrast."
#: checkpoint key of the queue
CHECKPOINT_KEY = "momentum_contrast_queue"


@dataclass
class MomentumContrastConfig:
    """Settings of the momentum-contrastive loss.

    Args:
        weight: the loss's weight in the total (CVNet: 0.5, with the classifier's at 0.5 through
            ``loss_weights``).
        momentum: EMA factor of the momentum copy (0.999).
        queue_size: momentum descriptors kept (with their labels); the paper's length is not stated
            in what could be read of it. 16384 × 2048 fp32 is 128 MiB on the device and in checkpoints.
        scale: logit scale s (CVNet's temperature 1/30).
        margin: CurricularFace margin m on the positives (radians).
    """

    weight: float = 0.5
    momentum: float = 0.999
    queue_size: int = 16384
    scale: float = 30.0
    margin: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum_contrast.momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 1:
            raise ValueError(f"momentum_contrast.queue_size must be >= 1, got {self.queue_size}")
        if self.scale <= 0 or self.weight < 0:
            raise ValueError(f"momentum_contrast: scale must be > 0 and weight >= 0, got {self.scale}, {self.weight}")
        if not 0.0 <= self.margin < math.pi / 2:
            raise ValueError(f"momentum_contrast.margin must be in radians, in [0, pi/2), got {self.margin}")


#: logits (pairs x candidates) computed at once: pairs are taken in chunks of this many elements, each
#: recomputed in the backward pass, so a few-class set with a long queue (thousands of positive pairs)
#: does not hold several pairs x candidates matrices for autograd
CHUNK_ELEMENTS = 1 << 22


def contrastive_loss(
    margin: CurricularFaceMargin, queries: Tensor, labels: Tensor, keys: Tensor, key_labels: Tensor, own: Tensor
) -> tuple[Tensor, int]:
    """The loss of L2-normalised ``queries`` (B, D) against candidate ``keys`` (M, D).

    ``own[b]`` is the column of query ``b``'s own momentum descriptor (left out), or -1. Returns the
    loss and the number of queries that had a positive. ``margin``'s running ``t`` is updated once
    from every pair's positive, also when there is none (under DDP every rank joins that all-reduce).
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        cosine = queries.float() @ keys.float().T  # (B, M)
        rows = torch.arange(len(labels), device=labels.device)
        positive = labels[:, None] == key_labels[None, :]
        left_out = torch.zeros_like(positive)
        has_own = own >= 0
        left_out[rows[has_own], own[has_own]] = True
        positive &= ~left_out
        query_of, target = positive.nonzero(as_tuple=True)
        margin.update_t(cosine.detach()[query_of, target])
        per_query = positive.sum(dim=1)
        with_positive = int((per_query > 0).sum())
        if not with_positive:
            return cosine.sum() * 0.0, 0

        def pair_losses(cosine: Tensor, query_of: Tensor, target: Tensor) -> Tensor:
            logits = margin.margin_logits(cosine[query_of], target)  # (P, M): margin on each pair's positive
            others = positive[query_of] | left_out[query_of]  # the query's other positives and its own key
            others[torch.arange(len(target), device=target.device), target] = False
            return F.cross_entropy(logits.masked_fill(others, float("-inf")), target, reduction="none")

        step = max(1, CHUNK_ELEMENTS // max(1, keys.shape[0]))
        if len(target) <= step:
            per_pair = pair_losses(cosine, query_of, target)
        else:
            per_pair = torch.cat([checkpoint(pair_losses, cosine, query_of[i:i + step], target[i:i + step],
                                             use_reentrant=False) for i in range(0, len(target), step)])
        weights = 1.0 / per_query[query_of].float()
        return (per_pair * weights).sum() / with_positive, with_positive


def rank_share(with_positive: int, gathered_labels: Tensor, candidate_labels: Tensor, world_size: int) -> float:
    """``n_r * W / N``: the weight of a rank's loss, its mean over its ``n_r`` queries with a positive. DDP averages
    the W ranks' gradients, so unweighted a query on a rank with few positives counted more; weighted, the step is
    the mean over all N queries with a positive, as one process with the whole batch takes it. N is counted from
    the gathered labels (every rank's queries), each query's own key left out, as :func:`contrastive_loss` does."""
    if world_size <= 1:
        return 1.0
    matches = (gathered_labels[:, None] == candidate_labels[None, :]).sum(dim=1) - 1
    return with_positive * world_size / max(1, int((matches > 0).sum()))


class MomentumContrast(nn.Module):
    """The momentum copy of a backbone and global head, the queue, and the loss."""

    def __init__(self, config: MomentumContrastConfig, backbone: Backbone, head: GlobalHead) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(**{**backbone.init_args, "weights": None, "stages": list(head.stages)})
        self.head = type(head)(**head.init_args)
        self.head.build({s: backbone.stage_channels[s] for s in head.stages}, 0)  # no classifier
        self.requires_grad_(False)
        self.backbone.eval()  # and in every mode of the module (see train)
        self.head.eval()
        self.margin = CurricularFaceMargin(scale=config.scale, margin=config.margin)
        self.queue_keys: Tensor | None = None
        self.queue_labels: Tensor | None = None
        self._clear_queue()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Module conversions (``precision: bf16-true``) move the copy but keep its floating tensors fp32: an
        EMA step, (1 - momentum) x the difference, is below half a bf16 unit, so a bf16 copy would never move."""
        kept = [(module, name, tensor.data, isinstance(tensor, nn.Parameter))
                for part in (self.backbone, self.head) for module in part.modules()
                for tensors in (module._parameters, module._buffers) for name, tensor in tensors.items()
                if tensor is not None and tensor.dtype == torch.float32]
        super()._apply(fn, recurse)
        for module, name, fp32, is_parameter in kept:
            now = module._parameters[name] if is_parameter else module._buffers[name]
            if now.dtype != torch.float32:
                if is_parameter:
                    now.data = fp32.to(device=now.device)
                else:
                    module._buffers[name] = fp32.to(device=now.device)
        return self

    def train(self, mode: bool = True) -> "MomentumContrast":
        super().train(mode)
        self.backbone.eval()
        self.head.eval()
        return self

    # ------------------------------------------------------------------ the momentum copy
    def _pairs(self, backbone: nn.Module, head: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(copy, source) for every parameter and buffer of the copy, matched by name."""
        sources = {**dict(backbone.named_parameters(prefix="backbone")), **dict(backbone.named_buffers(prefix="backbone")),
                   **dict(head.named_parameters(prefix="head")), **dict(head.named_buffers(prefix="head"))}
        own = [*self.backbone.named_parameters(prefix="backbone"), *self.backbone.named_buffers(prefix="backbone"),
               *self.head.named_parameters(prefix="head"), *self.head.named_buffers(prefix="head")]
        missing = [name for name, _ in own if name not in sources]
        if missing:
            raise RuntimeError(f"momentum copy tensors {missing[:5]} have no counterpart in the trained network")
        return [(tensor, sources[name]) for name, tensor in own]

    @torch.no_grad()
    def reset(self, backbone: nn.Module, head: nn.Module) -> None:
        """Start the copy equal to the network and empty the queue (a fresh ``fit``)."""
        for copy, source in self._pairs(backbone, head):
            copy.copy_(source)
        self._clear_queue()

    def _clear_queue(self) -> None:
        self.queue_keys = self.queue_labels = None
        self.filled = self.position = 0

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module) -> None:
        """EMA of the network's parameters; buffers (BatchNorm statistics, counters) are copied."""
        m = self.config.momentum
        for copy, source in self._pairs(backbone, head):
            if copy.is_floating_point() and isinstance(source, nn.Parameter):
                copy.mul_(m).add_(source.detach().to(copy.dtype), alpha=1.0 - m)
            else:
                copy.copy_(source)

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        dtype = next(self.backbone.parameters()).dtype  # fp32 also under bf16-true (see _apply)
        return F.normalize(self.head.embed(self.backbone(images.to(dtype))).float(), dim=-1)

    # ------------------------------------------------------------------ the queue
    def _enqueue(self, keys: Tensor, labels: Tensor) -> None:
        size = self.config.queue_size
        if self.queue_keys is None:
            self.queue_keys = torch.zeros(size, keys.shape[1], dtype=torch.float32, device=keys.device)
            self.queue_labels = torch.full((size,), -1, dtype=torch.long, device=keys.device)
        elif self.queue_keys.device != keys.device:  # a queue restored from a checkpoint, on the CPU
            self.queue_keys, self.queue_labels = self.queue_keys.to(keys.device), self.queue_labels.to(keys.device)
        keys, labels = keys[-size:], labels[-size:]
        slots = (self.position + torch.arange(len(labels), device=keys.device)) % size
        self.queue_keys[slots] = keys.float()
        self.queue_labels[slots] = labels
        self.position = int((self.position + len(labels)) % size)
        self.filled = min(size, self.filled + len(labels))

    def queued(self) -> tuple[Tensor, Tensor]:
        """The queue's (keys, labels), oldest first."""
        if self.queue_keys is None or not self.filled:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        order = (self.position - self.filled + torch.arange(self.filled)) % self.config.queue_size
        order = order.to(self.queue_keys.device)
        return self.queue_keys[order], self.queue_labels[order]

    def state_for_checkpoint(self) -> dict[str, Any]:
        keys, labels = self.queued()
        return {"keys": keys.cpu(), "labels": labels.cpu()}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self._clear_queue()
        keys, labels = state["keys"], state["labels"]
        if len(labels):
            self._enqueue(keys, labels)

    # ------------------------------------------------------------------ the loss
    def loss(self, queries: Tensor, labels: Tensor, images: Tensor, owner: Any = None) -> tuple[Tensor, int]:
        """Contrast ``queries`` (the trained network's descriptors of ``images``) with the batch's momentum
        descriptors, gathered from every rank, and the queue; then enqueue the batch's."""
        keys = self.keys(images)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # (label, rank, position in the rank's batch) of every key: one gather for all three
        tagged = torch.stack([labels, torch.full_like(labels, rank), torch.arange(len(labels), device=labels.device)],
                             dim=1)
        batch_keys = all_gather_rows(owner, keys).to(queries.device)
        batch_tags = all_gather_rows(owner, tagged).to(queries.device)
        batch_labels = batch_tags[:, 0]
        mine = torch.nonzero(batch_tags[:, 1] == rank).flatten()
        own = torch.full_like(labels, -1)
        own[batch_tags[mine, 2]] = mine
        queue_keys, queue_labels = self.queued()
        candidates = torch.cat([batch_keys, queue_keys.to(queries.device)]) if len(queue_labels) else batch_keys
        candidate_labels = torch.cat([batch_labels, queue_labels.to(queries.device)]) if len(queue_labels) \
            else batch_labels
        value, with_positive = contrastive_loss(self.margin, queries, labels, candidates, candidate_labels, own)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        value = value * rank_share(with_positive, batch_labels, candidate_labels, world_size)
        self._enqueue(batch_keys, batch_labels)
        return value, with_positive
