"""Data seeds left unset follow the run's ``seed_everything``; explicit ones win; the same run seed
(what a resumed run repeats from its config) redraws the same groups."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from datamodules.gldv2 import GLDv2DataModule
from datamodules.hide_and_seek import HideAndSeek
from datamodules.pairs import PairBatchSampler, PairMiner, PairSampling
from datamodules.sampling import run_seed, training_batches_before

LABELS = np.repeat(np.arange(6), 4)


def _groups(config: PairSampling) -> list[list[int]]:
    return PairBatchSampler(PairMiner(LABELS, config)).epoch_groups(0)


def test_without_seed_everything_the_default_is_zero() -> None:
    assert run_seed(None) == 0 and PairSampling().seed == 0 and HideAndSeek().seed == 0
    assert GLDv2DataModule(root="unused").hparams.sampler_seed == 0


def test_unset_data_seeds_take_the_run_seed_and_explicit_ones_win() -> None:
    seed_everything(7)
    assert PairSampling().seed == 7 and HideAndSeek().seed == 7
    assert GLDv2DataModule(root="unused").hparams.sampler_seed == 7  # recorded resolved, in the checkpoint
    assert PairSampling(seed=3).seed == 3 and HideAndSeek(seed=3).seed == 3
    assert GLDv2DataModule(root="unused", sampler_seed=3).hparams.sampler_seed == 3


def test_another_run_seed_draws_other_pair_groups_and_the_same_seed_the_same() -> None:
    seed_everything(1)
    first = _groups(PairSampling(groups_per_batch=2, negatives=2))
    again = _groups(PairSampling(groups_per_batch=2, negatives=2))
    seed_everything(2)
    other = _groups(PairSampling(groups_per_batch=2, negatives=2))
    assert first == again
    assert first != other
    assert first == _groups(PairSampling(groups_per_batch=2, negatives=2, seed=1))


def test_the_cli_resolves_data_seeds_after_seeding(cache_root: Path, tmp_path: Path) -> None:
    """The options the training loader uses are made after the CLI ran ``seed_everything``."""
    from retrieval_lightning.cli import run_lightning_cli

    config = Path(__file__).resolve().parents[1] / "experiments" / "cvnet_demo.yaml"
    cli = run_lightning_cli(["--config", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                             f"--data.init_args.root={cache_root}", "--data.init_args.build_size=128",
                             "--seed_everything=5", "--data.init_args.hide_and_seek.end=0.2"], run=False)
    train = cli.datamodule.train_module
    assert train.pairs.seed == 5 and train.hide_and_seek.seed == 5 and train.hparams.sampler_seed == 5


class _DrawRecorder(pl.LightningModule):
    """A one-layer model that records, for every training batch it receives, the step and the draw key."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, int]] = []

    def on_after_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
        if self.trainer.training:
            self.seen.append((self.trainer.global_step, training_batches_before(self.trainer)))
        return batch

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_per_batch_draws_are_keyed_on_batches_so_accumulated_micro_batches_differ(tmp_path: Path,
                                                                                  accumulate: int) -> None:
    """Hide-and-Seek and patch shuffling draw from the count of batches before this one: under
    gradient accumulation each micro-batch of a step gets its own masks; without it the key is the
    global step, as before (so runs without accumulation draw what they drew)."""
    data = torch.utils.data.TensorDataset(torch.rand(6, 2))
    model = _DrawRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    steps, draws = zip(*model.seen)
    assert list(draws) == list(range(6))  # 3 batches per epoch, counted across epochs
    if accumulate == 1:
        assert list(steps) == list(draws)
    else:  # the last batch of an epoch steps on its own
        assert list(steps) == [0, 0, 1, 2, 2, 3]
    has = HideAndSeek(start=0.0, end=1.0, warmup_steps=10)
    first, second = (has.masks(8, 16, 16, step=5, draw=d) for d in (0, 1))
    assert not torch.equal(first, second) and torch.equal(second, has.masks(8, 16, 16, step=1, draw=1) | second)
    assert torch.equal(has.masks(8, 16, 16, step=5), has.masks(8, 16, 16, step=5, draw=5))
