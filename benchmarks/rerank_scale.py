"""Re-ranking at scale reads only the shortlisted rows: wall time and peak RSS against the store's size.

Builds a synthetic store of ``--images`` database images (default 200,000) with a fixed global
descriptor and a ragged kind of ~``--rows`` fp16 rows per image (default ~1000 rows of ``--dim``
16: the row count of DELG local features; the width is kept small so the store fits on a normal
disk, 6.4 GB at the defaults), then re-ranks ``--queries`` queries x ``--k`` candidates through the
core's :func:`~retrieval_lightning.retrieval.rerank.score_shortlists` with a cheap scorer.
Printed: store size on disk (MiB), peak RSS growth during search + re-ranking, and their ratio (the goal is
far below 1: only the shortlisted rows are paged in), plus the time per query.

    python benchmarks/rerank_scale.py [--images 200000] [--rows 1000] [--dim 16] [--dir /tmp/rerank_scale]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _fresh_process import peak_growth_mib, start_peak

from retrieval_lightning.retrieval.rerank import EntryReader, build_shortlists, score_shortlists
from retrieval_lightning.retrieval.search import topk_search
from retrieval_lightning.retrieval.store import FeatureStore, KindSpec


def build_store(path: Path, images: int, rows: int, dim: int, gdim: int, seed: int = 0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(rows // 2, rows * 3 // 2 + 1, size=images)
    builder = FeatureStore.create(
        path, {"global": KindSpec("float16", (gdim,)), "local-rows": KindSpec("float16", (dim,), ragged=True)},
        images, identity={"benchmark": "rerank_scale"}, ragged_lengths={"local-rows": lengths}, overwrite=True,
    )
    builder.index[:] = np.arange(images)
    block = rng.standard_normal((1 << 16, dim)).astype(np.float16)
    data = builder.array("local-rows")
    for start in range(0, data.shape[0], block.shape[0]):
        part = data[start:start + block.shape[0]]
        part[:] = block[: len(part)]
    glob = builder.array("global")
    for start in range(0, images, 1 << 16):
        g = rng.standard_normal((min(1 << 16, images - start), gdim)).astype(np.float32)
        glob[start:start + len(g)] = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float16)
    return builder.commit()


def cheap_scorer(query: dict, candidates: list, seeds: list) -> torch.Tensor:
    """Mean of the candidate's rows dotted with the query's mean row: touches every stored row read."""
    q = query["rows"].float().mean(0)
    return torch.stack([(c["rows"].float() @ q).mean() for c in candidates])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--global-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dir", default="/tmp/rerank_scale")
    parser.add_argument("--keep", action="store_true", help="keep the store for another run")
    args = parser.parse_args()

    root = Path(args.dir)
    path = root / "database"
    t0 = time.perf_counter()
    if args.keep and (path / "manifest.json").is_file():
        store = FeatureStore.open(path)
    else:
        store = build_store(path, args.images, args.rows, args.dim, args.global_dim)
    build_s = time.perf_counter() - t0
    query_rows = [{"rows": torch.randn(args.rows, args.dim).half()} for _ in range(args.queries)]
    size_mb = store.nbytes / 2**20  # MiB
    print(f"store: {len(store):,} images, {size_mb:,.0f} MiB on disk "
          f"({store.bytes_per_image['local-rows']:,.0f} B/image ragged), built in {build_s:.1f} s")

    class QueryReader:
        def read(self, indices):  # queries live in memory here: only the database side is measured
            return [query_rows[int(i)] for i in indices]

    rss0 = start_peak()
    t0 = time.perf_counter()
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.global_dim), dim=1)
    _, ranking = topk_search(queries, store, k=args.k, device="cpu")
    search_s = time.perf_counter() - t0
    shortlists = build_shortlists(ranking, args.k)
    t1 = time.perf_counter()
    scored = score_shortlists(shortlists, range(args.queries), QueryReader(), EntryReader(store, "local-"),
                              cheap_scorer, progress=False)
    rerank_s = time.perf_counter() - t1
    growth = peak_growth_mib(rss0)
    read_mb = sum(len(s.positions) for s in scored) * store.bytes_per_image["local-rows"] / 2**20
    print(f"search: {search_s:.2f} s; re-ranking {args.queries} queries x K={args.k}: {rerank_s:.2f} s "
          f"({1000 * rerank_s / args.queries:.1f} ms/query)")
    print(f"peak RSS growth {growth:,.0f} MiB vs store {size_mb:,.0f} MiB on disk: ratio {growth / size_mb:.4f} "
          f"(shortlisted rows: {read_mb:,.0f} MiB; global descriptors scanned by the search: "
          f"{store.bytes_per_image['global'] * len(store) / 2**20:,.0f} MiB)")
    if not args.keep:  # only what this run wrote: --dir may hold other files
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # when it is left empty


if __name__ == "__main__":
    main()
