"""`RetrievalModule`'s evaluation loop: every eval set's descriptors gathered, post-processed, re-ranked, scored.

``validate`` and ``test`` embed every item of every :class:`~retrieval_lightning.data.types.EvalSet` the
datamodule declares (checked first), write re-ranking entries as they go, gather the descriptors from all ranks
(de-duplicated by dataset index), and run the set's metric protocol on every rank, so every rank logs identical
values; ``extract`` is ``predict_step``. Mixed into :class:`~retrieval_lightning.module.RetrievalModule`.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from torch import Tensor

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.divergence import check_finite_descriptors
from retrieval_lightning.errors import UsageError
from retrieval_lightning.evaluation import (
    PLACEHOLDER_RULE,
    EvalDescriptors,
    EvalResult,
    checked_eval_sets,
    evaluate_eval_set,
    unreadable_database,
)
from retrieval_lightning.model_record import head_class_path
from retrieval_lightning.progress import shows_progress
from retrieval_lightning.rank_zero import on_rank_zero
from retrieval_lightning.retrieval.gather import gather_dedupe
from retrieval_lightning.retrieval.identity import (
    datamodule_identity,
    identity_tag,
    items_identity,
    module_identity,
    precision_identity,
)
from retrieval_lightning.retrieval.postprocess import postprocess_descriptors
from retrieval_lightning.retrieval.rerank_eval import RerankEntryWriter, evaluate_reranked
from retrieval_lightning.retrieval.workdirs import in_use_by_another_process, mark_in_use
from retrieval_lightning.retrieval.writer import UNREADABLE


class EvaluationLoop:
    """The evaluation hooks of :class:`~retrieval_lightning.module.RetrievalModule` (its attributes)."""

    def _eval_sets(self, stage: str) -> list[EvalSet]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "eval_sets"):
            owner = "no datamodule was given" if datamodule is None else f"{type(datamodule).__name__} has none"
            raise RuntimeError(f"evaluation needs a datamodule with eval_sets(stage); {owner}")
        return checked_eval_sets(datamodule.eval_sets(stage), datamodule)

    def _reranks(self) -> bool:
        if self.rerank_head is None or not self.rerank.enabled:
            return False
        return self.rerank.during_fit or self.trainer.state.fn != "fit"

    def head_arguments(self) -> dict[str, list[Any]]:
        """``{role: [class name, init arguments(, store revision)]}``: what shapes extraction besides the
        weights (a keep ratio or a keypoint budget is an argument), for store identities. A head's
        ``scoring_only`` arguments are left out: they do not change what is stored. Its
        ``store_revision`` is appended when not 0, so earlier identities are unchanged."""
        # the registry name: a config's alias class and the class a checkpoint rebuilds share it
        return {role: [head_class_path(type(h)),
                       {k: v for k, v in h.init_args.items() if k not in h.scoring_only}]
                + ([h.store_revision] if h.store_revision else [])
                for role, h in self.heads.items()}

    def entry_identity(self) -> dict[str, Any]:
        """Identity of stored entries: the weights plus everything that shapes an entry."""
        kinds = {f"{side}:{k}": [v.dtype, list(v.shape), v.ragged]
                 for side, db in (("q", False), ("db", True)) for k, v in self.rerank_entry_kinds(db).items()}
        return module_identity(self, exclude=self.is_training_only, model_class=type(self).__name__, kinds=kinds,
                               heads=self.head_arguments(), backbone=self.backbone.feature_arguments())

    def rerank_store_identity(self) -> dict[str, Any]:
        """Identity of this run's re-ranking entries: the entries' own, the trainer's precision (entries of a
        ``bf16-mixed`` run are not an fp32 run's) and the images (another max_side or query-box rounding)."""
        return {**self.entry_identity(), **precision_identity(self.trainer.precision),
                **datamodule_identity(self.trainer.datamodule)}

    def _start_eval(self, prefix: str, stage: str) -> None:
        self._eval_buffers.clear()
        self._rerank_writers: dict[int, RerankEntryWriter] = {}
        self._release_entries()
        sets = self._eval_sets(stage)  # checked before anything is embedded
        loaders = self.trainer.num_test_batches if stage == "test" else self.trainer.num_val_batches
        if len(loaders) != len(sets):  # each loader is the eval set of its position
            raise UsageError(f"{type(self.trainer.datamodule).__name__} gives {len(loaders)} {prefix} loaders for "
                             f"{len(sets)} eval sets ({[s.name for s in sets]}): one loader per eval set, in order")
        if not self._reranks() or self.trainer.sanity_checking:
            return
        common = self.rerank_store_identity()
        root = Path(self.rerank.store_dir or Path(self.trainer.default_root_dir) / "rerank_store")
        for idx, eval_set in enumerate(sets):
            identity = {**common, **items_identity(eval_set)}  # entries resume by position: the same items only
            tag = identity_tag(identity)
            parent = root / prefix / eval_set.name
            if self.trainer.is_global_zero and parent.is_dir():
                for old in parent.iterdir():  # entries of earlier weights or data settings are never read again,
                    if old.is_dir() and old.name != tag and not in_use_by_another_process(old):  # unless a run
                        shutil.rmtree(old, ignore_errors=True)  # of other settings in this directory is using them
            if self.trainer.is_global_zero:
                self._entries_in_use.append(mark_in_use(parent / tag))
            self._rerank_writers[idx] = RerankEntryWriter(
                self, eval_set, parent / tag, identity, rank=self.global_rank, shard_size=self.rerank.shard_size
            )

    def _eval_step(self, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        desc = self.embed_batch(batch["image"])
        index = batch["index"].detach().cpu()
        # a datamodule skipping unreadable images (on_error: skip) marks the placeholders it gives instead
        unreadable = torch.as_tensor(batch.get("unreadable", torch.zeros(len(index))), dtype=torch.uint8).cpu()
        self._eval_buffers.setdefault(dataloader_idx, []).append((index, desc.cpu(), unreadable))
        writer = getattr(self, "_rerank_writers", {}).get(dataloader_idx)
        if writer is not None:
            writer.add(batch["image"], batch["index"], batch.get("resize_factor"), batch.get("unreadable"))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val", "validate")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test", "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val", "validate")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test", "test")

    def _finish_eval(self, prefix: str, stage: str) -> None:
        writers = getattr(self, "_rerank_writers", {})
        self._rerank_writers = {}
        if self.trainer.sanity_checking:
            self._eval_buffers.clear()
            return
        eval_sets = self._eval_sets(stage)
        self.last_eval = {}
        self.last_eval_global = {}
        for idx, eval_set in enumerate(eval_sets):
            chunks = self._eval_buffers.pop(idx, [])  # the batches go once concatenated: one copy, not two
            index = torch.cat([c[0] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
            desc = torch.cat([c[1] for c in chunks]) if chunks else torch.zeros(0, self.global_head.dim)
            unreadable = torch.cat([c[2] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.uint8)
            del chunks
            index, gathered = gather_dedupe(self, index, spill=self.spill, desc=desc, unreadable=unreadable)
            desc = gathered["desc"].cpu()
            unreadable = gathered["unreadable"].cpu()
            skipped = int(unreadable.sum())
            if skipped:
                rank_zero_warn(f"{prefix}: eval set {eval_set.name!r}: {skipped} of {len(eval_set.dataset)} images "
                               f"were unreadable (on_error: skip): {PLACEHOLDER_RULE}")
            expected = len(eval_set.dataset)
            writer = writers.get(idx)
            if writer is not None:
                writer.close()
            if len(index) != expected or not torch.equal(index.cpu(), torch.arange(expected)):
                if self._eval_is_partial(prefix):
                    rank_zero_warn(f"{prefix}: eval set {eval_set.name!r} only partly evaluated "
                                   f"({len(index)}/{expected} items, batch limits): metrics skipped")
                    continue
                raise RuntimeError(
                    f"eval set {eval_set.name!r}: gathered {len(index)} unique items, expected {expected}"
                )
            desc = self.postprocessed(eval_set, desc, unreadable)
            result = evaluate_eval_set(eval_set, desc, chunk=self.search_chunk, device=self.device,
                                       unreadable=unreadable)
            self.last_eval_global[eval_set.name] = result
            self.last_eval[eval_set.name] = result
            # computed from identical gathered data on every rank: no sync needed, no rank-0-only hang
            self._log_metrics(f"{prefix}/{eval_set.name}", result.metrics)
            if writer is not None:
                reranked = self._rerank_eval_set(writer, eval_set, desc, unreadable)
                self.last_eval[eval_set.name] = reranked
                self._log_metrics(f"{prefix}/{eval_set.name}/reranked", reranked.metrics)
        self._eval_buffers.clear()
        self._release_entries()

    def _release_entries(self) -> None:
        """Unmark the re-ranking entry folders this evaluation used (:func:`mark_in_use`)."""
        for marker in getattr(self, "_entries_in_use", []):
            marker.unlink(missing_ok=True)
        self._entries_in_use: list[Path] = []

    def postprocessed(self, eval_set: EvalSet, desc: Tensor,
                      unreadable: Tensor | np.ndarray | None = None) -> EvalDescriptors:
        """``desc`` (queries then database) after the configured alpha-QE / DBA, as ``(queries, database)``;
        unchanged without. The placeholders of unreadable images (``unreadable`` flags) are no one's neighbour.
        The two stay apart: αQE alone leaves the database as given (a store's memory map, a spilled gather's
        file), where one tensor would copy it into every rank's memory (4 GB for ROxford+1M in fp16)."""
        if self.postprocess is None or not self.postprocess.enabled:
            return desc
        nq = eval_set.n_queries
        queries, database = postprocess_descriptors(desc[:nq].float(), desc[nq:], self.postprocess,
                                                    excluded=unreadable_database(eval_set, unreadable),
                                                    chunk_size=self.search_chunk, device=self.device)
        return queries.to(desc.dtype), database.to(desc.dtype)  # DBA's new database in the store's dtype (fp16)

    def _log_metrics(self, prefix: str, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            name = f"{prefix}/{key}"
            self.log(name, value, add_dataloader_idx=False, sync_dist=False)
            quiet_sync_dist_advice(name)

    def _rerank_eval_set(self, writer: RerankEntryWriter, eval_set: EvalSet, desc: EvalDescriptors,
                         unreadable: Tensor | None = None) -> EvalResult:
        strategy = self.trainer.strategy
        strategy.barrier()
        on_rank_zero(writer.merge, self.trainer.is_global_zero, strategy.broadcast,
                     f"merging {eval_set.name}'s re-ranking entries")
        query_store, db_store = writer.open()
        return evaluate_reranked(
            self, eval_set, desc, query_store, db_store, self.rerank,
            rank=self.global_rank, world_size=self.trainer.world_size, chunk=self.search_chunk,
            device=self.device, progress=shows_progress(self.trainer), unreadable=unreadable,
        )

    def _eval_is_partial(self, prefix: str) -> bool:
        trainer = self.trainer
        limit = trainer.limit_val_batches if prefix == "val" else trainer.limit_test_batches
        full = isinstance(limit, float) and limit == 1.0
        return bool(trainer.fast_dev_run) or not full

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-item outputs for the feature store: dataset index, fp16 global descriptor, re-ranking entries."""
        descriptors = self.embed_batch(batch["image"])
        if getattr(self._trainer, "world_size", 1) == 1:  # at once; under DDP rank 0 checks the merged store, as
            check_finite_descriptors(descriptors, batch["index"], "extract")  # one rank raising alone would hang
        out: dict[str, Any] = {"index": batch["index"], "global": descriptors.half()}
        # placeholders of unreadable images (on_error: skip) are marked, so a re-run of extract retries them
        out[UNREADABLE] = torch.as_tensor(batch.get("unreadable", torch.zeros(len(batch["index"]))), dtype=torch.uint8)
        if self.rerank_head is not None:
            entries = self.rerank_entries(batch["image"], database=True, resize_factors=batch.get("resize_factor"))
            for name in entries[0] if entries else ():
                out[self.rerank_prefix + name] = [e[name] for e in entries]
        return out


_QUIETED: set[str] = set()


def quiet_sync_dist_advice(name: str) -> None:
    """Silence Lightning's advice to log ``name`` with ``sync_dist=True`` under DDP (printed once per metric
    at every evaluation's end): evaluation metrics are computed on every rank from the same gathered data,
    so averaging them over ranks would only cost a collective. Only the names logged here are silenced."""
    if name not in _QUIETED:
        _QUIETED.add(name)
        warnings.filterwarnings("ignore", message=re.escape(f"It is recommended to use `self.log({name!r}, ..., "
                                                            "sync_dist=True)`"))
