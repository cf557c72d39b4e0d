"""Passes outside Lightning's loops (imprinting, hard-negative mining) show a bar exactly when the run's
own progress bar is on, on rank 0."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from retrieval_lightning.callbacks.hard_negatives import nearest_other_label
from retrieval_lightning.progress import shows_progress, trainer_progress
from test_imprint import Items
from test_module import make


def _trainer(tmp_path: Path, bar: bool) -> pl.Trainer:
    return pl.Trainer(max_steps=1, logger=False, enable_progress_bar=bar, enable_model_summary=False,
                      enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)


def test_shows_progress_follows_the_trainers_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert shows_progress(_trainer(tmp_path, True))
    assert not shows_progress(_trainer(tmp_path, False))
    assert shows_progress(None)  # outside a Trainer (notebooks, scripts)
    assert list(trainer_progress(range(3), _trainer(tmp_path, False), "silent")) == [0, 1, 2]
    assert "silent" not in capsys.readouterr().err
    assert list(trainer_progress(range(3), _trainer(tmp_path, True), "counting")) == [0, 1, 2]
    assert "counting" in capsys.readouterr().err


@pytest.mark.parametrize("bar", [True, False])
def test_imprinting_pass_shows_a_bar_only_with_the_trainers(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           bar: bool) -> None:
    _trainer(tmp_path, bar).fit(make(num_classes=3, head={"imprint": True}),
                                train_dataloaders=DataLoader(Items(), batch_size=4))
    assert ("imprinting the global head" in capsys.readouterr().err) == bar


def test_mining_table_bar_does_not_change_the_table(capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    labels = torch.arange(50) % 7
    quiet = nearest_other_label(desc, labels, 3, chunk=16)
    assert "nearest other labels" not in capsys.readouterr().err
    shown = nearest_other_label(desc, labels, 3, chunk=16, progress=True)
    assert "nearest other labels" in capsys.readouterr().err
    assert torch.equal(quiet, shown)


def test_a_bar_over_a_dataloader_leaves_training_randomness_alone(tmp_path: Path) -> None:
    """tqdm.auto's class starts an iterator when it is built: for a DataLoader that draws a seed from
    torch's generator (and starts workers) once more, which shifted a whole training run."""
    loader = DataLoader(list(range(8)), batch_size=2)
    torch.manual_seed(0)
    plain = [b.tolist() for b in loader]
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    shown = [b.tolist() for b in trainer_progress(loader, _trainer(tmp_path, True), "loader")]
    assert shown == plain and torch.equal(torch.get_rng_state(), expected)
