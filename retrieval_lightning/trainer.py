"""`RetrievalTrainer`: Lightning's Trainer plus ``finetune`` (evaluate, fit, evaluate, compare)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from retrieval_lightning.report import format_before_after


class RetrievalTrainer(pl.Trainer):
    """A ``Trainer`` whose extra subcommand shows what training bought."""

    def finetune(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """Test the model, fit it, test it again and print a before/after table of the test metrics."""
        before = _merged(self.test(model, datamodule=datamodule, verbose=False))
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        after = _merged(self.test(model, datamodule=datamodule, verbose=False))
        if self.is_global_zero:
            print(format_before_after(before, after))
        return {"before": before, "after": after}


def _merged(results: list[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for result in results:
        merged.update({k: float(v) for k, v in result.items()})
    return merged
