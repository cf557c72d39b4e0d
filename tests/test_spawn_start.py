"""What 'spawn' (macOS's and Windows' start method; ``strategy=ddp_spawn``) pickles must pickle: a lambda given to
a loader or linked into the parser stopped a run before its first step there, while 'fork' (Linux) ran it."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import torch

from helpers import REPO
from retrieval_lightning.callbacks.hard_negatives import HardNegativeMining
from retrieval_lightning.cli import run_lightning_cli


class _Pool(torch.utils.data.Dataset):
    """Six tiny images whose descriptor is their index (module level: a spawned worker imports it)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 4, 4), float(i)), "index": i}


def test_the_mining_pool_loads_with_workers_started_by_spawn() -> None:
    """The CVNet recipes mine with ``num_workers: 8``: under spawn the pool loader's collate (a lambda) could not
    be sent to its workers ("Can't pickle local object ... embed_pool.<locals>.<lambda>") at the first mining."""
    context = torch.multiprocessing.get_start_method(allow_none=True)
    torch.multiprocessing.set_start_method("spawn", force=True)
    try:
        module = SimpleNamespace(device=torch.device("cpu"), backbone=lambda x: x,
                                 global_head=SimpleNamespace(dim=3, embed=lambda f: f.mean(dim=(2, 3))))
        rows, descs = HardNegativeMining(num_workers=1, batch_size=4).embed_pool(module, _Pool())
    finally:
        torch.multiprocessing.set_start_method(context, force=True)
    assert rows.tolist() == list(range(6)) and descs.shape == (6, 3)


def test_the_trainer_pickles_for_ddp_spawn(tmp_path: Path) -> None:
    """``strategy=ddp_spawn`` pickles the trainer, whose config-saving callback holds the parser: the link of
    ``model.num_classes`` to the datamodule was a lambda, so every such run stopped before training."""
    cli = run_lightning_cli(["--config", str(REPO / "experiments/demo.yaml"), "--trainer.logger=false",
                             f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert any(hasattr(callback, "parser") for callback in cli.trainer.callbacks)  # the callback that holds it
    assert pickle.loads(pickle.dumps(cli.trainer)).max_steps == cli.trainer.max_steps
