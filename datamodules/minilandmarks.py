"""``minilandmarks``: the embedded default dataset, built on first use from real photos.

The builder (:mod:`datamodules.minilandmarks_build`) writes the training split in the GLDv2
layout and the benchmark in the revisitop layout; this datamodule reads them back through the
real :class:`~datamodules.gldv2.GLDv2DataModule` and
:class:`~datamodules.revisitop.RevisitopDataModule`, so the demo exercises the same readers a
user's GLDv2 / ROxford run does.

Stages: ``fit`` trains on GLDv2-layout views; ``validate`` is GLDv2's per-class hold-out
(recognition by kNN, cheap); ``test`` is the revisitop-protocol benchmark (mAP Easy/Medium/Hard).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from datamodules._loader_options import check_loader_options
from datamodules.gldv2 import GLDv2DataModule
from datamodules.hide_and_seek import HideAndSeek
from datamodules.pairs import PairMiner, PairSampling, check_pair_options
from datamodules.minilandmarks_build import DATASET_NAME, GLDV2_SUBDIR, REVISITOP_SUBDIR, build_minilandmarks
from datamodules.revisitop import RevisitopDataModule
from datamodules.sampling import training_batches_before
from retrieval_lightning.data.types import EvalSet


def default_cache_root() -> str:
    """``$RETRIEVAL_LIGHTNING_CACHE`` or ``~/.cache/retrieval_lightning``."""
    return os.environ.get("RETRIEVAL_LIGHTNING_CACHE", os.path.join(Path.home(), ".cache", "retrieval_lightning"))


class MiniLandmarksDataModule(pl.LightningDataModule):
    """Build-on-first-use landmark benchmark from the photos in scikit-image (+ any ``photo_dirs``).

    Args:
        root: where built datasets are cached (one sub-directory per build configuration).
        photo_dirs: extra folders of real photos (e.g. ``../shared/data/photos``).
        seed: build seed (views, split); the same inputs give byte-identical datasets.
        build_size: long side of the generated views.
        queries_per_landmark: query views of each test landmark (2: 10 queries). More queries give tighter
            intervals over the queries for comparing two models; the training split is the same at any value.
        image_size: training crop size; eval_max_side: long side of evaluation images.
        crop_area_min: smallest random-resized-crop area (DELG: 0.08; the views are already
            crops of their photo, so fine-tuning here wants larger ones). Values below 0.1 act as 0.1:
            DELG's crop also keeps at least 10 % of the image (``min_object_covered``).
        sampling, pairs, hide_and_seek: as :class:`~datamodules.gldv2.GLDv2DataModule`
            (``sampling: pairs`` trains a verifier on mined pair batches).
    """

    #: arguments that change only the training batches, not an evaluation image (a store's identity skips them)
    training_only_arguments = ("image_size", "crop_area_min", "sampling", "pairs", "hide_and_seek")

    def __init__(
        self,
        root: str | None = None,
        photo_dirs: list[str] | None = None,
        seed: int = 0,
        build_size: int = 256,
        image_size: int = 192,
        eval_max_side: int = 224,
        batch_size: int = 32,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        validation_split: float = 0.2,
        crop_area_min: float = 0.08,
        on_error: str = "raise",
        sampling: str = "shuffle",
        pairs: PairSampling | None = None,
        hide_and_seek: HideAndSeek | None = None,
        queries_per_landmark: int = 2,
    ) -> None:
        super().__init__()
        check_pair_options(sampling, pairs)  # refused when made, not at the first training batch
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.root = os.path.expanduser(root or os.path.join(default_cache_root(), "minilandmarks"))  # a config's ~
        self.photo_dirs = [Path(p).expanduser() for p in (photo_dirs or [])]
        missing = [str(p) for p in self.photo_dirs if not p.is_dir()]
        if missing:
            raise FileNotFoundError(f"minilandmarks photo_dirs not found: {missing}")
        self._dir: Path | None = None
        self._train: GLDv2DataModule | None = None
        self._bench: RevisitopDataModule | None = None

    @property
    def dataset_dir(self) -> Path:
        """The built dataset (built now if this configuration has not been built before)."""
        if self._dir is None:
            self._dir = Path(build_minilandmarks(
                Path(self.root), self.photo_dirs, seed=self.hparams.seed, image_size=self.hparams.build_size,
                queries_per_landmark=self.hparams.queries_per_landmark,
            ))
        return self._dir

    @property
    def train_module(self) -> GLDv2DataModule:
        if self._train is None:
            hp = self.hparams
            self._train = GLDv2DataModule(
                root=str(self.dataset_dir / GLDV2_SUBDIR), train_set="clean", image_size=hp.image_size,
                eval_max_side=hp.eval_max_side, batch_size=hp.batch_size, eval_batch_size=hp.eval_batch_size,
                num_workers=hp.num_workers, validation_split=hp.validation_split, val_sets=["holdout"],
                test_sets=["holdout"], holdout_num_classes=None, crop_area_min=hp.crop_area_min,
                on_error=hp.on_error, sampling=hp.sampling, pairs=hp.pairs, hide_and_seek=hp.hide_and_seek,
            )
        return self._train

    @property
    def benchmark_module(self) -> RevisitopDataModule:
        if self._bench is None:
            hp = self.hparams
            self._bench = RevisitopDataModule(
                root=str(self.dataset_dir / REVISITOP_SUBDIR), datasets=[DATASET_NAME], max_side=hp.eval_max_side,
                eval_batch_size=hp.eval_batch_size, num_workers=hp.num_workers, on_error=hp.on_error,
            )
        return self._bench

    @property
    def num_classes(self) -> int:
        return self.train_module.num_classes

    def prepare_data(self) -> None:
        _ = self.dataset_dir

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_module.setup("fit")

    def eval_sets(self, stage: str) -> list[EvalSet]:
        if stage in ("fit", "validate"):  # GLDv2's hold-out protocol, named for this data (val/minilandmarks_holdout)
            return [dataclasses.replace(s, name=s.name.replace("gldv2", DATASET_NAME, 1))
                    for s in self.train_module.eval_sets("validate")]
        return self.benchmark_module.eval_sets(stage)

    def train_dataloader(self) -> DataLoader:
        self.train_module.trainer = self.trainer  # the training sampler shards itself by the trainer's rank
        return self.train_module.train_dataloader()

    @property
    def pair_miner(self) -> PairMiner | None:
        """The training module's hard-negative state (``sampling: pairs``), for ``HardNegativeMining``."""
        return self.train_module.pair_miner

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            batch = self.train_module.train_batch_transform(batch, trainer.global_step, trainer.global_rank,
                                                            trainer.world_size, draw=training_batches_before(trainer))
        return batch

    def val_dataloader(self) -> list[DataLoader]:
        return self.train_module.val_dataloader()

    def test_dataloader(self) -> list[DataLoader]:
        return self.benchmark_module.test_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return self.benchmark_module.predict_dataloader()
