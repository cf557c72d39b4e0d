"""A tiny model that validates every 3 steps, for tests of runs stopped by SIGTERM; run as a script, one DDP
rank (started as torchrun starts it) of such a fit:

    python _validated_linear.py <out dir> <checkpoint to resume, or -> [training | validation]

``training``: SIGTERM reaches rank 0 as training step 4 starts and rank 1 after its backward pass (a signal
reaches each rank at its own point). ``validation``: each rank SIGTERMs itself in the 2nd of the 3 batches of
step 6's validation, rank r r+1 times (the scheduler's signal plus the one Lightning's launcher forwards from
rank 0). Rank 0 saves what the fit validated and its weights to ``<out dir>/fit.pt``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor:
        return torch.full((8,), float(item[0] if isinstance(item, tuple) else item))


class ValidatedLinear(pl.LightningModule):
    """Dropout in training and validation and a shuffled validation loader: a validation re-run from other
    random states than the uninterrupted run's gives other metrics, and the training after it other weights."""

    def __init__(self, step_seconds: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 1)
        self.outputs: list[torch.Tensor] = []
        self.step_seconds = step_seconds  # wall time a step takes at least (time-based validation intervals)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_seconds)
        return (self.layer(torch.nn.functional.dropout(batch, 0.3)) ** 2).mean() * 1e-3

    def on_validation_epoch_start(self) -> None:
        self.outputs = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.outputs.append(self.layer(torch.nn.functional.dropout(batch, 0.5, training=True)).sum())

    def on_validation_epoch_end(self) -> None:
        self.log("val/sum", torch.stack(self.outputs).sum(), sync_dist=True)
        self.log("val/batches", float(len(self.outputs)), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        from datamodules.sampling import ResumableDataLoader, ShuffleSampler

        rank, ranks = self.trainer.global_rank, self.trainer.world_size
        sampler = ShuffleSampler(64, seed=0, rank=rank, num_replicas=ranks)
        return ResumableDataLoader(Rows(64), batch_size=4, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Rows(12 * self.trainer.world_size), batch_size=4, shuffle=True)


Validated = tuple[int, int, float, float]  # global step, logger step, batches, metric


class Validations(pl.Callback):
    """Each validation's (global step, logger step, batches, metric), and a signal (``signum``, ``times`` in a
    row) to this process at global step ``step`` (None: the first time): ``at`` "validation" (at the end of its
    batch ``batch``),
    "step start", "after backward" (the step's gradients all-reduced) or "epoch end"."""

    def __init__(self, at: str = "", step: int | None = -1, batch: int = 1, times: int = 1,
                 signum: int = signal.SIGTERM) -> None:
        self.at, self.step, self.batch, self.times, self.signum = at, step, batch, times, signum
        self.seen: list[Validated] = []

    def _signal(self, trainer: pl.Trainer, at: str) -> None:
        if at == self.at and self.step in (trainer.global_step, None) and not trainer.sanity_checking:
            self.at = ""  # once
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self._signal(trainer, "step start")

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._signal(trainer, "after backward")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._signal(trainer, "epoch end")

    def on_validation_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: object,
                                batch: object, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == self.batch:
            self._signal(trainer, "validation")

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.seen.append((trainer.global_step, trainer.fit_loop.epoch_loop._batches_that_stepped,
                          float(metrics["val/batches"]), float(metrics["val/sum"])))


def fit(out: Path, ckpt: Path | None = None, signal_at: dict[str, Any] | None = None, checkpoint_every: int = 2,
        step_seconds: float = 0.0, **trainer_args: Any) -> tuple[ValidatedLinear, list[Validated]]:
    """10 steps of 16-batch epochs, validating every 3 batches (``trainer_args`` change these), a step checkpoint
    every ``checkpoint_every`` steps, one at each validation's end and one at each epoch's end (all kept), a
    signal sent as
    ``signal_at`` says (:class:`Validations`); stopped by a signal, it returns after the on-exception
    checkpoint is written."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from retrieval_lightning.callbacks import PreemptionCheckpoint, ResumeState

    validations = Validations(**(signal_at or {}))
    settings: dict[str, Any] = dict(max_steps=10, val_check_interval=3, num_sanity_val_steps=0, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    torch.manual_seed(1)
    trainer = pl.Trainer(default_root_dir=out, **{**settings, **trainer_args},
                         callbacks=[ResumeState(), PreemptionCheckpoint(dirpath=out), validations,
                                    ModelCheckpoint(dirpath=out, filename="{step}", save_top_k=-1,
                                                    every_n_train_steps=checkpoint_every),
                                    ModelCheckpoint(dirpath=out, filename="validated-{step}", monitor="val/sum",
                                                    save_top_k=-1),
                                    ModelCheckpoint(dirpath=out, filename="epoch-{step}", every_n_epochs=1,
                                                    save_on_train_epoch_end=True, save_top_k=-1)])
    model = ValidatedLinear(step_seconds)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no workers, no logger
            warnings.filterwarnings("always", message=".*did not end before this checkpoint")
            trainer.fit(model, ckpt_path=ckpt)
    except SystemExit:  # Lightning's exit after a SIGTERM's or Ctrl-C's checkpoint
        pass
    finally:
        for signum, handler in handlers.items():  # Lightning ignores Ctrl-C once it stopped for one
            signal.signal(signum, handler)
    return model, validations.seen


if __name__ == "__main__":
    out, ckpt, stop = Path(sys.argv[1]), sys.argv[2], (sys.argv[3:] or [""])[0]
    rank = int(os.environ["LOCAL_RANK"])
    signal_at = {"training": dict(at=("step start", "after backward")[rank], step=4),
                 "validation": dict(at="validation", step=6, times=rank + 1), "": {}}[stop]
    model, seen = fit(out, None if ckpt == "-" else Path(ckpt), signal_at, strategy="ddp", devices=2)
    if rank == 0:
        torch.save({"seen": seen, "weights": model.state_dict()}, out / "fit.pt")
