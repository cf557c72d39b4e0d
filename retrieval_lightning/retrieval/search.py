"""Exact inner-product top-k over a database too large for a Q×N score matrix, plus FAISS.

:func:`topk_search` streams the database in chunks: each chunk is converted to fp32 (fp16 storage
is exact in fp32, so scores are ordinary fp32 dot products, as FAISS computes them), multiplied by
the queries, and reduced to its own top-k; the per-block candidates are merged with a stable sort,
so ties come out lower database index first, exactly as a full stable argsort would order them.
Peak memory beyond the (memory-mapped) database is a few chunk buffers, whatever N is.

:class:`FaissSearcher` is the optional FAISS backend (``pip install .[faiss]``): a flat
inner-product index (exact, same top-k as :func:`topk_search`) or IVF-PQ for very large sets.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .store import FeatureStore

#: rows converted and multiplied per step; small enough that the fp32 copy stays in L2 cache
DEFAULT_SUB_CHUNK = 1024
#: columns of scores reduced by one ``topk`` call
DEFAULT_CHUNK = 32768


def as_tensor(array: Any, kind: str = "global") -> Tensor:
    """View a tensor, numpy array, read-only memmap or :class:`FeatureStore` kind as a tensor.

    Memory maps are wrapped without a copy: pages are read only when a chunk touches them.
    """
    if isinstance(array, FeatureStore):
        array = array.array(kind)
    if isinstance(array, Tensor):
        return array
    arr = np.asarray(array)
    if not arr.flags.c_contiguous:
        raise ValueError(f"database array must be C-contiguous, got strides {arr.strides}")
    with warnings.catch_warnings():
        # read-only memmaps: torch warns that writes would be undefined; we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _sorted_topk(scores: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of candidate rows by (score descending, index ascending): a stable total order."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores = scores.gather(1, by_index)
    index = index.gather(1, by_index)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), index.gather(1, order)


def _block_topk(scores: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """Top-k of one (Q, B) score block; when the k-th value is tied, keep the lowest columns."""
    vals, cols = torch.topk(scores, k, dim=1, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    ties_in_block = (scores == kth).sum(dim=1)
    ties_taken = (vals == kth).sum(dim=1)
    for row in torch.nonzero(ties_in_block > ties_taken).flatten().tolist():
        # more columns share the k-th score than topk kept: take every column >= k-th value,
        # which are ascending, then a stable sort keeps the lowest ones among equals
        candidates = torch.nonzero(scores[row] >= kth[row]).flatten()
        order = torch.sort(scores[row, candidates], descending=True, stable=True).indices[:k]
        cols[row] = candidates[order]
        vals[row] = scores[row, cols[row]]
    return vals, cols + offset


def topk_search(
    queries: Tensor | np.ndarray,
    database: Tensor | np.ndarray | FeatureStore,
    k: int,
    chunk_size: int = DEFAULT_CHUNK,
    sub_chunk: int = DEFAULT_SUB_CHUNK,
    device: str | torch.device | None = None,
    kind: str = "global",
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products of every query against the database, in bounded memory.

    ``queries`` (Q, D); ``database`` (N, D) as a tensor, (memory-mapped) array or a
    :class:`FeatureStore` (its ``kind``). Returns ``scores`` (Q, k') float32 and ``indices``
    (Q, k') int64 row positions with k' = min(k, N), sorted by score descending and, among equal
    scores, by index ascending. ``device`` defaults to CUDA when available.
    """
    db = as_tensor(database, kind)
    if db.dim() != 2:
        raise ValueError(f"database must be (N, D), got shape {tuple(db.shape)}")
    n, dim = db.shape
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    q = torch.as_tensor(queries).to(device=device, dtype=torch.float32)
    if q.dim() != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) to match the database, got {tuple(q.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1 or sub_chunk < 1:
        raise ValueError(f"chunk_size and sub_chunk must be >= 1, got {chunk_size}, {sub_chunk}")
    k = min(k, n)
    nq = q.shape[0]
    if n == 0 or nq == 0:
        return torch.empty(nq, 0), torch.empty(nq, 0, dtype=torch.long)
    sub_chunk = min(sub_chunk, chunk_size)
    chunk_size = min(chunk_size, n)
    buf = torch.empty(sub_chunk, dim, device=device)
    block = torch.empty(chunk_size, nq, device=device)
    best_s = torch.empty(nq, 0, device=device)
    best_i = torch.empty(nq, 0, dtype=torch.long, device=device)
    pending_s: list[Tensor] = []
    pending_i: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            for a in range(start, stop, sub_chunk):
                b = min(a + sub_chunk, stop)
                rows = buf[: b - a]
                rows.copy_(db[a:b], non_blocking=True)
                torch.mm(rows, q.T, out=block[a - start : b - start])
            vals, cols = _block_topk(block[: stop - start].T, min(k, stop - start), start)
            pending_s.append(vals)
            pending_i.append(cols)
            if len(pending_s) >= 16:
                best_s, best_i = _sorted_topk(torch.cat([best_s, *pending_s], 1), torch.cat([best_i, *pending_i], 1), k)
                pending_s, pending_i = [], []
        best_s, best_i = _sorted_topk(torch.cat([best_s, *pending_s], 1), torch.cat([best_i, *pending_i], 1), k)
    return best_s.cpu(), best_i.cpu()


def _import_faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise ImportError(
            "the FAISS backend needs the faiss package: pip install 'retrieval-lightning[faiss]' "
            f"(or faiss-cpu / faiss-gpu) ({err})"
        ) from None
    return faiss


class FaissSearcher:
    """FAISS inner-product index: ``"flat"`` (exact) or ``"ivfpq"`` (approximate, compressed).

    The database is added in chunks converted to fp32, so an fp16 memory map is never copied
    whole into a second fp32 array outside FAISS. IVF-PQ is trained on ``train_size`` rows
    sampled evenly from the database.
    """

    def __init__(
        self,
        dim: int,
        index_type: str = "flat",
        nlist: int = 1024,
        m: int = 64,
        nbits: int = 8,
        nprobe: int = 16,
        train_size: int = 100_000,
    ) -> None:
        faiss = _import_faiss()
        self.dim = int(dim)
        self.index_type = index_type
        self.train_size = int(train_size)
        if index_type == "flat":
            self.index = faiss.IndexFlatIP(self.dim)
        elif index_type == "ivfpq":
            if self.dim % m:
                raise ValueError(f"IVF-PQ: dim {self.dim} must be divisible by m={m}")
            self._quantizer = faiss.IndexFlatIP(self.dim)
            self.index = faiss.IndexIVFPQ(self._quantizer, self.dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = int(nprobe)
        else:
            raise ValueError(f"unknown FAISS index_type {index_type!r}; use 'flat' or 'ivfpq'")

    @staticmethod
    def _fp32(rows: Tensor | np.ndarray) -> np.ndarray:
        if isinstance(rows, Tensor):
            rows = rows.detach().cpu().numpy()
        return np.ascontiguousarray(rows, dtype=np.float32)

    def add(self, database: Tensor | np.ndarray | FeatureStore, chunk_size: int = 65536, kind: str = "global") -> None:
        """Add every database row (training IVF-PQ first when needed)."""
        db = database.array(kind) if isinstance(database, FeatureStore) else database
        n = len(db)
        if db.shape[1] != self.dim:
            raise ValueError(f"database has dim {db.shape[1]}, the index was built for {self.dim}")
        if not self.index.is_trained:
            take = np.linspace(0, n - 1, num=min(self.train_size, n)).astype(np.int64)
            self.index.train(self._fp32(db[take]))
        for start in range(0, n, chunk_size):
            self.index.add(self._fp32(db[start : start + chunk_size]))

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Top-k as ``(scores (Q, k) float32, indices (Q, k) int64)``, like :func:`topk_search`."""
        scores, indices = self.index.search(self._fp32(queries), int(k))
        return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)
