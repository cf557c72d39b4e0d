"""Shared by the demo benchmarks: run a config's ``fit`` / ``test`` through the CLI's parser, in this process."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from retrieval_lightning.cli import run_lightning_cli


def cli_args(config: str, out: Path, overrides: list[str]) -> list[str]:
    """The config with no logger, writing under ``out`` (its checkpoints in ``out/checkpoints``), then the overrides."""
    return ["--config", config, "--trainer.logger=false", f"--trainer.default_root_dir={out}", *overrides]


def train(config: str, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """Fit the recipe; a self-contained checkpoint (weights + architecture) at ``out/model.ckpt``, and the fit's seconds."""
    # a benchmark trains from scratch: a finished earlier run here would be resumed (fit's implicit resume)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    cli = run_lightning_cli(cli_args(config, out, overrides), run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    path = out / "model.ckpt"
    cli.model.save_checkpoint(path)
    return path, seconds
