"""Classifier weight imprinting at the start of ``fit``: class-mean descriptors as initial weights.

Why here: imprinting is a fit-start initialisation, so it must run on a fresh start (and after
``init_from``) but never when a checkpoint is resumed, which would throw the trained classifier
away. Under DDP every rank pools its own strided share of the training set (each image decoded
once in total, no padding), and the per-class sums are reduced so every rank imprints the same.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from retrieval_lightning.distributed import gather_objects
from retrieval_lightning.divergence import labels_outside, raise_labels_outside
from retrieval_lightning.head import GlobalHead
from retrieval_lightning.progress import trainer_progress


def is_resuming(trainer: pl.Trainer) -> bool:
    """True when ``fit`` restores a checkpoint (``ckpt_path``, ``"last"``, an HPC requeue)."""
    return bool(trainer.ckpt_path)


def training_loader(trainer: pl.Trainer) -> DataLoader:
    """The training ``DataLoader`` of this ``fit``: the datamodule's, or the one given to ``fit``."""
    loaders: Any = trainer.train_dataloader
    if loaders is None:
        # on_fit_start runs before the fit loop requests its loader: ask the same source it will
        loaders = trainer.fit_loop._data_source.dataloader()
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.flattened
    found = _first_dataloader(loaders)
    if found is None:
        raise RuntimeError("imprinting needs a map-style training DataLoader (a dataset with __len__), found "
                           f"{type(loaders).__name__}")
    return found


def _first_dataloader(obj: Any) -> DataLoader | None:
    if isinstance(obj, DataLoader):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            if (found := _first_dataloader(item)) is not None:
                return found
    return None


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """Sequential loader over items ``rank, rank + world_size, ...`` of ``loader``'s dataset.

    A loader driven by a batch sampler (pair batches: groups of anchor, positive and negatives) has a
    collate that takes whole groups only; single items are then collated plainly, as many per batch as
    its batches hold."""
    dataset: Dataset = loader.dataset
    indices: Iterable[int] = range(rank, len(dataset), world_size)  # type: ignore[arg-type]
    collate, batch_size = loader.collate_fn, loader.batch_size
    if batch_size is None:
        collate, batch_size = default_collate, getattr(loader.batch_sampler, "batch_size", None) or 32
    return DataLoader(dataset, batch_size=batch_size, sampler=list(indices), collate_fn=collate,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


@torch.no_grad()
def imprint_head(module: pl.LightningModule, head: GlobalHead, num_classes: int) -> int:
    """Imprint ``head`` from one pass over the training set shared by all ranks; returns classes seen."""
    trainer = module.trainer
    was_training = module.training
    module.eval()
    sums = torch.zeros(num_classes, head.dim, device=module.device)
    counts = torch.zeros(num_classes, device=module.device)
    loader = shard_loader(training_loader(trainer), trainer.global_rank, trainer.world_size)
    outside: tuple[int, int] | None = None  # labels outside the classifier, named once every rank has its pass done
    for batch in trainer_progress(loader, trainer, f"imprinting the {head.role} head", total=len(loader)):
        bad = labels_outside(batch["label"], num_classes)  # before the device's index_add_ (a device-side assert)
        if bad is not None:
            outside = bad if outside is None else (min(outside[0], bad[0]), max(outside[1], bad[1]))
            continue
        images, labels = batch["image"].to(module.device), batch["label"].to(module.device)
        features = module.backbone(images)
        pooled = head.pool({s: f for s, f in features.items() if s in head.stages})
        sums.index_add_(0, labels, F.normalize(pooled.float(), dim=-1))
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    # every rank reaches this reduce (the ranks' shards may differ by a batch): one rank raising alone in its loop
    # left the others waiting in it
    if trainer.strategy.reduce(torch.tensor(float(outside is not None), device=module.device), reduce_op="sum"):
        raise_labels_outside(gather_objects(outside) if trainer.world_size > 1 else [outside], num_classes)
    sums = trainer.strategy.reduce(sums, reduce_op="sum")
    counts = trainer.strategy.reduce(counts, reduce_op="sum")
    head.imprint(sums, counts)
    module.train(was_training)
    seen = int((counts > 0).sum())
    rank_zero_info(f"imprinted {seen}/{num_classes} classes of the {head.role} head")
    return seen


def imprint_heads(module: pl.LightningModule, heads: dict[str, Any], frozen: Iterable[str], num_classes: int) -> None:
    """Imprint every trainable global head that asks for it, unless this ``fit`` resumes a checkpoint."""
    if is_resuming(module.trainer):
        return
    frozen = set(frozen)
    for role, head in heads.items():
        if isinstance(head, GlobalHead) and head.wants_imprint and role not in frozen:
            imprint_head(module, head, num_classes)
