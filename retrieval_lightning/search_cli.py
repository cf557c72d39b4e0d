"""``retrieval-lightning search``: a checkpoint, a feature store and query images → ranked results.

The store is what ``extract`` writes (``<output_dir>/<set>/store``, with ``items.tsv`` beside it
naming every item and ``image_resize.json`` saying how its images were sized; queries are sized the
same way unless ``--max-side`` says otherwise). Queries are ranked by the global descriptor; when
the model has a re-ranking head and the store holds its entries, the top ``--shortlist`` are
re-scored and fused as the model's ``rerank`` config says; results past the shortlist follow in
global order. Results are printed as a table and drawn, one row per query (global
results, then re-ranked), into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.std import tqdm

from retrieval_lightning.data.io import ImageLoadError, load_image, resize_by, to_float
from retrieval_lightning.data.types import ImageResize
from retrieval_lightning.errors import UsageError
from retrieval_lightning.outputs import picture_path, user_path
from retrieval_lightning.retrieval.postprocess import PostProcessConfig, alpha_query_expansion, database_augmentation
from retrieval_lightning.retrieval.rerank import EntryReader, content_seed, fuse, pair_seeds
from retrieval_lightning.retrieval.search import FaissSearcher, topk_search, topk_skipping
from retrieval_lightning.retrieval.set_files import ITEMS, read_image_resize, read_items, read_query_count
from retrieval_lightning.retrieval.store import FeatureStore, StoreIdentityError, identity_differences
from retrieval_lightning.retrieval.writer import placeholder_note, stored_unreadable
from retrieval_lightning.thumbnail_grid import Tile, draw_rows


@dataclass
class SearchResult:
    """One query's results: store rows in final order, with their global and re-ranking scores."""

    query: str
    rows: np.ndarray
    global_scores: np.ndarray
    rerank_scores: np.ndarray | None
    global_rows: np.ndarray


#: query size when the store does not record its images' (a store written before the record existed)
FALLBACK_MAX_SIDE = 1024


def query_resize(store: FeatureStore, max_side: int | None) -> ImageResize:
    """How queries are sized: as the store's images were, unless ``max_side`` is given (a note on
    stderr when that differs from the store's, or the store does not say)."""
    recorded = read_image_resize(store.path.parent)
    if max_side is None:
        if recorded is not None:
            return recorded
        print(f"note: {store.path.parent} does not record how its images were sized (re-run `extract` to record "
              f"it); queries are capped at {FALLBACK_MAX_SIDE} px, pass --max-side to match the database",
              file=sys.stderr)
        return ImageResize(FALLBACK_MAX_SIDE)
    if recorded is not None and recorded.max_side != max_side:
        print(f"note: --max-side {max_side}, but the database images were sized to {recorded.max_side or 'full size'}; "
              "descriptors of one image at two sizes differ", file=sys.stderr)
    return ImageResize(max_side, recorded.upscale if recorded is not None else False)


def load_query(path: str, resize: ImageResize) -> torch.Tensor:
    """A query image, float (3, h, w) in [0, 1], sized as ``resize`` says (bilinear, antialiased:
    the evaluation transform of the datamodules)."""
    return load_query_sized(path, resize)[0]


def load_query_sized(path: str, resize: ImageResize) -> tuple[torch.Tensor, tuple[float, float]]:
    """:func:`load_query` and the image's (height, width) over its original's, which re-ranking heads
    measuring pixel distances in the original image read (as the eval datasets' ``resize_factor``)."""
    image = load_image(path)
    out = to_float(resize_by(image, resize.factor(image.shape[1], image.shape[2])))
    return out, (out.shape[1] / image.shape[1], out.shape[2] / image.shape[2])


def adopt_store_evaluation(module: torch.nn.Module, store: FeatureStore) -> None:
    """Describe the queries as the database was described: the store's scales and resize (evaluation
    options, not weights; ``extract`` may have been run with others than the checkpoint records)."""
    recorded = store.identity
    wanted = {"eval_scales": tuple(float(s) for s in recorded.get("eval_scales", module.eval_scales)),
              "eval_resize": recorded.get("eval_resize", module.eval_resize)}
    for name, value in wanted.items():
        if getattr(module, name) != value:
            print(f"note: {name} {value} as the store was extracted (the checkpoint records "
                  f"{getattr(module, name)})", file=sys.stderr)
            setattr(module, name, value)


def check_store_matches(module: torch.nn.Module, store: FeatureStore) -> None:
    """Refuse a store whose images were described otherwise than this model describes the queries: other
    weights, scales, backbone normalisation or head settings (the database's own preprocessing aside)."""
    from retrieval_lightning.retrieval.identity import model_identity

    expected = model_identity(module)
    diffs = identity_differences({k: store.identity.get(k) for k in expected}, expected)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise StoreIdentityError(f"feature store {store.path} was extracted by another model or settings ({shown}); "
                                 "extract it again with this checkpoint and its settings")
    if store.identity.get("precision"):
        print(f"note: feature store {store.path} was extracted under trainer.precision "
              f"{store.identity['precision']}; search describes the queries in fp32", file=sys.stderr)


def database_start(store: FeatureStore) -> int:
    """The store's first database row: an eval set's queries come first (rows follow dataset order), and
    ``extract`` records how many there are. A store without the record is searched whole (a note says so)."""
    queries = read_query_count(store.path.parent)
    if queries is None:
        if (store.path.parent / ITEMS).is_file():  # an eval set's store from before the record
            print(f"note: {store.path.parent} does not record which items are the set's queries (re-run `extract` "
                  "to record it); every stored item is searched, queries included", file=sys.stderr)
        return 0
    return int(np.searchsorted(store.index, queries))


@dataclass
class Ranker:
    """``(query descriptors, depth) -> (scores, store rows)`` over the store's database rows: exact chunked
    top-k or a FAISS index (built once here), with the model's αQE and DBA, as evaluation ranks."""

    store: FeatureStore
    backend: str = "exact"
    device: torch.device | str = "cpu"
    postprocess: PostProcessConfig | None = None  # None: neither

    def __post_init__(self) -> None:
        self.first_row = database_start(self.store)
        database: np.ndarray | torch.Tensor = self.store.array("global")[self.first_row:]
        flags = stored_unreadable(self.store)
        #: database rows that are placeholders of unreadable images: never a result, nor a neighbour (αQE, DBA)
        self.excluded = np.zeros(0, np.int64) if flags is None else np.flatnonzero(flags[self.first_row:])
        self.postprocess = post = self.postprocess or PostProcessConfig()
        if post.dba:  # once per search run: N searches over N rows
            database = database_augmentation(database, post.dba_k, post.dba_alpha, device=self.device,
                                             excluded=self.excluded)
        self.database = database
        if self.backend == "exact":
            self._rank = lambda queries, depth: topk_search(queries, database, k=depth, device=self.device,
                                                            excluded=self.excluded)
        elif self.backend.startswith("faiss-"):
            searcher = FaissSearcher(self.store.kinds["global"].shape[0], index_type=self.backend[len("faiss-"):])
            searcher.add(database)
            self._rank = searcher.search
        else:
            raise ValueError(f"unknown search backend {self.backend!r}; use exact, faiss-flat or faiss-ivfpq")

    def __len__(self) -> int:
        """Rows searched: the store's database, without placeholders of unreadable images."""
        return len(self.database) - len(self.excluded)

    def _kept(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``depth`` (<= ``len(self)``) results, placeholders left out."""
        if self.backend == "exact":  # the exact search leaves them out itself
            return self._rank(queries, depth)
        return topk_skipping(self._rank, queries, depth, self.excluded, len(self.database))

    def __call__(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.postprocess
        if post.query_expansion:
            qe_n = min(post.qe_n, len(self))
            _, first = self._kept(queries, max(depth, qe_n))
            queries = alpha_query_expansion(queries, self.database, first, qe_n, post.qe_alpha).to(queries.device)
        scores, rows = self._kept(queries, depth)
        return scores, rows + self.first_row


def make_ranker(store: FeatureStore, backend: str = "exact", device: torch.device | str = "cpu",
                postprocess: PostProcessConfig | None = None) -> Ranker:
    """A :class:`Ranker` over ``store``'s database rows (``backend``: ``exact``, ``faiss-flat``, ``faiss-ivfpq``)."""
    return Ranker(store, backend, device, postprocess)


def query_seed(image: torch.Tensor) -> int:
    """A query image's part of its pairs' seeds: a CRC-32 of its pixels as searched."""
    return content_seed(image)


def search(module: torch.nn.Module, store: FeatureStore, images: Sequence[torch.Tensor], names: Sequence[str],
           k: int = 10, shortlist: int | None = None, backend: str = "exact", ranker: Ranker | None = None,
           resize_factors: Sequence[tuple[float, float]] | None = None) -> list[SearchResult]:
    """Rank the store for each query image; re-rank the shortlist when the model and store allow.

    ``backend`` as :func:`make_ranker` (or a ``ranker`` made once for many calls: it ranks the store's
    database rows with the model's post-processing); ``resize_factors``:
    each image's (height, width) over its original's (:func:`load_query_sized`; 1 if not given).
    Re-ranking seeds (RANSAC's) follow each query's pixels and the database item, so a query scores the
    same alone, in a directory of others, or in another batch.
    """
    module.eval()
    queries = module.embed_batch(list(images)).float()
    config = module.rerank
    ranker = ranker or make_ranker(store, backend, module.device, getattr(module, "postprocess", None))
    depth = min(max(k, shortlist or config.k), len(ranker))
    scores, rows = ranker(queries, depth)
    prefix = module.rerank_prefix if module.rerank_head is not None else None
    reader = None
    if prefix is not None and any(kind.startswith(prefix) for kind in store.kinds):
        reader = EntryReader(store, prefix, transform=module.densify_entries)
    results = []
    for q, (image, name) in enumerate(zip(images, names)):
        row, glob = rows[q].numpy(), scores[q].numpy()
        if reader is None:
            results.append(SearchResult(name, row[:k], glob[:k], None, row[:k]))
            continue
        short = row[: shortlist or config.k]
        entries = reader.read(store.index[short])
        factor = None if resize_factors is None else [resize_factors[q]]
        query_entry = module.rerank_entries([image], database=False, resize_factors=factor)[0]
        s = module.score_entries(query_entry, entries, pair_seeds(query_seed(image), store.index[short].tolist()))
        s = torch.as_tensor(s).float().numpy()
        order = fuse(np.arange(len(short)), glob[: len(short)], s, config.fusion, config.weight)
        rest = slice(len(short), k)  # past the shortlist: the global order, no re-ranking score
        results.append(SearchResult(name, np.concatenate([short[order], row[rest]])[:k],
                                    np.concatenate([glob[order], glob[rest]])[:k],
                                    np.concatenate([s[order], np.full(len(row[rest]), np.nan)])[:k], row[:k]))
    return results


def printable(name: str) -> str:
    """``name`` on one line: a newline or another control character in a file name is escaped (``\\n``), so the
    table stays one row per result for whoever reads it by line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def format_results(results: Sequence[SearchResult], store: FeatureStore, items: dict[int, tuple[str, str]]) -> str:
    lines = []
    for result in results:
        lines.append(f"query {printable(str(result.query))}")
        head = f"{'rank':>4}  {'index':>8}  {'global':>8}" + (f"  {'rerank':>8}" if result.rerank_scores is not None else "")
        lines.append(head + "  id")
        for i, row in enumerate(result.rows):
            index = int(store.index[row])
            line = f"{i + 1:>4}  {index:>8}  {result.global_scores[i]:>8.4f}"
            if result.rerank_scores is not None:
                score = result.rerank_scores[i]
                line += f"  {'-' if np.isnan(score) else format(score, '.3f'):>8}"
            lines.append(line + f"  {printable(items.get(index, (str(index), ''))[0])}")
    return "\n".join(lines)


#: results drawn per ranking (all of ``--k`` are printed), and queries drawn (all are printed)
PICTURE_RESULTS = 20
PICTURE_QUERIES = 8
#: queries loaded and searched together
QUERY_BATCH = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def expand_queries(paths: Sequence[str]) -> list[str]:
    """Query files, a directory standing for its image files (sorted, by suffix)."""
    files: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            found = sorted(str(f) for f in Path(path).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{path}: a directory without image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        else:
            files.append(path)
    return files


def draw_results(results: Sequence[SearchResult], images: Sequence[torch.Tensor], store: FeatureStore,
                 items: dict[int, tuple[str, str]], path: Path, thumb: int = 160) -> Path:
    """One row per query and ranking (global, then re-ranked when present): the query, then its top-k
    (at most :data:`PICTURE_RESULTS`); a result whose image file is gone keeps its caption."""
    rows = []
    for result, image in zip(results, images):
        rankings = [("global", result.global_rows)]
        if result.rerank_scores is not None:
            rankings.append(("re-ranked", result.rows))
        for label, order in rankings:
            row = [Tile(image, f"{Path(result.query).name}\n{label}")]
            for c, position in enumerate(order[:PICTURE_RESULTS], start=1):
                index = int(store.index[position])
                ident, file = items.get(index, (str(index), ""))
                shown = to_float(load_image(file, max_side=thumb)) if file and Path(file).is_file() else None
                row.append(Tile(shown, f"#{c} {ident}"))
            rows.append(row)
    return draw_rows(rows, "", path)


def search_device(name: str) -> torch.device:
    """``--device``: ``auto`` is the first GPU when there is one; a GPU that is not there is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                         "use --device cpu")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: a tensor there tells whether this torch has one
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:  # torch's "not compiled with XPU" is an AssertionError
            raise UsageError(f"--device {name}: not available here ({exc}); use --device cpu") from None
    return device


def run_search(argv: Sequence[str]) -> int:
    from retrieval_lightning.module import RetrievalModule

    parser = argparse.ArgumentParser(prog="retrieval-lightning search", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=user_path, help="a checkpoint of this framework (self-contained)")
    parser.add_argument("store", type=user_path, help="a feature store written by `extract` (<output_dir>/<set>/store)")
    parser.add_argument("queries", nargs="+", type=user_path, help="query image files, or directories of them")
    parser.add_argument("--k", type=int, default=10, help="results shown per query")
    parser.add_argument("--shortlist", type=int, default=None, help="re-ranked candidates (default: model's rerank.k)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="longest side of the queries (default: as the store's images were sized)")
    parser.add_argument("--out", default="search.png", type=user_path,
                        help="picture of the results (PNG; default: search.png in the current directory)")
    parser.add_argument("--backend", default="exact", choices=["exact", "faiss-flat", "faiss-ivfpq"],
                        help="global search: exact chunked top-k, or a FAISS index (pip install .[faiss])")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="an unreadable query image: stop (raise), or warn and search the others (skip)")
    parser.add_argument("--device", default="auto",
                        help="where the model embeds, searches and re-ranks: auto (a GPU if there is one), cpu, "
                             "cuda, cuda:1")
    args = parser.parse_args(list(argv))
    args.out = picture_path(args.out, "search.png")  # resolved before the search, not after it
    for option, value in (("--k", args.k), ("--shortlist", args.shortlist), ("--max-side", args.max_side)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    device = search_device(args.device)
    module = RetrievalModule.load_from_checkpoint(args.checkpoint, map_location="cpu").to(device)
    store = FeatureStore.open(args.store)
    if "global" not in store.kinds:
        raise StoreIdentityError(f"feature store {store.path} has no global descriptors (kinds {sorted(store.kinds)})")
    adopt_store_evaluation(module, store)
    check_store_matches(module, store)
    note = placeholder_note(store, f"search {store.path}")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.shortlist is not None:
        module.rerank = replace(module.rerank, k=args.shortlist)
    resize = query_resize(store, args.max_side)
    queries = expand_queries(args.queries)
    items = read_items(store.path.parent)
    ranker = make_ranker(store, args.backend, module.device, module.postprocess)
    drawn: list[tuple[SearchResult, torch.Tensor]] = []
    skipped: list[str] = []
    batches = range(0, len(queries), QUERY_BATCH)
    for start in tqdm(batches, desc="searching", unit="batch", disable=len(batches) < 2, file=sys.stderr):
        names, images, factors = [], [], []  # a batch at a time: a directory may hold thousands
        for name in queries[start:start + QUERY_BATCH]:
            try:
                image, factor = load_query_sized(name, resize)
                images.append(image)
                factors.append(factor)
                names.append(name)
            except ImageLoadError as err:
                if args.on_error == "raise":
                    raise ImageLoadError(f"{err} (--on-error skip searches the other queries)") from err
                skipped.append(name)
                print(f"warning: skipped query {name}: {err}", file=sys.stderr)
        if not names:
            continue
        results = search(module, store, images, names, k=args.k, shortlist=args.shortlist, ranker=ranker,
                         resize_factors=factors)
        print(format_results(results, store, items), flush=True)
        drawn += list(zip(results, images))[:PICTURE_QUERIES - len(drawn)]
    if skipped:
        print(f"skipped {len(skipped)} unreadable of {len(queries)} queries", file=sys.stderr)
    if not drawn:
        raise UsageError(f"none of the {len(queries)} queries could be read")
    picture = draw_results([r for r, _ in drawn], [i for _, i in drawn], store, items, args.out)
    searched = len(queries) - len(skipped)
    shown = f" (the first {len(drawn)} of {searched} queries)" if len(drawn) < searched else ""
    print(f"picture: {picture}{shown}")
    return 0
