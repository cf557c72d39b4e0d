"""Re-ranked evaluation of one eval set: entries → per-rank shards → stores → shortlists → scores → metrics.

:class:`RerankEntryWriter` is fed batches during the evaluation loop (or by :func:`extract_entries`
in a notebook) and writes the re-ranking entries of queries and database images through
:class:`~retrieval_lightning.retrieval.writer.ShardWriter`, the code path of ``extract``: per-rank
atomic shards, resumable (items already in shards of the same model are skipped), merged into one
store per side. :func:`evaluate_reranked` then splits the queries over the ranks; each rank reads
only its queries' shortlisted rows, scores them, and every rank gathers all scores and computes the
same metrics.

The model is anything with the small inference API of
:class:`~retrieval_lightning.module.RetrievalModule`: ``rerank_entry_kinds(database)``,
``rerank_entries(images, database)``, ``score_entries(query, candidates, seeds)``,
``densify_entries(entries)`` and ``rerank_prefix``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.distributed import torch_all_gather_object
from retrieval_lightning.evaluation import (
    ALL,
    EvalDescriptors,
    EvalResult,
    evaluate_eval_set,
    protocol_of,
    split_descriptors,
    unreadable_database,
)
from retrieval_lightning.rank_zero import raise_if_any_failed

from .rerank import (
    EntryReader,
    RerankConfig,
    build_shortlists,
    fused_rankings,
    gather_query_scores,
    score_shortlists,
    search_depth,
    split_queries,
)
from .search import topk_search
from .store import MANIFEST, FeatureStore, normalize_identity
from .workdirs import atomic_write_text
from .writer import UNREADABLE, ShardWriter, completed_indices, list_shards, merge_shards

QUERIES, DATABASE = "queries", "database"
MERGED_FROM = "store.merged_from.json"  # beside the store: the shard names it was merged from


class RerankModel(Protocol):
    rerank_prefix: str

    def rerank_entry_kinds(self, database: bool = True) -> Mapping[str, Any]: ...

    def rerank_entries(self, images: Sequence[Tensor], database: bool = True,
                       resize_factors: Tensor | None = None) -> list[dict[str, Tensor]]: ...

    def score_entries(self, query: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]],
                      seeds: Sequence[int]) -> Tensor: ...

    def densify_entries(self, entries: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]: ...


class RerankEntryWriter:
    """Writes one eval set's re-ranking entries (queries and database apart) as resumable shards.

    ``directory`` holds ``queries/`` and ``database/`` shard folders and, after :meth:`merge`,
    ``queries/store`` and ``database/store`` (only the ``sides`` asked for). Items already present in
    shards written with the same ``identity`` are skipped, so an interrupted evaluation restarted with
    the same model only extracts what is missing.
    """

    def __init__(
        self,
        model: RerankModel,
        eval_set: EvalSet,
        directory: str | Path,
        identity: Mapping[str, Any],
        rank: int = 0,
        shard_size: int = 256,
        sides: Sequence[str] = (QUERIES, DATABASE),
    ) -> None:
        unknown = set(sides) - {QUERIES, DATABASE}
        if unknown or not sides:
            raise ValueError(f"sides must be among {(QUERIES, DATABASE)}, got {tuple(sides)}")
        self.model = model
        self.n_queries = eval_set.n_queries
        self.total = len(eval_set.dataset)  # type: ignore[arg-type]
        self.directory = Path(directory)
        self.identity = normalize_identity(identity)
        self.prefix = model.rerank_prefix
        self.writers: dict[str, ShardWriter] = {}
        self.done: dict[str, np.ndarray] = {}
        for side in sides:
            kinds = model.rerank_entry_kinds(database=side == DATABASE)
            dtypes = {self.prefix + name: kind.dtype for name, kind in kinds.items()}
            folder = self.directory / side
            self.done[side] = completed_indices(folder, self.identity) if folder.is_dir() else np.zeros(0, np.int64)
            self.writers[side] = ShardWriter(folder, rank, shard_size, self.identity, dtypes)
        self.extracted = 0

    def add(self, images: Sequence[Tensor], indices: Tensor | Sequence[int],
            resize_factors: Tensor | Sequence[Sequence[float]] | None = None,
            unreadable: Tensor | Sequence[bool] | None = None) -> None:
        """Extract and buffer the entries of a batch (skipping items already written); ``resize_factors``:
        each image's (height, width) over its original's (the eval items' ``resize_factor``);
        ``unreadable``: the items that are placeholders of unreadable images (``on_error: skip``), marked so
        that a later run extracts them again, as ``extract`` does, once the file is readable."""
        indices = np.asarray(torch.as_tensor(indices).cpu().tolist(), dtype=np.int64).reshape(-1)
        factors = None if resize_factors is None else \
            torch.as_tensor(resize_factors, dtype=torch.float64).cpu().reshape(len(indices), 2)
        flags = None if unreadable is None else \
            np.asarray(torch.as_tensor(unreadable).cpu().tolist(), dtype=np.uint8).reshape(len(indices))
        for side, wanted in ((QUERIES, indices < self.n_queries), (DATABASE, indices >= self.n_queries)):
            if side not in self.writers:
                continue
            todo = np.nonzero(wanted & ~np.isin(indices, self.done[side]))[0]
            if todo.size == 0:
                continue
            chosen = None if factors is None else factors[torch.as_tensor(todo)]
            entries = self.model.rerank_entries([images[i] for i in todo], database=side == DATABASE,
                                                resize_factors=chosen)
            batch: dict[str, Any] = {"index": indices[todo]}
            for name in entries[0]:
                batch[self.prefix + name] = [e[name].detach().cpu() for e in entries]
            if flags is not None:
                batch[UNREADABLE] = flags[todo]
            self.writers[side].add(batch)
            self.extracted += int(todo.size)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def merge(self, progress: bool = False) -> None:
        """Merge each side's shards into its store, skipped when an identical store was merged from the very
        shards in place. The shard list is what tells: under DDP rank 0 merges, and another rank may be the one
        that wrote a new shard (an image read this time that was a placeholder before); a run killed between
        its last shard and the merge leaves one too."""
        for side, expected in ((QUERIES, range(self.n_queries)), (DATABASE, range(self.n_queries, self.total))):
            if side not in self.writers:
                continue
            folder = self.directory / side
            store = folder / "store"
            shards = sorted(shard.name for shard in list_shards(folder))
            if _store_matches(store, self.identity, len(expected)) and _merged_from(folder) == shards:
                continue
            merge_shards(folder, store, expect_identity=self.identity, expected_indices=expected,
                         overwrite=True, progress=progress)
            atomic_write_text(folder / MERGED_FROM, json.dumps(shards) + "\n")

    def open(self) -> tuple[FeatureStore, FeatureStore]:
        return self.open_side(QUERIES), self.open_side(DATABASE)

    def open_side(self, side: str) -> FeatureStore:
        """The merged store of one side (``queries`` or ``database``)."""
        return FeatureStore.open(self.directory / side / "store", self.identity)


def _merged_from(folder: Path) -> list[str] | None:
    """The shard names the side's store was last merged from (None: not recorded)."""
    record = folder / MERGED_FROM
    return json.loads(record.read_text()) if record.is_file() else None


def _store_matches(path: Path, identity: Mapping[str, Any], count: int) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text())
    return data.get("identity") == identity and int(data.get("count", -1)) == count


def evaluate_reranked(
    model: RerankModel,
    eval_set: EvalSet,
    descriptors: EvalDescriptors,
    query_store: FeatureStore,
    db_store: FeatureStore,
    config: RerankConfig,
    rank: int = 0,
    world_size: int = 1,
    all_gather_object: Callable[[Any], list[Any]] | None = None,
    chunk: int = 65536,
    device: Any = "cpu",
    progress: bool = True,
    unreadable: Tensor | np.ndarray | None = None,
) -> EvalResult:
    """Metrics of the re-ranked ranking; ``descriptors`` are the global ones, queries first; ``unreadable``
    flags placeholders of unreadable images, which no shortlist takes (they match nothing, as globally);
    without it, the entry stores' own placeholder marks (:func:`extract_entries` writes them).

    Every rank must call it with the same descriptors; each re-scores its share of the queries
    and the scores are gathered (``all_gather_object``, default: the torch process group if one
    is initialised), so every rank returns the same metrics.
    """
    gather = all_gather_object if all_gather_object is not None else torch_all_gather_object()
    if world_size > 1 and gather is None:  # each rank would score its share and miss the others' scores
        raise ValueError(f"evaluate_reranked: world_size={world_size} needs all_gather_object or an initialised "
                         f"process group of that size")
    nq = eval_set.n_queries
    if unreadable is None:
        unreadable = stored_placeholders(len(eval_set.dataset), query_store, db_store)  # type: ignore[arg-type]
    queries, database = split_descriptors(descriptors, nq)  # the database as given: maybe a memory map
    queries = queries.float()
    protocol = protocol_of(eval_set)
    exclusions = protocol.exclusions(eval_set.ground_truth, nq) if config.shortlist == "protocol" else None
    # the search ranks placeholders last itself: only the per-query junk makes it go deeper than k
    depth = search_depth(config.k, database.shape[0], exclusions)
    placeholders = unreadable_database(eval_set, unreadable)
    if placeholders.size:  # beyond the others they still come back (a small database): no shortlist takes them
        exclusions = {name: [np.union1d(skip, placeholders) for skip in per_query]
                      for name, per_query in (exclusions or {ALL: [placeholders] * nq}).items()}
    _, ranking = topk_search(queries, database, k=depth, chunk_size=chunk, device=device, excluded=placeholders)
    shortlists = build_shortlists(ranking, config.k, exclusions)
    prefix = model.rerank_prefix
    failure: Exception | None = None
    scored: list = []
    try:
        scored = score_shortlists(
            shortlists,
            split_queries(nq, rank, world_size),
            EntryReader(query_store, prefix),
            EntryReader(db_store, prefix, transform=model.densify_entries),
            model.score_entries,
            query_index=lambda q: q,
            db_index=lambda positions: positions + nq,
            progress=progress,
            desc=f"re-ranking {eval_set.name} (rank {rank})",
        )
    except Exception as err:  # a head's refusal on this rank's queries: raised below, once every rank knows
        failure = err
    raise_if_any_failed(failure, gather, f"re-ranking {eval_set.name}")
    everything = gather_query_scores(scored, gather)

    def global_score(q: int, positions: np.ndarray) -> np.ndarray:
        return (database[torch.from_numpy(np.asarray(positions, np.int64))].float() @ queries[q]).double().numpy()

    rankings = fused_rankings(shortlists, everything, global_score, config)
    result = evaluate_eval_set(eval_set, descriptors, chunk=chunk, reranked=rankings, device=device,
                               unreadable=unreadable)
    result.extra["rerank_scores"] = {item.query: (item.positions, item.scores) for item in everything}
    return result


@contextmanager
def evaluation_mode(model: Any) -> Iterator[None]:
    """``model`` in evaluation mode (BatchNorm on its running statistics, as ``test`` runs it), then each of
    its modules back in the mode it was in (a part the caller put in eval mode stays there). A model built by
    the CLI starts in training mode."""
    modes = [(module, module.training) for module in model.modules()] if hasattr(model, "modules") else []
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def stored_placeholders(n_items: int, *stores: FeatureStore) -> np.ndarray:
    """Flags over an eval set's ``n_items`` positions of the items the ``stores`` hold as placeholders of
    unreadable images (``on_error: skip``)."""
    flags = np.zeros(n_items, dtype=bool)
    for store in stores:
        if UNREADABLE in store.kinds:
            flags[np.asarray(store.index)[np.asarray(store.array(UNREADABLE), dtype=bool)]] = True
    return flags


def extract_entries(
    model: Any,
    eval_set: EvalSet,
    directory: str | Path,
    identity: Mapping[str, Any],
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Tensor, FeatureStore, FeatureStore]:
    """Notebook path without a Trainer: global descriptors and entry stores of a whole eval set; the
    placeholders of unreadable images (``on_error: skip``) are marked in the stores, which
    :func:`evaluate_reranked` reads."""
    from tqdm.auto import tqdm

    writer = RerankEntryWriter(model, eval_set, directory, identity)
    descriptors = []
    n = len(eval_set.dataset)  # type: ignore[arg-type]
    with evaluation_mode(model), torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"extracting {eval_set.name}", disable=not progress):
            items = [eval_set.dataset[i] for i in range(start, min(n, start + batch_size))]
            images = [item["image"] for item in items]
            descriptors.append(model.embed_batch(images).cpu())
            writer.add(images, [item["index"] for item in items],
                       [item.get("resize_factor", (1.0, 1.0)) for item in items],
                       [bool(item.get("unreadable", False)) for item in items])
    writer.close()
    writer.merge()
    query_store, db_store = writer.open()
    return torch.cat(descriptors), query_store, db_store
