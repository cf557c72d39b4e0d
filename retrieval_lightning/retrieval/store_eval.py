"""Metrics from the global descriptors ``extract`` stored, without extracting them again.

At ROxford+1M scale, ``test`` embeds a million images and holds every descriptor in memory on every
rank; a failure near the end loses it all. ``extract`` writes them in resumable shards instead, and
this module evaluates that store: memory-mapped fp16 rows, scored in chunks by the same protocol
code as ``test`` (:func:`~retrieval_lightning.evaluation.evaluate_eval_set`), and the shortlists
re-scored from the stored entries when the model re-ranks. The store must come from the same model
and data arguments (its identity is checked, naming what differs).

A sparsifier stores every item as a database image, queries included, but a query is scored from its
dense entries (CVNet-DS sparsifies the database side only). Those few entries (70 queries for
ROxford, against a million database images) are extracted from the query images once, beside the
store (``<set>/query_entries``), and reused while the store's identity holds.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.errors import UsageError
from retrieval_lightning.evaluation import EvalResult, evaluate_eval_set
from retrieval_lightning.rank_zero import on_rank_zero
from retrieval_lightning.retrieval.rerank_eval import (
    QUERIES, RerankEntryWriter, evaluate_reranked, evaluation_mode,
)
from retrieval_lightning.retrieval.store import FeatureStore, StoreIdentityError
from retrieval_lightning.retrieval.writer import placeholder_note, stored_unreadable

#: query images embedded at a time for their dense entries
QUERY_BATCH = 8


def choose_eval_sets(sets: Sequence[EvalSet], name: str | None) -> list[EvalSet]:
    """All of ``sets``, or the one called ``name`` (a one-line error listing them otherwise)."""
    chosen = [s for s in sets if name in (None, s.name)]
    if not chosen:
        raise UsageError(f"--eval_set {name!r}: the datamodule has no such eval set; it has {[s.name for s in sets]}")
    return chosen


def stored_descriptors(eval_set: EvalSet, store: FeatureStore) -> torch.Tensor:
    """The store's global descriptors in dataset order, as a (N, D) tensor over the memory map."""
    expected = len(eval_set.dataset)  # type: ignore[arg-type]
    index = np.asarray(store.index)
    if len(index) != expected or not np.array_equal(index, np.arange(expected)):
        raise UsageError(f"feature store {store.path} holds {len(index)} of the {expected} images of eval set "
                         f"{eval_set.name!r}: re-run `extract` with the same arguments to finish it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: nothing here writes to it
        return torch.from_numpy(store.array("global"))


def evaluate_store(model: Any, eval_set: EvalSet, features_dir: str | Path, identity: dict[str, Any],
                   progress: bool = True, rank: int = 0, world_size: int = 1,
                   broadcast: Callable[[Any], Any] = lambda value: value,
                   forward_context: Callable[[], ContextManager[Any]] = nullcontext,
                   ) -> tuple[EvalResult, EvalResult | None]:
    """Global metrics of ``eval_set`` from ``<features_dir>/<set>/store`` (written by ``extract``), and the
    re-ranked ones when the model re-ranks and the store holds its entries (``None`` otherwise).

    Under DDP every rank calls it (``broadcast`` sends rank 0's value to all, and waits for them): each
    re-scores its share of the queries and every rank returns the same metrics.

    The store holds every item's entries as a database image's. Without a sparsifier a query's entry
    is the same, so the shortlists are re-scored from the store, as ``test`` re-scores them from its
    own (same pair seeds). With one, the queries' dense entries come from :func:`write_query_entries`,
    inside ``forward_context`` (the trainer precision's autocast, as ``test`` extracts them).
    """
    path = Path(features_dir) / eval_set.name / "store"
    if not (path / "manifest.json").is_file():
        raise UsageError(f"no feature store at {path}: run `retrieval-lightning extract` with the same arguments "
                         f"and --output_dir {features_dir} first")
    store = FeatureStore.open(path, expect_identity=identity)
    note = placeholder_note(store, f"evaluate {eval_set.name}", eval_set.image_ids)
    if note and rank == 0:
        warnings.warn(note, stacklevel=2)
    descriptors = stored_descriptors(eval_set, store)
    unreadable = stored_unreadable(store)
    descriptors = model.postprocessed(eval_set, descriptors, unreadable)  # unchanged unless αQE / DBA is on
    chunk = model.search_chunk
    result = evaluate_eval_set(eval_set, descriptors, chunk=chunk, device=model.device, unreadable=unreadable)
    if not reranks_from_store(model, store):
        return result, None
    queries = store
    if model.sparsifier is not None:
        directory = path.parent / "query_entries"
        on_rank_zero(lambda: write_query_entries(model, eval_set, directory, store.identity, progress,
                                                 forward_context),
                     rank == 0, broadcast, f"{eval_set.name}: writing the queries' entries")
        queries = FeatureStore.open(directory / QUERIES / "store", expect_identity=store.identity)
    reranked = evaluate_reranked(model, eval_set, descriptors, queries, store, model.rerank, rank=rank,
                                 world_size=world_size, chunk=chunk, device=model.device, progress=progress,
                                 unreadable=unreadable)
    return result, reranked


def reranks_from_store(model: Any, store: FeatureStore) -> bool:
    """Whether :func:`evaluate_store` can re-rank: a re-ranking head whose entries the store holds."""
    if model.rerank_head is None or not model.rerank.enabled:
        return False
    return any(kind.startswith(model.rerank_prefix) for kind in store.kinds)


def write_query_entries(model: Any, eval_set: EvalSet, directory: Path, identity: dict[str, Any],
                        progress: bool = True,
                        forward_context: Callable[[], ContextManager[Any]] = nullcontext) -> FeatureStore:
    """The queries' entries as a query is scored (not sparsified), in ``directory/queries/store``:
    extracted from the query images on first use (resumable shards, as ``test`` writes them), reused
    afterwards; those of another store (a store extracted again with other weights) are replaced."""
    try:
        writer = RerankEntryWriter(model, eval_set, directory, identity, sides=(QUERIES,))
    except StoreIdentityError:
        shutil.rmtree(directory)
        writer = RerankEntryWriter(model, eval_set, directory, identity, sides=(QUERIES,))
    todo = np.setdiff1d(np.arange(eval_set.n_queries), writer.done[QUERIES])
    batches = range(0, len(todo), QUERY_BATCH)
    with evaluation_mode(model), forward_context():
        for start in tqdm(batches, desc=f"{eval_set.name}: query entries", disable=not progress or not len(todo)):
            items = [eval_set.dataset[int(i)] for i in todo[start:start + QUERY_BATCH]]
            writer.add([item["image"] for item in items], [int(item["index"]) for item in items],
                       [item.get("resize_factor", (1.0, 1.0)) for item in items],
                       [bool(item.get("unreadable", False)) for item in items])
    writer.close()
    writer.merge()
    return writer.open_side(QUERIES)
