"""Save the resolved LightningCLI config without the ``config.yaml`` clash with W&B.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` into ``trainer.log_dir`` (here a training run's; an
evaluation writes ``config_<subcommand>.yaml``, e.g. ``config_test.yaml``, beside it: see
:func:`config_file_name`); with a
``WandbLogger`` that directory is shared by every run and W&B writes its own ``config.yaml``,
so a second run fails. Here, when a W&B logger is attached, the config goes into the run's own
directory and into ``run.config`` (so it is searchable in the W&B UI), with the version of the code
(``code``: the package's version, git commit and whether its tree has changes); otherwise Lightning's
behaviour is kept.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from retrieval_lightning.loggers import code_version


#: subcommands that train: theirs is the log directory's ``config.yaml``
TRAINING_SUBCOMMANDS = ("fit", "finetune")


def config_file_name(subcommand: str) -> str:
    """Where a subcommand saves its config without W&B: an evaluation in a training run's directory
    (``test --ckpt_path <run>/checkpoints/last.ckpt``, even one that fails loading) keeps that run's."""
    return "config.yaml" if subcommand in TRAINING_SUBCOMMANDS else f"config_{subcommand}.yaml"


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _disabled(logger: WandbLogger) -> bool:
    """Whether W&B is disabled for this logger (``WANDB_MODE=disabled`` or ``mode: disabled``): read from
    the settings, the same on every rank, so all ranks take the same branch (and collectives) below."""
    return "disabled" in (os.environ.get("WANDB_MODE"), logger._wandb_init.get("mode"))


class SaveConfigToLoggers(SaveConfigCallback):
    """Resolved config → W&B ``run.config`` and ``<run dir>/lightning_config.yaml``."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # a disabled W&B run (WANDB_MODE=disabled) has a run directory that is never created: log_dir as without W&B
        loggers = [lg for lg in _wandb_loggers(trainer) if not _disabled(lg)]
        if not loggers:
            self.overwrite = True  # successive subcommands (finetune: test, fit, test) share a log_dir
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            for logger in loggers:
                run = logger.experiment
                path = os.path.join(run.dir, "lightning_config.yaml")
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
                run.config.update({**self.config.as_dict(), "code": code_version()}, allow_val_change=True)
        self.already_saved = True
        trainer.strategy.barrier()
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
