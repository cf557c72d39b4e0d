"""The CLI, plus a callback that SIGKILLs every rank right after the step-``k`` checkpoint.

Used by ``tests/test_resume.py`` as a subprocess (``strategy="ddp"`` re-launches ``sys.argv``,
so every rank runs this file and gets the callback):
``python resume_demo.py fit --config ... --trainer.callbacks+=__main__.KillAfterStep --trainer.callbacks.step=6``
"""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl


class KillAfterStep(pl.Callback):
    """At the start of the batch after global step ``step`` (its checkpoint is on disk), die like a lost node."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    from retrieval_lightning.cli import main

    sys.exit(main(sys.argv[1:]))
