"""`RetrievalTrainer`: Lightning's Trainer plus ``finetune`` (evaluate, fit, evaluate, compare) and
``extract`` (database features to a resumable on-disk feature store)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from torch.utils.data import DataLoader, Subset

from retrieval_lightning.callbacks.gallery import RetrievalGallery
from retrieval_lightning.errors import UsageError
from retrieval_lightning.evaluation import NonFiniteDescriptorError, check_finite, checked_eval_sets
from retrieval_lightning.implicit_resume import check_implicit_resume, note_explicit_resume, resumes_implicitly
from retrieval_lightning.launched_ranks import remember_launcher
from retrieval_lightning.loggers import checkpoint_to_resume, continue_wandb_run
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.outputs import check_folder_can_be_made
from retrieval_lightning.progress import shows_progress
from retrieval_lightning.rank_zero import on_rank_zero
from retrieval_lightning.report import format_before_after
from retrieval_lightning.retrieval.search import as_tensor
from retrieval_lightning.retrieval.set_files import write_set_files
from retrieval_lightning.retrieval.store import normalize_identity
from retrieval_lightning.retrieval.store_eval import choose_eval_sets, evaluate_store
from retrieval_lightning.retrieval.identity import (
    datamodule_identity,
    items_identity,
    model_identity,
    precision_identity,
)
from retrieval_lightning.retrieval.writer import (
    UNREADABLE,
    FeatureStoreWriter,
    merge_shards,
    placeholder_note,
    remaining_subset,
)


class RetrievalTrainer(pl.Trainer):
    """A ``Trainer`` with the retrieval-specific subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        remember_launcher(self)  # so a failure of this process stops the ranks it launches

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``Trainer.fit``; resuming a checkpoint also continues its W&B run (same run id).

        Without ``ckpt_path``, Lightning resumes this directory's last checkpoint by itself when an
        on-exception checkpoint is configured; here that happens only for a run of the same settings
        (see :mod:`retrieval_lightning.implicit_resume`), and it continues the W&B run as well.
        """
        ckpt_path = self._checked_resume(model, ckpt_path)
        with warnings.catch_warnings():
            if self._fresh_implicit_start:  # Lightning would warn that the "last" it chose itself does not exist
                warnings.filterwarnings("ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last')
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)

    def _checked_resume(self, model: pl.LightningModule, ckpt_path: str | None) -> str | None:
        """What ``fit`` will resume (``"last"`` when Lightning would resume by itself, and only a run of
        the same settings), with the W&B logger set to continue that run."""
        self._fresh_implicit_start = False
        if ckpt_path is None and resumes_implicitly(self):
            ckpt_path = "last"  # what Lightning would do; made explicit so the checks below see it
            path = checkpoint_to_resume(self, ckpt_path)
            self._fresh_implicit_start = path is None
            if path is not None and isinstance(model, RetrievalModule):
                check_implicit_resume(model, path)
        elif ckpt_path == "last" and isinstance(model, RetrievalModule):  # a named file is compared by the CLI
            path = checkpoint_to_resume(self, ckpt_path)
            if path is not None:
                note_explicit_resume(model, path)
        continue_wandb_run(self, ckpt_path)
        return ckpt_path

    def finetune(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """Test the model, fit it, test it again and print a before/after table of the test metrics."""
        # before the first test creates the W&B run: a resumed finetune continues its run, and a directory
        # of a run with other settings is refused before anything is tested
        self._checked_resume(model, ckpt_path)  # fit checks it again: the test writes no checkpoint
        before = _merged(self.test(model, datamodule=datamodule, verbose=False))
        if not before:
            limit = self.limit_test_batches
            if self.fast_dev_run or not (isinstance(limit, float) and limit == 1.0):  # a part gives no metrics
                option = "--trainer.fast_dev_run" if self.fast_dev_run else f"--trainer.limit_test_batches={limit}"
                why = f"{option} evaluates the test sets in part, which gives none: leave it out"
            else:
                why = "the datamodule gave none (no test eval set?); use fit, or configure a test set"
            raise UsageError(f"finetune compares the test metrics before and after training, but {why}")
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

        The store holds the global descriptor (``global``, fp16) and, when the model has a re-ranking
        head, its entries (``<role>-<name>``). An interrupted run restarted with the same model and
        data arguments skips what its shards already hold, whatever the number of processes of
        either run; a store of another model or other preprocessing is refused, naming what differs.
        Lightning runs the datamodule's ``prepare_data`` where it runs it (once per node); what is
        left to extract is decided on rank 0 and broadcast, so every rank runs the same ``predict``.

        Args:
            output_dir: where each eval set's shards and store go (``<output_dir>/<set>/store``).
            shard_size: images per shard file (a restarted run redoes at most one shard per rank).
            eval_set: only this eval set (default: all of the datamodule's).
            ckpt_path: weights to load first (or give ``--model.init_from``).
        """
        if shard_size < 1:
            raise UsageError(f"--shard_size must be >= 1 (images per shard file), got {shard_size}")
        output_dir = os.path.expanduser(output_dir)  # a config's ~/features: no shell expands it there
        check_folder_can_be_made(output_dir, "--output_dir")
        if ckpt_path:
            model.load_weights(ckpt_path)
        identity = extraction_identity(model, datamodule, self.precision)
        dtypes = {"global": "float16", UNREADABLE: "uint8"}
        if getattr(model, "rerank_head", None) is not None:
            dtypes.update({model.rerank_prefix + k: v.dtype for k, v in model.rerank_entry_kinds(True).items()})
        stores: dict[str, str] = {}
        position, n_sets = 0, 1
        while position < n_sets:
            writer = FeatureStoreWriter(output_dir, shard_size=shard_size, model_identity=identity, dtypes=dtypes)
            plan = _OneEvalSet(datamodule, position, eval_set, Path(output_dir), identity, writer)
            self.callbacks.append(writer)
            try:
                self.predict(model, datamodule=plan, return_predictions=False)
            finally:
                self.callbacks.remove(writer)
            n_sets = plan.n_sets
            spec = plan.spec
            self.strategy.barrier()
            set_identity = plan.identity_of_set
            # one process checked every batch's descriptors in its step; several leave it to the merged store
            unchecked = self.world_size > 1
            merged = on_rank_zero(lambda: _merge_set(spec, Path(output_dir) / spec.name, set_identity, unchecked),
                                  self.is_global_zero, self.strategy.broadcast, f"merging {spec.name}'s shards")
            if merged is not None:
                stores[spec.name] = merged
            position += 1
        return stores

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        features_dir: str = "features",
        eval_set: str | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Metrics of every eval set (global, and re-ranked when the model re-ranks) from what ``extract`` wrote
        to ``<features_dir>/<set>/store``.

        Nothing is embedded again: the stored fp16 rows are memory-mapped and scored in chunks, so
        ROxford+1M is evaluated in minutes after a (resumable, DDP) ``extract``. Give the arguments
        of that ``extract``: a store of another model or other preprocessing is refused, naming
        what differs. Metrics are printed and sent to the loggers as ``test/<set>/<metric>``, and
        ``test/<set>/reranked/<metric>`` when the model re-ranks from stored entries (with a
        sparsifier, the queries' dense entries are extracted once beside the store: see
        :func:`~retrieval_lightning.retrieval.store_eval.evaluate_store`).
        Under DDP (``--trainer.strategy ddp --trainer.devices N``) the ranks share the re-ranking:
        each re-scores its share of the queries' shortlists, and every rank computes the same metrics.

        Args:
            features_dir: the ``--output_dir`` of the ``extract``.
            eval_set: only this eval set (default: all of the datamodule's).
            ckpt_path: weights to load first, as given to ``extract`` (or give ``--model.init_from``).
        """
        features_dir = os.path.expanduser(features_dir)
        if not Path(features_dir).is_dir():  # at once, not after the launch, the weights and the data's set-up
            raise UsageError(f"--features_dir {features_dir}: no such directory; run `retrieval-lightning extract` "
                             f"with the same arguments and --output_dir {features_dir} first")
        launcher = self.strategy.launcher  # DDP re-launches the command for the other ranks, as for fit/test/predict
        if launcher is not None:
            return launcher.launch(self._evaluate, model, datamodule, features_dir, eval_set, ckpt_path, trainer=self)
        return self._evaluate(model, datamodule, features_dir, eval_set, ckpt_path)

    def _evaluate(self, model: pl.LightningModule, datamodule: pl.LightningDataModule, features_dir: str,
                  eval_set: str | None, ckpt_path: str | None) -> dict[str, float]:
        self.strategy.setup_environment()  # under DDP: this process's device and the process group
        self._save_config(model)
        if ckpt_path:
            model.load_weights(ckpt_path)
        self.weights_path = ckpt_path  # the pictures' "ckpt <name>", as test's
        model.eval()  # as `test` scores: a model built by the CLI starts in training mode
        model.to(self.strategy.root_device)  # no Lightning loop moves it: search and re-ranking on this rank's device
        identity = extraction_identity(model, datamodule, self.precision)
        per_node = getattr(datamodule, "prepare_data_per_node", True)
        if (self.local_rank if per_node else self.global_rank) == 0:
            datamodule.prepare_data()
        self.strategy.barrier()
        datamodule.setup("predict")
        metrics: dict[str, float] = {}
        sets = choose_eval_sets(checked_eval_sets(datamodule.eval_sets("predict"), datamodule), eval_set)
        results, global_results, reranked = {}, {}, set()
        for spec in sets:
            result, rescored = evaluate_store(model, spec, features_dir, {**identity, **items_identity(spec)},
                                              progress=shows_progress(self),
                                              rank=self.global_rank, world_size=self.world_size,
                                              broadcast=self.strategy.broadcast,
                                              forward_context=self.precision_plugin.forward_context)
            metrics.update({f"test/{spec.name}/{k}": float(v) for k, v in result.metrics.items()})
            if rescored is not None:
                metrics.update({f"test/{spec.name}/reranked/{k}": float(v) for k, v in rescored.metrics.items()})
                reranked.add(spec.name)
            results[spec.name] = rescored or result  # the picture shows the final ranking, as `test`'s
            global_results[spec.name] = result
        if self.is_global_zero:
            width = max(map(len, metrics)) + 2
            print("\n".join(f"{name:<{width}}{value:8.2f}" for name, value in sorted(metrics.items())))
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)  # the step the gallery is logged at
                logger.save()
            for gallery in (c for c in self.callbacks if isinstance(c, RetrievalGallery)):
                for path in gallery.draw(self, sets, results, "evaluate", reranked, global_results):
                    print(f"picture: {path}")
        return metrics


    def _save_config(self, model: pl.LightningModule) -> None:
        """Save the resolved config as Lightning's loops do (they call ``setup`` on callbacks; ``evaluate``
        runs outside them): without it the run's W&B config, code version and config file were missing.
        Every rank calls it: the callback synchronises them."""
        for callback in self.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.setup(self, model, "evaluate")


def store_sizes(bytes_per_image: dict[str, float]) -> str:
    """``total 1480 B/image: global 640, verifier 840`` (kinds summed per ``<role>-`` prefix)."""
    groups: dict[str, float] = {}
    for kind, size in bytes_per_image.items():
        if kind == UNREADABLE:  # a one-byte flag per image, not a descriptor: "unreadable 1" read as a count
            continue
        group = kind.split("-", 1)[0]
        groups[group] = groups.get(group, 0.0) + size
    parts = ", ".join(f"{group} {size:.0f}" for group, size in groups.items())
    return f"total {sum(groups.values()):.0f} B/image: {parts}"


def _merge_set(spec: Any, out: Path, identity: dict[str, Any], check_rows: bool = True) -> str:
    """Rank 0's part of ``extract`` for one eval set: its shards merged into a store, with its item files;
    ``check_rows``: refuse NaN descriptors there (under DDP the steps do not: a rank raising alone would hang)."""
    store = merge_shards(out, expect_identity=identity, expected_indices=range(len(spec.dataset)), overwrite=True)
    try:
        if check_rows:
            check_finite(spec, as_tensor(store, "global"))
    except NonFiniteDescriptorError as err:
        shutil.rmtree(store.path, ignore_errors=True)  # no store of them for `search` or `evaluate` to find
        raise NonFiniteDescriptorError(f"extract: {err}; the store was not kept") from None
    write_set_files(spec, out)
    print(f"{spec.name}: {len(store)} images -> {store.path} ({store_sizes(store.bytes_per_image)})")
    note = placeholder_note(store, f"extract {spec.name}", spec.image_ids)
    if note:
        print(f"warning: {note}")
    return str(store.path)


def extraction_identity(model: pl.LightningModule, datamodule: pl.LightningDataModule,
                        precision: Any = "32-true") -> dict[str, Any]:
    """Identity of extracted features: the model's (:func:`model_identity`), the trainer's precision and every
    preprocessing argument of the datamodule."""
    return {**model_identity(model), **precision_identity(precision), **datamodule_identity(datamodule)}


class _OneEvalSet(pl.LightningDataModule):
    """One eval set of a datamodule as Lightning's ``predict`` sees it, limited to what is left to extract.

    Lightning calls ``prepare_data`` where it should (local rank 0 per node) and ``setup`` on every
    rank once the process group exists: rank 0 lists the finished shards and broadcasts the
    remaining items, so all ranks agree even if they would list different shards.
    """

    def __init__(self, inner: pl.LightningDataModule, position: int, name: str | None, root: Path,
                 identity: dict[str, Any], writer: FeatureStoreWriter) -> None:
        super().__init__()
        self.inner, self.position, self.name, self.root = inner, position, name, root
        self.identity, self.writer = identity, writer
        self.prepare_data_per_node = getattr(inner, "prepare_data_per_node", True)
        self.n_sets = 0

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.setup("predict")
        sets = self.inner.eval_sets("predict")
        loaders = self.inner.predict_dataloader()
        if not isinstance(loaders, (list, tuple)):  # one DataLoader: its len() counts batches
            loaders = [loaders]
        if len(loaders) != len(sets):  # each loader is the eval set of its position
            raise UsageError(f"{type(self.inner).__name__} gives {len(loaders)} predict loaders for {len(sets)} eval "
                             f"sets ({[s.name for s in sets]}): one loader per eval set, in order")
        names = {s.name for s in choose_eval_sets(sets, self.name)}
        chosen = [(s, dl) for s, dl in zip(sets, loaders) if s.name in names]
        self.n_sets = len(chosen)
        self.spec, self.template = chosen[self.position]
        out = self.root / self.spec.name
        self.writer.output_dir = out
        self.identity_of_set = {**self.identity, **items_identity(self.spec)}  # shards resume by position
        self.writer.identity = normalize_identity(self.identity_of_set)
        # rank 0 reads the shards already written; its refusal (a store of other weights or preprocessing in
        # --output_dir, a damaged shard) stops every rank instead of leaving them in the broadcast
        trainer = self.trainer
        broadcast = (lambda value: value) if trainer is None else (lambda value: trainer.strategy.broadcast(value, 0))
        is_zero = trainer is None or trainer.is_global_zero
        def remaining() -> list[int]:
            return list(remaining_subset(self.spec.dataset, out, expect_identity=self.identity_of_set).indices)

        todo = on_rank_zero(remaining, is_zero, broadcast, f"extract {self.spec.name}: reading {out}")
        if trainer is not None:
            todo = trainer.strategy.broadcast(todo, src=0)
        self.subset = Subset(self.spec.dataset, items_for_every_rank(list(todo or []), self._world_size()))

    def _world_size(self) -> int:
        return 1 if self.trainer is None else int(self.trainer.world_size)

    def predict_dataloader(self) -> DataLoader:
        t = self.template
        return DataLoader(self.subset, batch_size=t.batch_size, collate_fn=t.collate_fn, num_workers=t.num_workers,
                          shuffle=False)


def items_for_every_rank(todo: list[int], world_size: int) -> list[int]:
    """The items left to extract, repeated so each rank gets one when fewer are left than ranks: Lightning's
    predict sampler refuses a rank without items (a retry of one unreadable image under DDP crashed), and
    the merge keeps one row per dataset index."""
    if 0 < len(todo) < world_size:
        return (todo * world_size)[:world_size]
    return todo


def _merged(results: list[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for result in results:
        merged.update({k: float(v) for k, v in result.items()})
    return merged
