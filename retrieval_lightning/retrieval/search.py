"""Exact inner-product top-k over a database too large for a Q×N score matrix, plus FAISS.

:func:`topk_search` streams the database in chunks: each chunk is converted to fp32 (fp16 storage
is exact in fp32, so scores are ordinary fp32 dot products, as FAISS computes them), multiplied by
the queries, and reduced to its own top-k; the per-block candidates are merged with a stable sort,
so ties come out lower database index first, exactly as a full stable argsort would order them.
Queries go in blocks, so a score block holds at most :data:`MAX_BLOCK_SCORES` values: peak memory
beyond the (memory-mapped) database is a few such buffers, whatever Q and N are (GLDv2 recognition
ranks 118k test images).

:class:`FaissSearcher` is the optional FAISS backend (``pip install .[faiss]``): a flat
inner-product index (exact: the same top-k as :func:`topk_search`, except that two scores within
a last-bit rounding of each other may come out swapped, since FAISS's BLAS sums in another order)
or IVF-PQ for very large sets.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError
from .store import FeatureStore

#: rows converted and multiplied per step; small enough that the fp32 copy stays in L2 cache
DEFAULT_SUB_CHUNK = 1024
#: columns of scores reduced by one ``topk`` call
DEFAULT_CHUNK = 32768
#: score values of one (query block × chunk) buffer per worker: 128 MiB in fp32
MAX_BLOCK_SCORES = 1 << 25


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
    """Top-k of one (Q, B) score block; when the k-th value is tied, keep the lowest columns.

    ``topk`` does not say which of several equal values it keeps, so it is asked for k + 1: when
    the (k+1)-th value is below the k-th, the k kept are the only candidates; otherwise that row
    is redone from every column scoring at least the k-th value (rare: exact ties).
    """
    width = scores.shape[1]
    if width <= k:
        cols = torch.arange(width, device=scores.device).expand(scores.shape[0], width)
        return scores.clone(), cols + offset
    vals, cols = torch.topk(scores, k + 1, dim=1, sorted=True)
    tied = torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten().tolist()
    vals, cols = vals[:, :k].clone(), cols[:, :k].clone()
    for row in tied:
        candidates = torch.nonzero(scores[row] >= vals[row, k - 1]).flatten()
        order = torch.sort(scores[row, candidates], descending=True, stable=True).indices[:k]
        cols[row] = candidates[order]
        vals[row] = scores[row, cols[row]]
    return vals, cols + offset


def _grid(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """[lo, hi) cut at the multiples of ``step``."""
    cuts = [lo, *range((lo // step + 1) * step, hi, step), hi]
    return list(zip(cuts[:-1], cuts[1:]))


def _scan(
    db: Tensor, q: Tensor, lo: int, hi: int, k: int, chunk_size: int, sub_chunk: int, excluded: np.ndarray
) -> tuple[Tensor, Tensor]:
    """Candidates (Q, <=k) of database rows [lo, hi): fp32 copies of sub-chunks, one topk per chunk.

    A matrix product's last bit can depend on its shape (this CPU's BLAS: under 12 rows) and thread count, so
    every product here has one shape: a short sub-chunk is padded with zero rows. Sub-chunks and chunks lie on
    grids counted from row 0, not from ``lo``, so each row is scored in the same block whatever the worker ranges
    are: the scores, and so the order of exact duplicates, do not depend on the thread count (DDP runs fewer).
    """
    nq, dim = q.shape
    device = q.device
    buf = torch.zeros(min(sub_chunk, chunk_size), dim, device=device)
    block = torch.empty(nq, min(chunk_size, hi - lo), device=device)
    best_s = torch.empty(nq, 0, device=device)
    best_i = torch.empty(nq, 0, dtype=torch.long, device=device)
    pending_s: list[Tensor] = []
    pending_i: list[Tensor] = []
    for start, stop in _grid(lo, hi, chunk_size):
        for a, b in _grid(start, stop, sub_chunk):
            buf[: b - a].copy_(db[a:b], non_blocking=True)
            if b - a < len(buf):
                buf[b - a:] = 0
            block[:, a - start : b - start] = (q @ buf.T)[:, : b - a]
        inside = excluded[np.searchsorted(excluded, start):np.searchsorted(excluded, stop)]
        if inside.size:
            block[:, torch.from_numpy(inside - start).to(device)] = float("-inf")
        vals, cols = _block_topk(block[:, : stop - start], k, start)
        pending_s.append(vals)
        pending_i.append(cols)
        if len(pending_s) >= 16:  # keep the candidate list bounded whatever N is
            best_s, best_i = _sorted_topk(torch.cat([best_s, *pending_s], 1), torch.cat([best_i, *pending_i], 1), k)
            pending_s, pending_i = [], []
    return _sorted_topk(torch.cat([best_s, *pending_s], 1), torch.cat([best_i, *pending_i], 1), k)


def topk_search(
    queries: Tensor | np.ndarray,
    database: Tensor | np.ndarray | FeatureStore,
    k: int,
    chunk_size: int = DEFAULT_CHUNK,
    sub_chunk: int = DEFAULT_SUB_CHUNK,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    kind: str = "global",
    excluded: np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products of every query against the database, in bounded memory.

    ``queries`` (Q, D); ``database`` (N, D) as a tensor, (memory-mapped) array or a
    :class:`FeatureStore` (its ``kind``). Returns ``scores`` (Q, k') float32 and ``indices``
    (Q, k') int64 row positions with k' = min(k, N), sorted by score descending and, among equal
    scores, by index ascending. ``device`` defaults to CUDA when available. ``excluded`` rows (placeholders of
    unreadable images) score -inf: they come after every other row, so a search k deep finds k others whenever
    there are, without going deeper by their number (k + 5,000 per query held for GLDv2's 118k queries).

    On CPU the rows are split into ``num_threads`` contiguous ranges (default: torch's intra-op
    thread count) scanned by Python threads that each run torch single-threaded: many small
    matrix products parallelise better that way than through OpenMP, and their results do not
    depend on the thread count. Torch's thread count is restored afterwards.
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
    excluded = np.unique(np.asarray([] if excluded is None else excluded, dtype=np.int64))
    if excluded.size and (excluded[0] < 0 or excluded[-1] >= n):
        raise ValueError(f"excluded rows must lie in [0, {n}), got {excluded[0]} .. {excluded[-1]}")
    if n == 0 or nq == 0:
        return torch.empty(nq, 0), torch.empty(nq, 0, dtype=torch.long)
    workers = 1 if device.type != "cpu" else (num_threads or torch.get_num_threads())
    workers = max(1, min(workers, n // max(sub_chunk, 1)))
    rows = query_block_rows(min(chunk_size, n))
    parts = []
    with torch.no_grad():
        for start in range(0, nq, rows):
            block = q[start:start + rows]
            if device.type != "cpu":
                scores, indices = _scan(db, block, 0, n, k, chunk_size, sub_chunk, excluded)
            else:
                scores, indices = _threaded_scan(db, block, n, k, chunk_size, sub_chunk, workers, excluded)
            parts.append((scores.cpu(), indices.cpu()))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def excluded_last(index: Tensor, excluded: np.ndarray) -> tuple[Tensor, Tensor]:
    """The order that moves the ``excluded`` positions (placeholders of unreadable images) of each row of a
    top-k ``index`` to its end, the rest kept in their order, and where the excluded ones then stand."""
    out = torch.as_tensor(np.isin(index.cpu().numpy(), excluded), device=index.device)
    order = torch.sort(out.to(torch.int8), dim=1, stable=True).indices
    return order, out.gather(1, order)


def topk_skipping(search: Callable[[Tensor, int], tuple[Tensor, Tensor]], queries: Tensor, k: int,
                  excluded: np.ndarray | None, rows: int) -> tuple[Tensor, Tensor]:
    """``search(queries, depth) -> (scores, index)`` over ``rows`` rows, its first ``k`` results per query
    without the ``excluded`` rows (``k`` at most the rows that are not excluded): the search goes deeper by
    their number and drops them. For a search that cannot leave rows out (FAISS); :func:`topk_search` takes
    ``excluded`` itself."""
    if excluded is None or not excluded.size:
        return search(queries, k)
    scores, index = search(queries, min(k + int(excluded.size), rows))
    order = excluded_last(index, excluded)[0][:, :k]
    return scores.gather(1, order), index.gather(1, order)


def query_block_rows(width: int) -> int:
    """Queries scored together against ``width`` database columns, within :data:`MAX_BLOCK_SCORES`."""
    return max(1, MAX_BLOCK_SCORES // max(width, 1))


def _threaded_scan(
    db: Tensor, q: Tensor, n: int, k: int, chunk_size: int, sub_chunk: int, workers: int, excluded: np.ndarray
) -> tuple[Tensor, Tensor]:
    bounds = [n * i // workers // sub_chunk * sub_chunk for i in range(workers)] + [n]  # on the sub-chunk grid
    results: list[tuple[Tensor, Tensor] | None] = [None] * workers
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                results[i] = _scan(db, q, bounds[i], bounds[i + 1], k, chunk_size, sub_chunk, excluded)
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)

    previous = torch.get_num_threads()
    threads = [threading.Thread(target=work, args=(i,), name=f"topk-search-{i}") for i in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(previous)
    if errors:
        raise errors[0]
    scores = torch.cat([r[0] for r in results if r is not None], 1)
    indices = torch.cat([r[1] for r in results if r is not None], 1)
    return _sorted_topk(scores, indices, k)


class IncompleteSearchError(RuntimeError):
    """An approximate index found fewer than k results for some query (FAISS pads with id -1)."""


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
            needed = max(int(self.index.nlist), 2 ** int(self.index.pq.nbits))
            if min(self.train_size, n) < needed:
                raise UsageError(
                    f"IVF-PQ needs at least {needed} database rows to train (nlist {self.index.nlist} lists, "
                    f"{2 ** int(self.index.pq.nbits)} codes per sub-quantizer), the database has {n} "
                    f"(training on {min(self.train_size, n)}): use exact search (--backend exact or faiss-flat) "
                    "for a database this small, or a smaller nlist")
            take = np.linspace(0, n - 1, num=min(self.train_size, n)).astype(np.int64)
            self.index.train(self._fp32(db[take]))
        for start in range(0, n, chunk_size):
            self.index.add(self._fp32(db[start : start + chunk_size]))

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Top-k as ``(scores (Q, k') float32, indices (Q, k') int64)``, like :func:`topk_search`.

        ``k' = min(k, ntotal)``. FAISS pads a result list it cannot fill with id -1, which Python
        indexing would read as the last database item; such a list (IVF probing fewer than k'
        items) raises :class:`IncompleteSearchError` instead of ever returning -1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._fp32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) to match the index, got {tuple(q.shape)}")
        k = min(int(k), self.ntotal)
        if k == 0:
            return torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
        scores, indices = self.index.search(q, k)
        short = np.nonzero((indices < 0).any(axis=1))[0]
        if short.size:
            found = int((indices[short[0]] >= 0).sum())
            raise IncompleteSearchError(
                f"FAISS {self.index_type} index returned fewer than k={k} results for {short.size} of "
                f"{len(q)} queries (query {int(short[0])}: {found}); the probed inverted lists hold too few "
                f"items: raise nprobe (now {getattr(self.index, 'nprobe', '-')}) or lower k"
            )
        return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)
