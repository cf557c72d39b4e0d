"""Cost of a `RetrievalModule` training step under Lightning vs a bare PyTorch loop.

Same model (EfficientNet-Lite0 + GeM/ArcFace head), same batch, same optimiser, clipping and LR
schedule; both measured in this run after warm-up. Prints per-step times and the ratio
(goal: <= 1.10).

    .venv/bin/python benchmarks/train_step_overhead.py [--steps 20 --batch 16 --size 160]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.optim import OptimConfig
from retrieval_lightning.registry import HEADS
from retrieval_lightning.module import RetrievalModule


class RepeatedBatch(Dataset):
    """Yields the same pre-made samples, so data loading costs nothing on either side."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> None:
        self.images, self.labels, self.repeats = images, labels, repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.images)
        return {"image": self.images[j], "label": int(self.labels[j]), "index": j}


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.count = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.count = batch_idx + 1 - self.warmup


def make_module(num_classes: int) -> RetrievalModule:
    torch.manual_seed(0)
    head = HEADS.get("gem_arcface")()
    backbone = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package")
    return RetrievalModule(backbone, {"global": head}, num_classes=num_classes,
                           optim=OptimConfig(lr=0.01, backbone_lr_mult=0.1))


def bare_loop(images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int, num_classes: int) -> float:
    module = make_module(num_classes)
    module.train()
    head = module.heads["global"]
    groups = [{"params": list(module.backbone.parameters()), "lr": 0.001}] + head.parameter_groups(0.01)
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (steps + warmup))
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        features = module.backbone(images)
        loss = sum(head.losses({s: features[s] for s in head.stages}, labels).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / steps


def lightning_loop(images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int, num_classes: int) -> float:
    module = make_module(num_classes)
    timer = StepTimer(warmup)
    loader = DataLoader(RepeatedBatch(images, labels, steps + warmup), batch_size=len(images), shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=10.0, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.batch,))
    bare = bare_loop(images, labels, args.steps, args.warmup, args.classes)
    light = lightning_loop(images, labels, args.steps, args.warmup, args.classes)
    print(f"batch {args.batch}x3x{args.size}x{args.size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads")
    print(f"bare PyTorch loop      : {bare * 1000:8.1f} ms/step")
    print(f"RetrievalModule (Lightning): {light * 1000:8.1f} ms/step")
    print(f"ratio Lightning / bare : {light / bare:8.3f}   (goal <= 1.10)")


if __name__ == "__main__":
    main()
