"""Data seeds left unset follow the run's ``seed_everything``; explicit ones win; the same run seed
(what a resumed run repeats from its config) redraws the same groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import seed_everything

from datamodules.gldv2 import GLDv2DataModule
from datamodules.hide_and_seek import HideAndSeek
from datamodules.pairs import PairBatchSampler, PairMiner, PairSampling
from datamodules.sampling import run_seed

LABELS = np.repeat(np.arange(6), 4)


@pytest.fixture(autouse=True)
def _restore_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything writes it; restored after the test


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
