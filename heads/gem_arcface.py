"""DELG's global head: GeM pooling, a whitening FC, L2 — trained with an angular-margin classifier.

``margin="arcface"`` is DELG (s = sqrt(dim), m = 0.1); ``margin="curricularface"`` is the CVNet
global variant (learnable GeM p, typically m = 0.15 or more).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_lightning.head import GlobalHead
from retrieval_lightning.layers import CosineClassifier, GeM, build_margin


class GemArcFaceHead(GlobalHead):
    """GeM + FC whitening + L2, with an ArcFace/CurricularFace cosine classifier for training.

    Args:
        stage: backbone stage pooled (``conv5`` in DELG and CVNet).
        dim: descriptor size; ``None`` (or 0, as checkpoints of earlier versions record it) keeps the stage's
            channel count (2048 for ResNet-50).
        p, learn_p: GeM exponent and whether it is trained (with ``p_lr_mult`` × lr, no decay).
        margin: ``"arcface"`` or ``"curricularface"``; ``margin_m`` in radians.
        scale: logit scale; ``None`` is ``sqrt(dim)`` (DELG: 45.25 for 2048).
        whiten_init: ``"identity"`` starts the whitening FC as the identity (a semi-orthogonal map
            when ``dim`` differs), so an untrained head is plain GeM on the pretrained backbone;
            ``"random"`` is PyTorch's default initialisation.
        whiten_lr_mult: learning-rate factor of the whitening FC (fine-tuning on few classes
            wants it small, so the descriptor space is not bent towards the training classes).
        imprint: start the classifier from each class's mean descriptor of the training set
            (weight imprinting) instead of random weights, so the first gradients reaching a
            pretrained backbone come from a sensible classifier rather than a random one.
    """

    # the classifier, and CurricularFace's running statistic t (a training state; ArcFace has none): a model
    # trained under one margin evaluates under a config naming the other
    training_only = ("classifier.", "margin.")

    def __init__(
        self,
        stage: str = "conv5",
        dim: int | None = None,
        p: float = 3.0,
        learn_p: bool = False,
        margin: str = "arcface",
        margin_m: float = 0.1,
        scale: float | None = None,
        p_lr_mult: float = 10.0,
        whiten_init: str = "identity",
        whiten_lr_mult: float = 1.0,
        imprint: bool = False,
    ) -> None:
        super().__init__()
        self.stages = (stage,)
        self.stage = stage
        if dim is not None and dim < 0:  # failed in torch, naming no option
            raise ValueError(f"dim must be >= 1, or null (or 0) for the backbone stage's channels; got {dim}")
        self.requested_dim = dim
        self.gem = GeM(p=p, learn_p=learn_p)
        self.margin_kind = margin
        self.margin_m = margin_m
        if scale is not None and not scale > 0:  # 0 leaves the loss at log C with no gradient; < 0 reverses it
            raise ValueError(f"scale must be > 0 (None: sqrt of the descriptor size), got {scale}")
        self.requested_scale = scale
        self.p_lr_mult = p_lr_mult
        if whiten_init not in ("identity", "random"):
            raise ValueError(f"whiten_init must be 'identity' or 'random', got {whiten_init!r}")
        self.whiten_init = whiten_init
        self.whiten_lr_mult = whiten_lr_mult
        self.wants_imprint = imprint
        build_margin(margin, 1.0, margin_m)  # validate the name now, not at build time

    def _build(self, stage_channels: dict[str, int], num_classes: int) -> None:
        channels = stage_channels[self.stage]
        self._dim = int(self.requested_dim or channels)
        self.whiten = nn.Linear(channels, self._dim, bias=True)
        if self.whiten_init == "identity":
            nn.init.orthogonal_(self.whiten.weight) if self._dim != channels else nn.init.eye_(self.whiten.weight)
            nn.init.zeros_(self.whiten.bias)
        scale = self.requested_scale if self.requested_scale is not None else math.sqrt(self._dim)
        self.classifier = CosineClassifier(self._dim, num_classes) if num_classes > 0 else None
        self.margin = build_margin(self.margin_kind, scale, self.margin_m)

    def untrained_tensors(self) -> list[str]:
        """GeM's ``p`` starts at its configured value and an identity whitening is the plain GeM descriptor:
        frozen, they are the untrained ImageNet descriptor (the CVNet demo's global stage), not noise."""
        deliberate = ("gem.",) + (("whiten.",) if self.whiten_init == "identity" else ())
        return [n for n in super().untrained_tensors() if not n.startswith(deliberate)]

    @property
    def dim(self) -> int:
        return self._dim

    def pool(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.whiten(self.gem(features[self.stage]))

    def embed(self, features: Mapping[str, Tensor]) -> Tensor:
        return F.normalize(self.pool(features), dim=-1)

    def losses(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        if self.classifier is None:
            raise RuntimeError("GemArcFaceHead was built with num_classes=0: it cannot be trained")
        cosines = self.classifier(self.pool(features))
        self.watch(accuracy=(cosines.detach().argmax(dim=1) == labels).float().mean())  # before the margin
        logits = self.margin(cosines, labels)
        return {"arcface" if self.margin_kind == "arcface" else self.margin_kind: F.cross_entropy(logits, labels)}

    @torch.no_grad()
    def imprint(self, class_sums: Tensor, class_counts: Tensor) -> None:
        """Set each class's weight to the direction of its summed training descriptors (``pool``)."""
        if self.classifier is None:
            raise RuntimeError("imprinting needs a classifier (num_classes > 0)")
        seen = class_counts > 0
        weight = self.classifier.weight
        weight[seen] = F.normalize(class_sums[seen].to(weight), dim=-1)

    def parameter_groups(self, lr: float) -> list[dict]:
        whiten = [p for p in self.whiten.parameters() if p.requires_grad]
        rest = [p for n, p in self.named_parameters()
                if p.requires_grad and n != "gem.p" and not n.startswith("whiten.")]
        groups = [{"params": rest, "lr": lr}, {"params": whiten, "lr": lr * self.whiten_lr_mult}]
        if self.gem.learn_p and self.gem.p.requires_grad:
            groups.append({"params": [self.gem.p], "lr": lr * self.p_lr_mult, "weight_decay": 0.0})
        return groups
