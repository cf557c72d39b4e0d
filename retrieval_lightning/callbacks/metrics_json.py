"""Write the metrics of the latest validation/test run to JSON, one file per rank.

For pipelines and tests that compare runs (e.g. 1-process vs DDP evaluation must agree exactly):
``<output_dir>/<stage>_rank<r>.json`` holds ``trainer.callback_metrics`` as plain floats. Each run
replaces the file of its stage (within ``fit``, the last validation's metrics remain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl


class MetricsToJson(pl.Callback):
    """Dump ``trainer.callback_metrics`` after each validation and test run, on every rank."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def _dump(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        path = self.output_dir / f"{stage}_rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, "test")
