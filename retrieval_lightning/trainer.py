"""`RetrievalTrainer`: Lightning's Trainer plus ``finetune`` (evaluate, fit, evaluate, compare) and
``extract`` (database features to a resumable on-disk feature store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from retrieval_lightning.loggers import continue_wandb_run
from retrieval_lightning.report import format_before_after
from retrieval_lightning.retrieval.writer import FeatureStoreWriter, merge_shards, module_identity, remaining_subset


class RetrievalTrainer(pl.Trainer):
    """A ``Trainer`` with the retrieval-specific subcommands."""

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``Trainer.fit``; resuming a checkpoint also continues its W&B run (same run id)."""
        continue_wandb_run(self, ckpt_path)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)

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

    def extract(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        output_dir: str = "features",
        shard_size: int = 4096,
        eval_set: str | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, str]:
        """Write every eval set's features to ``<output_dir>/<set>/store`` (resumable, one shard per rank).

        An interrupted run restarted with the same model skips what its shards already hold,
        whatever the number of processes of either run; a store of another model is refused.
        """
        if ckpt_path:
            model.load_state_dict(_checkpoint_state(ckpt_path))
        datamodule.prepare_data()
        datamodule.setup("predict")
        sets = datamodule.eval_sets("predict")
        loaders = datamodule.predict_dataloader()
        chosen = [(s, dl) for s, dl in zip(sets, loaders) if eval_set in (None, s.name)]
        if not chosen:
            raise ValueError(f"no eval set named {eval_set!r}; available: {[s.name for s in sets]}")
        identity = module_identity(model, model_class=type(model).__name__,
                                   eval_scales=list(getattr(model, "eval_scales", [])))
        stores = {}
        for spec, template in chosen:
            out = Path(output_dir) / spec.name
            todo = remaining_subset(spec.dataset, out, expect_identity=identity)
            if len(todo):
                loader = DataLoader(todo, batch_size=template.batch_size, collate_fn=template.collate_fn,
                                    num_workers=template.num_workers, shuffle=False)
                writer = FeatureStoreWriter(out, shard_size=shard_size, model_identity=identity)
                self.callbacks.append(writer)
                try:
                    self.predict(model, dataloaders=loader, return_predictions=False)
                finally:
                    self.callbacks.remove(writer)
            self.strategy.barrier()
            if self.is_global_zero:
                store = merge_shards(out, expect_identity=identity, expected_indices=range(len(spec.dataset)),
                                     overwrite=True)
                sizes = ", ".join(f"{k} {v:.0f} B/image" for k, v in store.bytes_per_image.items())
                print(f"{spec.name}: {len(store)} images -> {store.path} ({sizes})")
                stores[spec.name] = str(store.path)
            self.strategy.barrier()
        return stores


def _checkpoint_state(path: str) -> dict:
    from retrieval_lightning.checkpoints import load_tensor_file, state_dict_of

    return state_dict_of(load_tensor_file(path))


def _merged(results: list[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for result in results:
        merged.update({k: float(v) for k, v in result.items()})
    return merged
