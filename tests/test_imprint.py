"""Imprinting: from the loader given to ``fit`` (no datamodule), each image read once in total across
ranks, and never again when ``fit`` resumes a checkpoint (which already holds the trained classifier)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from retrieval_lightning.imprint import shard_loader
from test_module import make


class Items(Dataset):
    """Nine tiny images of three classes; counts how often each is read."""

    def __init__(self) -> None:
        torch.manual_seed(2)
        self.items = [{"image": torch.rand(3, 48, 48), "label": i % 3, "index": i} for i in range(9)]
        self.reads = [0] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        self.reads[i] += 1
        return self.items[i]


class Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weight = pl_module.heads["global"].classifier.weight.detach().clone()


def trainer(tmp_path: Path, max_steps: int, snapshot: Snapshot) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path, callbacks=[snapshot])


def test_imprint_from_train_dataloaders_and_not_again_on_resume(tmp_path: Path) -> None:
    data = Items()
    first = Snapshot()
    fit = trainer(tmp_path, 1, first)
    fit.fit(make(num_classes=3, head={"imprint": True}), train_dataloaders=DataLoader(data, batch_size=4))
    reference = make(num_classes=3).eval()
    with torch.no_grad():
        pooled = F.normalize(torch.cat([reference.heads["global"].pool(reference.backbone(it["image"][None]))
                                        for it in data.items]), dim=-1)
    labels = torch.tensor([it["label"] for it in data.items])
    expected = F.normalize(torch.stack([pooled[labels == c].sum(0) for c in range(3)]), dim=-1)
    assert first.weight is not None
    torch.testing.assert_close(first.weight, expected, atol=1e-4, rtol=1e-4)

    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    trained = torch.load(ckpt, weights_only=True)["state_dict"]["heads.global.classifier.weight"]
    assert not torch.allclose(trained, expected)  # one SGD step moved it
    resumed = Snapshot()
    reads = list(data.reads)
    trainer(tmp_path, 2, resumed).fit(make(num_classes=3, head={"imprint": True}),
                                      train_dataloaders=DataLoader(data, batch_size=4), ckpt_path=str(ckpt))
    assert resumed.weight is not None and torch.equal(resumed.weight, trained)
    assert sum(data.reads) - sum(reads) == 4  # only the one training batch: no imprinting pass


def test_imprint_shards_read_each_image_once_in_total() -> None:
    for world_size in (2, 3, 4):
        data = Items()
        loader = DataLoader(data, batch_size=2, shuffle=True)
        for rank in range(world_size):
            for _ in shard_loader(loader, rank, world_size):
                pass
        assert data.reads == [1] * len(data)


def test_imprinting_reads_single_items_from_a_pair_batch_loader() -> None:
    """Pair batches come from a batch sampler whose collate takes whole groups: imprinting handed it 1-item
    batches and stopped fit at its start (``batch of 1 items is not made of groups of 3``)."""
    from datamodules.pairs import PairBatchSampler, PairCollate, PairMiner, PairSampling

    data = Items()
    sampler = PairBatchSampler(PairMiner([i % 3 for i in range(9)], PairSampling(groups_per_batch=2, negatives=1)))
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=PairCollate(3))
    batches = list(shard_loader(loader, 0, 1))
    assert [len(b["label"]) for b in batches] == [6, 3]  # as many per batch as a pair batch holds
    assert data.reads == [1] * len(data) and torch.equal(torch.cat([b["label"] for b in batches]),
                                                         torch.tensor([i % 3 for i in range(9)]))
