"""`RetrievalModule`: a backbone plus a dict of role -> head, trained and evaluated by Lightning.

Training sums each head's named losses with a per-head weight. Evaluation extracts multi-scale
global descriptors for every item of every :class:`~retrieval_lightning.data.types.EvalSet` the
datamodule declares, gathers them from all ranks (de-duplicated by dataset index), and runs the
set's metric protocol on every rank, so every rank logs identical values.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.checkpoints import load_tensor_file, state_dict_of
from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.evaluation import EvalResult, evaluate_eval_set
from retrieval_lightning.head import ROLES, GlobalHead, Head
from retrieval_lightning.optim import OptimConfig, build_optimizer
from retrieval_lightning.retrieval.gather import gather_dedupe

DEFAULT_EVAL_SCALES = (0.7071, 1.0, 1.4142)


class IncompatibleCheckpointError(ValueError):
    """``init_from`` names a checkpoint whose tensors do not fit this model."""


class RetrievalModule(pl.LightningModule):
    """Backbone + ``heads: {role: Head}``.

    Args:
        backbone: the feature extractor (stages the heads read are added automatically).
        heads: one head per role (``global``, ``local``, ``verifier``, ``sparsifier``).
        num_classes: training classes (linked from the datamodule by the CLI).
        loss_weights: weight per role (default 1.0).
        detach: roles whose losses must not train the backbone (DELG's local head).
        freeze: ``"backbone"`` and/or roles whose parameters stay fixed (CVNet's later stages).
        init_from: checkpoint to initialise from (an earlier stage of a recipe); tensors whose
            names exist in this model must fit in shape, others are reported and left.
        optim: optimiser and LR schedule (see :class:`~retrieval_lightning.optim.OptimConfig`).
        eval_scales: image scales of the multi-scale global descriptor.
        search_chunk: database rows scored at once during search (memory bound).
        freeze_bn: keep the backbone's BatchNorm statistics fixed while training (as
            cnnimageretrieval-pytorch fine-tunes): small or oddly distributed fine-tuning sets
            otherwise drag the ImageNet statistics away from what the test images need.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: dict[str, Head],
        num_classes: int = 0,
        loss_weights: dict[str, float] | None = None,
        detach: Sequence[str] = (),
        freeze: Sequence[str] = (),
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        eval_scales: Sequence[float] = DEFAULT_EVAL_SCALES,
        search_chunk: int = 65536,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "heads"])
        if not heads:
            raise ValueError("RetrievalModule needs at least one head")
        for role, head in heads.items():
            if role not in ROLES:
                raise ValueError(f"heads key {role!r} is not a role; roles are {ROLES}")
            if head.role != role:
                raise ValueError(f"head {type(head).__name__} has role {head.role!r} but is configured under {role!r}")
        self.backbone = backbone
        for head in heads.values():
            backbone.require(head.stages)
            if not head.is_built:
                head.build(backbone.stage_channels, num_classes)
        self.heads = nn.ModuleDict(heads)
        self.num_classes = num_classes
        self.loss_weights = {role: float((loss_weights or {}).get(role, 1.0)) for role in heads}
        unknown = [r for r in list(detach) + list(freeze) if r != "backbone" and r not in heads]
        if unknown:
            raise ValueError(f"detach/freeze name {unknown}, which are not configured heads {sorted(heads)}")
        self.detach = set(detach)
        self.frozen = set(freeze)
        self.optim = optim or OptimConfig()
        self.eval_scales = tuple(float(s) for s in eval_scales)
        self.search_chunk = int(search_chunk)
        self.freeze_bn = bool(freeze_bn)
        self._apply_freeze()
        if init_from:
            self.initialise_from(init_from)
        self._eval_buffers: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.last_eval: dict[str, EvalResult] = {}

    # ------------------------------------------------------------------ set-up
    def _frozen_modules(self) -> list[nn.Module]:
        return [self.backbone if name == "backbone" else self.heads[name] for name in sorted(self.frozen)]

    def _apply_freeze(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "RetrievalModule":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen BatchNorm keeps its running statistics
        if mode and self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def initialise_from(self, path: str) -> None:
        """Copy every fitting tensor of a checkpoint; a shape conflict is an error naming the key."""
        state = state_dict_of(load_tensor_file(path))
        own = self.state_dict()
        conflicts = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if conflicts:
            raise IncompatibleCheckpointError(f"{path} does not fit this model: " + "; ".join(conflicts[:8]))
        matched = {k: v for k, v in state.items() if k in own}
        if not matched:
            raise IncompatibleCheckpointError(
                f"{path}: no tensor name matches this model (checkpoint keys start {list(state)[:3]}, "
                f"model keys start {list(own)[:3]})"
            )
        self.load_state_dict(matched, strict=False)
        skipped = len(own) - len(matched)
        if skipped:
            rank_zero_info(f"init_from {path}: loaded {len(matched)} tensors, {skipped} model tensors kept "
                           "their initialisation")

    # ------------------------------------------------------------------ training
    @property
    def global_head(self) -> GlobalHead:
        head = self.heads["global"] if "global" in self.heads else None
        if not isinstance(head, GlobalHead):
            raise RuntimeError("this model has no global head: evaluation needs one")
        return head

    def head_features(self, role: str, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        head = self.heads[role]
        detach = role in self.detach
        return {s: (features[s].detach() if detach else features[s]) for s in head.stages}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        features = self.backbone(images)
        total = images.new_zeros(())
        for role, head in self.heads.items():
            if role in self.frozen:
                continue
            for name, value in head.losses(self.head_features(role, features), labels).items():
                self.log(f"train/{role}/{name}", value, prog_bar=False, batch_size=len(labels))
                total = total + self.loss_weights[role] * value
        self.log("train/loss", total, prog_bar=True, batch_size=len(labels))
        return total

    def on_fit_start(self) -> None:
        for role, head in self.heads.items():
            if isinstance(head, GlobalHead) and head.wants_imprint and role not in self.frozen:
                self._imprint(head)

    @torch.no_grad()
    def _imprint(self, head: GlobalHead) -> None:
        """One pass over this rank's training batches; sums are reduced over ranks, so all agree."""
        was_training = self.training
        self.eval()
        sums = torch.zeros(self.num_classes, head.dim, device=self.device)
        counts = torch.zeros(self.num_classes, device=self.device)
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else self.trainer.train_dataloader
        for i, batch in enumerate(loader):
            if i % self.trainer.world_size != self.trainer.global_rank:
                continue  # each rank takes every world_size-th batch; the sums are reduced below
            images, labels = batch["image"].to(self.device), batch["label"].to(self.device)
            pooled = head.pool({s: f for s, f in self.backbone(images).items() if s in head.stages})
            sums.index_add_(0, labels, F.normalize(pooled.float(), dim=-1))
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        head.imprint(sums, counts)
        rank_zero_info(f"imprinted {int((counts > 0).sum())}/{self.num_classes} classes of the {head.role} head")
        self.train(was_training)

    def configure_optimizers(self) -> Any:
        groups = []
        if "backbone" not in self.frozen:
            lr = self.optim.lr * self.optim.backbone_lr_mult
            groups.append({"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr})
        for role, head in self.heads.items():
            if role not in self.frozen:
                groups.extend(g for g in head.parameter_groups(self.optim.lr) if g["params"])
        if not groups:
            raise ValueError("everything is frozen: nothing to train")
        return build_optimizer(self.optim, groups, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed_image(self, image: Tensor) -> Tensor:
        """Multi-scale global descriptor of one (3, H, W) image: L2 per scale, summed, L2 (DELG)."""
        head = self.global_head
        acc = None
        for scale in self.eval_scales:
            x = image[None]
            if scale != 1.0:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
            desc = head.embed(self.backbone(x))[0].float()
            acc = desc if acc is None else acc + desc
        return F.normalize(acc, dim=-1)

    def embed_batch(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        return torch.stack([self.embed_image(img) for img in images])

    def _eval_sets(self, stage: str) -> list[EvalSet]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "eval_sets"):
            raise RuntimeError("evaluation needs a datamodule with eval_sets(stage)")
        return datamodule.eval_sets(stage)

    def _eval_step(self, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        desc = self.embed_batch(batch["image"])
        self._eval_buffers.setdefault(dataloader_idx, []).append((batch["index"].detach().cpu(), desc.cpu()))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val", "validate")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test", "test")

    def _finish_eval(self, prefix: str, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval_buffers.clear()
            return
        eval_sets = self._eval_sets(stage)
        self.last_eval = {}
        for idx, eval_set in enumerate(eval_sets):
            chunks = self._eval_buffers.get(idx, [])
            index = torch.cat([c[0] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
            desc = torch.cat([c[1] for c in chunks]) if chunks else torch.zeros(0, self.global_head.dim)
            index, gathered = gather_dedupe(self, index, desc=desc)
            desc = gathered["desc"].cpu()
            expected = len(eval_set.dataset)
            if len(index) != expected or not torch.equal(index.cpu(), torch.arange(expected)):
                if self._eval_is_partial(prefix):
                    rank_zero_warn(f"{prefix}: eval set {eval_set.name!r} only partly evaluated "
                                   f"({len(index)}/{expected} items, batch limits): metrics skipped")
                    continue
                raise RuntimeError(
                    f"eval set {eval_set.name!r}: gathered {len(index)} unique items, expected {expected}"
                )
            result = evaluate_eval_set(eval_set, desc, chunk=self.search_chunk)
            self.last_eval[eval_set.name] = result
            for key, value in result.metrics.items():
                # computed from identical gathered data on every rank: no sync needed, no rank-0-only hang
                self.log(f"{prefix}/{eval_set.name}/{key}", value, add_dataloader_idx=False, sync_dist=False)
        self._eval_buffers.clear()

    def _eval_is_partial(self, prefix: str) -> bool:
        trainer = self.trainer
        limit = trainer.limit_val_batches if prefix == "val" else trainer.limit_test_batches
        return bool(trainer.fast_dev_run) or limit != 1.0

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per-item outputs for the feature store: dataset index and fp16 global descriptor."""
        return {"index": batch["index"], "global": self.embed_batch(batch["image"]).half()}
