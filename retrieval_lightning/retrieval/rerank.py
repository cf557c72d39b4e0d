"""Re-ranking: global shortlist → re-score with a re-ranking head → fuse → rankings for the metrics.

Plain objects, usable from a notebook without a Trainer; :class:`~retrieval_lightning.module.RetrievalModule`
calls the same ones during ``test``/``validate``.

- :class:`RerankConfig`: shortlist size and mode, fusion, where entries are stored.
- :func:`build_shortlists`: per variant (e.g. revisitop Easy/Medium/Hard) the first K database
  positions of the global ranking that the variant does not exclude (its junk).
- :class:`EntryReader`: reads the entries of given dataset indices from a store, and only those.
- :func:`score_shortlists`: re-scores each query's candidates (the union over variants: each pair
  is scored once) through a ``scorer(query_entry, candidate_entries, seeds) -> (K,)``.
- :func:`fuse`: re-ranking score and global score → the order of the shortlisted positions.

Randomness (RANSAC) is seeded per (query, candidate) pair by :func:`pair_seeds`, from dataset
indices only, so scores do not depend on the rank, the number of processes or the order.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .store import FeatureStore

SHORTLIST_MODES = ("protocol", "plain")
FUSIONS = ("lexicographic", "weighted")
#: variant name of one shortlist serving every metric (``plain`` mode, or protocols without junk)
ALL = "all"

Entry = dict[str, Tensor]
Scorer = Callable[[Entry, Sequence[Entry], Sequence[int]], Tensor]


@dataclass
class RerankConfig:
    """How evaluation re-ranks the global shortlist.

    Args:
        k: shortlist size per query (default 100, as DELG and CVNet).
        shortlist: ``protocol``: per protocol variant (revisitop Easy/Medium/Hard) the first ``k``
            items that are not junk under that variant, each (query, item) pair scored once, as
            the official CVNet and DELG testers do; ``plain``: the first ``k`` of the global ranking.
        fusion: ``lexicographic``: re-ranking score first, global score for ties (DELG, inlier
            counts); ``weighted``: ``global + weight * score`` (CVNet, ``weight`` 0.5).
        weight: λ of the weighted fusion.
        store_dir: where per-image entries are written (per-rank shards, then one store per eval
            set); default ``<trainer.default_root_dir>/rerank_store``. Under multi-node DDP it must
            be on a file system every node sees.
        shard_size: images per shard file.
        enabled: evaluate with re-ranking when the model has a re-ranking head.
        during_fit: re-rank in ``fit``'s validations too. Off, they are global-only (DELG's RANSAC over a
            GLDv2 holdout's shortlists costs CPU-minutes per validation), while ``validate`` and
            ``test`` still re-rank.
    """

    k: int = 100
    shortlist: str = "protocol"
    fusion: str = "lexicographic"
    weight: float = 0.5
    store_dir: str | None = None
    shard_size: int = 256
    enabled: bool = True
    during_fit: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"rerank.k must be >= 1, got {self.k}")
        if self.shortlist not in SHORTLIST_MODES:
            raise ValueError(f"rerank.shortlist must be one of {SHORTLIST_MODES}, got {self.shortlist!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"rerank.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not math.isfinite(self.weight):  # NaN fused every score to NaN: the global order, silently
            raise ValueError(f"rerank.weight must be a finite number, got {self.weight}")
        if self.shard_size < 1:  # said when the config is read, not once the entries are written
            raise ValueError(f"rerank.shard_size must be >= 1 (images per shard file), got {self.shard_size}")


def content_seed(value: Tensor | np.ndarray | Mapping[str, Any]) -> int:
    """A CRC-32 of an image's pixels or of an entry's arrays (by key): a pair's seed that follows what is
    scored, not where it stands in a list or which batch it came in."""
    if isinstance(value, Mapping):
        crc = 0
        for key in sorted(value):
            crc = zlib.crc32(_raw_bytes(value[key]), zlib.crc32(str(key).encode(), crc))
        return crc
    return zlib.crc32(_raw_bytes(value))


def _raw_bytes(value: Any) -> bytes:
    if isinstance(value, Tensor):  # any dtype (bf16 has no numpy type): its bytes
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(np.asarray(value)).tobytes()


def pair_seeds(query_index: int, db_indices: Iterable[int]) -> list[int]:
    """Deterministic 31-bit seeds of (query, database item) pairs (a splitmix64 hash of both indices)."""
    with np.errstate(over="ignore"):
        z = np.asarray(list(db_indices), dtype=np.uint64) + np.uint64(int(query_index) & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return [int(v) for v in (z & np.uint64(0x7FFFFFFF))]


@dataclass
class Shortlists:
    """``variants[v][q]``: database positions of query ``q``'s shortlist under variant ``v``, in global order."""

    variants: dict[str, list[np.ndarray]]

    @property
    def n_queries(self) -> int:
        return len(next(iter(self.variants.values())))

    def candidates(self, q: int) -> np.ndarray:
        """Every position shortlisted for query ``q`` under any variant, once, in first-seen order."""
        parts = [v[q] for v in self.variants.values()]
        merged = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        _, first = np.unique(merged, return_index=True)
        return merged[np.sort(first)]


def build_shortlists(
    ranking: Tensor | np.ndarray, k: int, exclusions: Mapping[str, Sequence[np.ndarray]] | None = None
) -> Shortlists:
    """Shortlists from a global ranking (Q, k') of database positions.

    With ``exclusions`` (variant -> per query positions to skip) every variant gets the first ``k``
    positions it does not exclude; without, one ``all`` variant takes the first ``k``. The ranking
    must be deep enough: ``k`` plus the largest exclusion set (see :func:`search_depth`).
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    if exclusions is None:
        return Shortlists({ALL: [row[:k].copy() for row in ranking]})
    variants: dict[str, list[np.ndarray]] = {}
    for name, per_query in exclusions.items():
        if len(per_query) != len(ranking):
            raise ValueError(f"exclusions of variant {name!r} cover {len(per_query)} queries, ranking has {len(ranking)}")
        variants[name] = [row[~np.isin(row, skip)][:k] for row, skip in zip(ranking, per_query)]
    return Shortlists(variants)


def search_depth(k: int, n_database: int, exclusions: Mapping[str, Sequence[np.ndarray]] | None) -> int:
    """How deep the global search must go so every variant still finds ``k`` non-excluded items."""
    largest = 0
    if exclusions:
        largest = max((len(s) for per_query in exclusions.values() for s in per_query), default=0)
    return min(n_database, k + largest)


class EntryReader:
    """Entries of one store, read row by row on demand (a shortlist never loads the whole store).

    ``prefix`` is stripped from kind names (stores name kinds ``<role>-<name>``); ``transform``
    turns stored entries into what the scorer takes (e.g. a sparsifier's ``densify``).
    """

    def __init__(
        self,
        store: FeatureStore,
        prefix: str = "",
        transform: Callable[[list[Entry]], list[Entry]] | None = None,
    ) -> None:
        self.store = store
        self.kinds = [k for k in store.kinds if k.startswith(prefix)]
        if not self.kinds:
            raise KeyError(f"feature store {store.path} has no kinds starting with {prefix!r}: {sorted(store.kinds)}")
        self.prefix = prefix
        self.transform = transform

    def read(self, dataset_indices: Sequence[int] | np.ndarray) -> list[Entry]:
        rows = self.store.rows_of(np.asarray(dataset_indices, dtype=np.int64))
        order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
        entries: list[Entry] = [{} for _ in range(len(rows))]
        for kind in self.kinds:
            values = self.store.get(kind, rows[order])
            name = kind[len(self.prefix):]
            for slot, value in zip(order, values):
                entries[slot][name] = torch.from_numpy(np.ascontiguousarray(value))
        return self.transform(entries) if self.transform is not None else entries


@dataclass
class QueryScores:
    """Re-ranking scores of one query's candidates (database positions)."""

    query: int
    positions: np.ndarray
    scores: np.ndarray


def score_shortlists(
    shortlists: Shortlists,
    queries: Sequence[int],
    query_reader: EntryReader,
    db_reader: EntryReader,
    scorer: Scorer,
    query_index: Callable[[int], int] = lambda q: q,
    db_index: Callable[[np.ndarray], np.ndarray] = lambda p: p,
    progress: bool = True,
    desc: str = "re-ranking",
) -> list[QueryScores]:
    """Score the candidates of the given queries; only their rows are read from the stores.

    ``query_index(q)`` and ``db_index(positions)`` map query numbers and database positions to the
    dataset indices the stores hold (and that seed each pair).
    """
    out = []
    for q in tqdm(list(queries), desc=desc, disable=not progress, leave=False):
        positions = shortlists.candidates(q)
        if positions.size == 0:
            out.append(QueryScores(q, positions, np.zeros(0, np.float32)))
            continue
        qi = int(query_index(q))
        di = np.asarray(db_index(positions), dtype=np.int64)
        query_entry = query_reader.read([qi])[0]
        candidates = db_reader.read(di)
        with torch.no_grad():
            scores = scorer(query_entry, candidates, pair_seeds(qi, di.tolist()))
        scores = torch.as_tensor(scores).detach().float().cpu().numpy().reshape(-1)
        if scores.shape[0] != len(positions):
            raise ValueError(f"re-ranking scorer returned {scores.shape[0]} scores for {len(positions)} candidates")
        if not np.isfinite(scores).all():
            raise ValueError(f"re-ranking scorer returned NaN/Inf for query {qi}")
        out.append(QueryScores(q, positions, scores))
    return out


def fuse(
    positions: np.ndarray, global_scores: np.ndarray, rerank_scores: np.ndarray, fusion: str, weight: float = 0.5
) -> np.ndarray:
    """The shortlisted ``positions`` re-ordered by the fused score (ties: global order, i.e. input order)."""
    positions = np.asarray(positions)
    g = np.asarray(global_scores, dtype=np.float64)
    s = np.asarray(rerank_scores, dtype=np.float64)
    if fusion == "lexicographic":
        order = np.lexsort((np.arange(len(positions)), -g, -s))
    elif fusion == "weighted":
        order = np.lexsort((np.arange(len(positions)), -(g + weight * s)))
    else:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    return positions[order]


def fused_rankings(
    shortlists: Shortlists,
    scored: Iterable[QueryScores],
    global_score: Callable[[int, np.ndarray], np.ndarray],
    config: RerankConfig,
) -> dict[str, list[np.ndarray]]:
    """Per variant and query, the shortlist in fused order (what the metrics put first)."""
    table = {item.query: dict(zip(item.positions.tolist(), item.scores.tolist())) for item in scored}
    out: dict[str, list[np.ndarray]] = {}
    for variant, per_query in shortlists.variants.items():
        rows = []
        for q, positions in enumerate(per_query):
            if q not in table:
                raise KeyError(f"no re-ranking scores for query {q}")
            s = np.array([table[q][int(p)] for p in positions], dtype=np.float64)
            rows.append(fuse(positions, global_score(q, positions), s, config.fusion, config.weight))
        out[variant] = rows
    return out


def split_queries(n_queries: int, rank: int, world_size: int) -> list[int]:
    """The queries a rank re-ranks: every ``world_size``-th, starting at ``rank``."""
    return list(range(rank, n_queries, world_size))


def gather_query_scores(local: list[QueryScores], all_gather_object: Callable[[Any], list[Any]] | None) -> list[QueryScores]:
    """Every rank's :class:`QueryScores`, sorted by query (identity without a process group)."""
    parts = [local] if all_gather_object is None else all_gather_object(local)
    merged = [item for part in parts for item in part]
    return sorted(merged, key=lambda item: item.query)
