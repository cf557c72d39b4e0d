"""Global-descriptor post-processing users expect: alpha query expansion and DBA, both off by default.

αQE (Radenović et al., TPAMI 2018) replaces a query by the L2-normalised sum of itself and its
top-n neighbours weighted by ``max(similarity, 0) ** alpha``; DBA does the same for every
database vector with its top-k neighbours (itself included, as its own first neighbour). Both
read only what they need from a memory-mapped database: αQE the shortlisted rows, DBA one chunk
of rows at a time (DBA is still N searches over N rows: run it once and store the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .search import as_tensor, topk_search
from .store import FeatureStore


@dataclass
class PostProcessConfig:
    """Which post-processing to apply around the global search (all off by default)."""

    query_expansion: bool = False
    qe_n: int = 2
    qe_alpha: float = 3.0
    dba: bool = False
    dba_k: int = 2
    dba_alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.qe_n < 1 or self.dba_k < 1:
            raise ValueError(f"PostProcessConfig: qe_n ({self.qe_n}) and dba_k ({self.dba_k}) must be >= 1")
        if self.qe_alpha < 0 or self.dba_alpha < 0:
            raise ValueError(f"PostProcessConfig: alphas must be >= 0, got {self.qe_alpha}, {self.dba_alpha}")

    @property
    def enabled(self) -> bool:
        return self.query_expansion or self.dba


def _rows(db: Tensor, positions: Tensor) -> Tensor:
    """Gather rows (any shape of positions) as fp32, reading each needed row once."""
    flat = positions.reshape(-1).cpu()
    unique, inverse = torch.unique(flat, return_inverse=True)
    picked = db[unique].float()
    return picked[inverse].reshape(*positions.shape, db.shape[1])


def _weighted_sum(vectors: Tensor, neighbours: Tensor, alpha: float, include_self: bool) -> Tensor:
    """normalise(self? + Σ max(<v, x_i>, 0)^alpha x_i) for v (M, D), neighbours (M, n, D)."""
    sims = torch.einsum("md,mnd->mn", vectors, neighbours).clamp(min=0)
    weights = sims.pow(alpha)
    combined = torch.einsum("mn,mnd->md", weights, neighbours)
    if include_self:
        combined = combined + vectors
    return F.normalize(combined, dim=1)


def alpha_query_expansion(
    queries: Tensor | np.ndarray,
    database: Tensor | np.ndarray | FeatureStore,
    topk_indices: Tensor | np.ndarray,
    n: int = 2,
    alpha: float = 3.0,
    kind: str = "global",
) -> Tensor:
    """Expanded queries (Q, D) float32: normalise(q + Σ_{i<n} max(q·x_i, 0)^alpha x_i).

    ``topk_indices`` (Q, >=n) are database rows ranked for each query (e.g. from
    :func:`~.search.topk_search`); only those n rows per query are read from the database.
    """
    db = as_tensor(database, kind)
    q = torch.as_tensor(queries).float().cpu()
    idx = torch.as_tensor(topk_indices).long()
    if idx.dim() != 2 or idx.shape[0] != q.shape[0] or idx.shape[1] < n:
        raise ValueError(f"topk_indices must be (Q={q.shape[0]}, >= n={n}), got {tuple(idx.shape)}")
    return _weighted_sum(q, _rows(db, idx[:, :n]), alpha, include_self=True)


def _nearest_kept(queries: Tensor, db: Tensor, k: int, excluded: np.ndarray | None,
                  **search_kwargs: Any) -> Tensor:
    """(Q, k) nearest database rows of each query, none of them ``excluded`` (placeholders of unreadable
    images, which match nothing)."""
    return topk_search(queries, db, k, excluded=excluded, **search_kwargs)[1]


def database_augmentation(
    database: Tensor | np.ndarray | FeatureStore,
    k: int = 2,
    alpha: float = 3.0,
    chunk_rows: int = 4096,
    out: np.ndarray | Tensor | None = None,
    kind: str = "global",
    excluded: np.ndarray | None = None,
    **search_kwargs: Any,
) -> np.ndarray | Tensor:
    """DBA: every row becomes normalise(Σ_{j in top-k(x)} max(x·x_j, 0)^alpha x_j), self included.

    Rows are processed ``chunk_rows`` at a time against the original database, so memory stays
    bounded; pass ``out`` (e.g. a writable memmap of shape (N, D)) to keep the result on disk.
    By default the result is a numpy array in the database's dtype. ``excluded`` rows (placeholders of
    unreadable images) are no row's neighbour.
    """
    db = as_tensor(database, kind)
    n, dim = db.shape
    k = min(k, n - (0 if excluded is None else int(excluded.size)))
    if out is None:
        out = np.empty((n, dim), dtype=torch.empty(0, dtype=db.dtype).numpy().dtype)
    if tuple(out.shape) != (n, dim):
        raise ValueError(f"database_augmentation: out must be {(n, dim)}, got {tuple(out.shape)}")
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        rows = db[start:stop].float()
        idx = _nearest_kept(rows, db, k, excluded, **search_kwargs)
        new = _weighted_sum(rows, _rows(db, idx), alpha, include_self=False)
        if isinstance(out, Tensor):
            out[start:stop] = new.to(out.dtype)
        else:
            out[start:stop] = new.numpy().astype(out.dtype, copy=False)
    return out


def postprocessed_search(
    queries: Tensor | np.ndarray,
    database: Tensor | np.ndarray | FeatureStore,
    k: int,
    config: PostProcessConfig | None = None,
    kind: str = "global",
    excluded: np.ndarray | None = None,
    **search_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`~.search.topk_search` after :func:`postprocess_descriptors` (DBA, then αQE), as ``config``
    asks: the evaluation's post-processing as one search. ``excluded`` database rows are never returned
    and no one's neighbour."""
    if excluded is not None:  # a list, or repeats, would miscount the rows left
        excluded = np.unique(np.asarray(excluded, dtype=np.int64))
    expanded, db = postprocess_descriptors(torch.as_tensor(queries), as_tensor(database, kind), config, excluded,
                                           **search_kwargs)
    return topk_search(expanded, db, k, excluded=excluded, **search_kwargs)


def postprocess_descriptors(
    queries: Tensor, database: Tensor, config: PostProcessConfig | None, excluded: np.ndarray | None = None,
    **search_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Evaluation's post-processing (``RetrievalModule(postprocess=...)``): DBA on the database, then
    αQE of the queries against it; unchanged when ``config`` asks for neither. The ``excluded`` database
    rows (placeholders of unreadable images) are no one's neighbour in either.

    The database is read in chunks and stays in its own dtype (a store's fp16 memory map is never
    copied whole as fp32: 8 GB for ROxford+1M at 2048-D); DBA writes a new array of that dtype; the
    queries come back fp32."""
    if config is None or not config.enabled:
        return queries, database
    if config.dba:
        database = torch.as_tensor(database_augmentation(database, config.dba_k, config.dba_alpha,
                                                         excluded=excluded, **search_kwargs))
    if config.query_expansion:
        qe_n = min(config.qe_n, database.shape[0] - (0 if excluded is None else int(excluded.size)))
        top = _nearest_kept(queries, database, qe_n, excluded, **search_kwargs)
        queries = alpha_query_expansion(queries, database, top, qe_n, config.qe_alpha)
    return queries.float(), database
