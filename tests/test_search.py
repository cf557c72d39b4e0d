"""Chunked exact top-k against a full stable argsort; FAISS against the chunked path; αQE and DBA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_lightning.errors import UsageError
from retrieval_lightning.retrieval.postprocess import (
    PostProcessConfig,
    alpha_query_expansion,
    database_augmentation,
    postprocess_descriptors,
    postprocessed_search,
)
from retrieval_lightning.retrieval.search import FaissSearcher, IncompleteSearchError, topk_search, topk_skipping
from retrieval_lightning.retrieval.store import FeatureStore


def reference_topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix in float64, then a stable sort by (score descending, index ascending)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize(
    ("n", "k", "chunk_size", "sub_chunk", "threads", "low", "high", "dim"),
    [
        (1000, 10, 128, 32, 1, -2, 3, 6),
        (1000, 50, 97, 13, 2, -2, 3, 6),
        (257, 300, 64, 64, 2, -2, 3, 6),
        (3000, 1, 1000, 250, 3, -2, 3, 6),
        (5, 5, 2, 1, 1, -2, 3, 6),
        # scores in {0, 1, 2}: a quarter of the rows tie for the best score, so one chunk alone
        # holds more tied rows than k and must keep its lowest indices
        (1000, 100, 500, 100, 1, 0, 2, 2),
        (2000, 150, 1500, 64, 2, 0, 2, 2),
    ],
)
def test_topk_equals_full_argsort_with_many_ties(n, k, chunk_size, sub_chunk, threads, low, high, dim) -> None:
    # small integer vectors: every dot product is exact in fp32 and many scores are tied, so the
    # lower-index-first rule decides which rows make the cut
    gen = torch.Generator().manual_seed(n + k)
    database = torch.randint(low, high, (n, dim), generator=gen).to(torch.float16)
    queries = torch.randint(max(low, 1), high, (9, dim), generator=gen).float()
    scores, indices = topk_search(
        queries, database, k, chunk_size=chunk_size, sub_chunk=sub_chunk, num_threads=threads, device="cpu"
    )
    want_scores, want_indices = reference_topk(queries.numpy(), database.float().numpy(), k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert indices.shape == (9, min(k, n))
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_array_equal(scores.numpy(), want_scores.astype(np.float32))


def test_exact_duplicates_tie_whatever_the_thread_count_and_blocks() -> None:
    """Copies of one image (a web crawl has many) must tie and come out lower index first, as a stable argsort of
    one product orders them: a matrix product's last bit depends on its shape and threads on this CPU (blocks under
    12 rows), and the worker ranges followed the thread count, so DDP's 1-thread ranks and a 2-thread process put
    different copies in the shortlist (found by a review). Real-valued 2048-D vectors, so products round."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 2 * 1024 + 7, 2048
    queries = torch.nn.functional.normalize(torch.randn(70, dim, generator=gen), dim=1)
    database = torch.randn(n, dim, generator=gen) * 1e-3
    copies = [10, 1025, n - 6, n - 1]  # in full sub-chunks, and in the short last one
    database[copies] = torch.nn.functional.normalize(queries.mean(0), dim=0)
    database = database.half()
    runs = [topk_search(queries, database, 4, num_threads=threads, chunk_size=chunk, device="cpu")
            for threads in (1, 2, 3) for chunk in (32768, 1500)]
    for scores, indices in runs:
        assert (indices == torch.tensor(copies)).all()  # all tied, lowest first, in every query
        assert torch.equal(scores, runs[0][0])


@pytest.mark.parametrize(("threads", "chunk_size", "k"), [(1, 64, 10), (2, 50, 10), (3, 1000, 40), (2, 64, 290)])
def test_excluded_rows_come_last_without_a_deeper_search(threads, chunk_size, k, monkeypatch) -> None:
    """Placeholders of unreadable images: the search scores them -inf itself (after every other row, in index
    order), where callers searched k + their number deep and dropped them (GLDv2's 118k queries then held k + 5,000
    results each for 5,000 unreadable images: about 7 GB; a review's finding)."""
    gen = torch.Generator().manual_seed(k)
    database = torch.randint(-2, 3, (300, 6), generator=gen).to(torch.float16)
    queries = torch.randint(1, 3, (9, 6), generator=gen).float()
    excluded = np.unique(np.random.default_rng(k).choice(300, 40, replace=False))
    reference = queries.double().numpy() @ database.double().numpy().T
    reference[:, excluded] = -np.inf
    want = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    scores, indices = topk_search(queries, database, k, chunk_size=chunk_size, sub_chunk=16, num_threads=threads,
                                  device="cpu", excluded=excluded)
    np.testing.assert_array_equal(indices.numpy(), want)
    np.testing.assert_array_equal(scores.numpy(), np.take_along_axis(reference, want, 1).astype(np.float32))
    assert np.isin(indices.numpy()[:, :260], excluded).sum() == 0  # 260 others first
    with pytest.raises(ValueError, match=r"excluded rows must lie in \[0, 300\)"):
        topk_search(queries, database, 3, excluded=np.array([300]), device="cpu")

    # an evaluation with 40 unreadable database images searches its 10 results deep, not 50
    from retrieval_lightning import evaluation
    from retrieval_lightning.data.types import EvalSet

    depths: list[int] = []

    def spy(*args, **kwargs):
        depths.append(kwargs["k"])
        return topk_search(*args, **kwargs)

    monkeypatch.setattr(evaluation, "topk_search", spy)
    eval_set = EvalSet("flagged", list(range(309)), 9, "revisitop", [{"easy": [1], "hard": [], "junk": []}] * 9)
    unreadable = np.zeros(309, bool)
    unreadable[9 + excluded] = True
    result = evaluation.evaluate_eval_set(eval_set, torch.cat([queries, database.float()]), chunk=64,
                                          unreadable=unreadable)
    assert depths == [10] and not np.isin(np.asarray(result.topk), excluded).any()


@pytest.mark.parametrize("threads", [1, 2])
def test_many_queries_are_scored_in_blocks_within_the_budget(threads, monkeypatch) -> None:
    """GLDv2 recognition ranks 118k queries: one (Q × chunk) score block would need 20 GB. Blocks of
    queries keep each buffer within MAX_BLOCK_SCORES, with the same result as one full sort."""
    from retrieval_lightning.retrieval import search

    monkeypatch.setattr(search, "MAX_BLOCK_SCORES", 7 * 64)  # 7 queries per 64-column chunk
    sizes: list[tuple[int, int]] = []
    scan = search._scan

    def watched(db, q, lo, hi, k, chunk_size, sub_chunk, excluded):
        sizes.append((q.shape[0], min(chunk_size, hi - lo)))
        return scan(db, q, lo, hi, k, chunk_size, sub_chunk, excluded)

    monkeypatch.setattr(search, "_scan", watched)
    gen = torch.Generator().manual_seed(3)
    database = torch.randint(-2, 3, (600, 4), generator=gen).to(torch.float16)
    queries = torch.randint(1, 3, (30, 4), generator=gen).float()
    scores, indices = topk_search(queries, database, 12, chunk_size=64, sub_chunk=16, num_threads=threads,
                                  device="cpu")
    want_scores, want_indices = reference_topk(queries.numpy(), database.float().numpy(), 12)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_array_equal(scores.numpy(), want_scores.astype(np.float32))
    assert max(q * width for q, width in sizes) <= 7 * 64
    assert sum(q for q, _ in sizes) == 30 * threads  # every query scanned once per worker


def test_topk_on_random_fp16_memmap_store(tmp_path) -> None:
    rng = np.random.default_rng(1)
    database = rng.standard_normal((4000, 32)).astype(np.float16)
    queries = rng.standard_normal((7, 32)).astype(np.float32)
    store = FeatureStore.from_arrays(tmp_path / "s", {"global": database})
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # differs from the 2 scan threads, each of which runs torch single-threaded
    try:
        scores, indices = topk_search(queries, store, 25, chunk_size=512, sub_chunk=100, device="cpu", num_threads=2)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    assert after == 3  # the threaded scan restores the caller's thread count
    want_scores, want_indices = reference_topk(queries, database.astype(np.float32), 25)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)


def test_topk_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"queries must be \(Q, 4\)"):
        topk_search(torch.zeros(2, 3), torch.zeros(10, 4), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_search(torch.zeros(2, 4), torch.zeros(10, 4), 0)


@pytest.fixture()
def faiss_one_thread():
    """FAISS's OpenMP barriers crawl when other processes hold the cores; the tests check results."""
    import faiss  # installed with the [faiss] extra, as in the dev environment
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.mark.parametrize("n_queries", [5, 30])  # FAISS switches to BLAS from 20 queries on
def test_faiss_flat_equals_chunked(n_queries, faiss_one_thread) -> None:
    rng = np.random.default_rng(n_queries)
    database = rng.standard_normal((3000, 48)).astype(np.float16)
    queries = rng.standard_normal((n_queries, 48)).astype(np.float32)
    # two BLAS libraries may round a dot product differently in the last bit, which could swap
    # two scores closer than that; this data has no such near-ties, so the ranks must be equal
    want_scores, _ = reference_topk(queries, database.astype(np.float32), 41)
    assert -np.diff(want_scores, axis=1).min() > 1e-5
    searcher = FaissSearcher(48, "flat")
    searcher.add(database, chunk_size=700)
    assert searcher.ntotal == 3000
    f_scores, f_indices = searcher.search(queries, 40)
    c_scores, c_indices = topk_search(queries, database, 40, chunk_size=512, sub_chunk=128, device="cpu")
    np.testing.assert_array_equal(f_indices.numpy(), c_indices.numpy())
    np.testing.assert_allclose(f_scores.numpy(), c_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_faiss_ivfpq_finds_near_duplicates(faiss_one_thread) -> None:
    rng = np.random.default_rng(3)
    database = rng.standard_normal((2000, 32)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    searcher = FaissSearcher(32, "ivfpq", nlist=8, m=8, nbits=6, nprobe=8)
    searcher.add(database)
    queries = database[:50] + 0.01 * rng.standard_normal((50, 32)).astype(np.float32)
    _, indices = searcher.search(queries, 5)
    assert indices.shape == (50, 5)
    assert (indices[:, 0].numpy() == np.arange(50)).mean() >= 0.9
    with pytest.raises(ValueError, match="divisible by m=7"):
        FaissSearcher(32, "ivfpq", m=7)
    with pytest.raises(ValueError, match="unknown FAISS index_type 'hnsw'"):
        FaissSearcher(32, "hnsw")
    small = FaissSearcher(32, "ivfpq", nlist=100, m=8, nbits=6)  # FAISS itself would abort in its k-means
    with pytest.raises(UsageError, match="IVF-PQ needs at least 100 database rows.*has 78.*--backend exact"):
        small.add(database[:78])


def test_faiss_never_returns_padding_ids(faiss_one_thread) -> None:
    """FAISS pads short result lists with id -1 (the last item, to Python indexing)."""
    rng = np.random.default_rng(5)
    database = _unit(rng, (600, 16))
    flat = FaissSearcher(16, "flat")
    flat.add(database[:7])
    scores, indices = flat.search(database[:3], 10)  # k > ntotal: k' = ntotal, as topk_search
    assert indices.shape == (3, 7) and (indices >= 0).all()
    np.testing.assert_array_equal(indices.numpy(), topk_search(database[:3], database[:7], 10, device="cpu")[1].numpy())
    ivf = FaissSearcher(16, "ivfpq", nlist=16, m=4, nbits=4, nprobe=1, train_size=600)
    ivf.add(database)
    with pytest.raises(IncompleteSearchError, match="fewer than k=300.*raise nprobe"):
        ivf.search(database[:4], 300)  # one probed list of ~600/16 items cannot fill 300 results
    ivf.index.nprobe = 16
    assert (ivf.search(database[:4], 300)[1] >= 0).all()


def _unit(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_alpha_query_expansion_matches_formula() -> None:
    rng = np.random.default_rng(4)
    database, queries = _unit(rng, (50, 8)), _unit(rng, (3, 8))
    ranked = np.argsort(-(queries @ database.T), axis=1)[:, :5]
    expanded = alpha_query_expansion(queries, database, ranked, n=3, alpha=2.0).numpy()
    for q, row, got in zip(queries, ranked, expanded):
        want = q.astype(np.float64).copy()
        for j in row[:3]:
            want += max(float(q @ database[j]), 0.0) ** 2.0 * database[j]
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)


def test_database_augmentation_chunked_equals_naive(tmp_path) -> None:
    rng = np.random.default_rng(5)
    database = _unit(rng, (300, 16))
    sims = database.astype(np.float64) @ database.T
    naive = np.empty_like(database, dtype=np.float64)
    for i in range(len(database)):
        nn = np.argsort(-sims[i], kind="stable")[:3]
        naive[i] = (np.clip(sims[i, nn], 0, None) ** 3.0) @ database[nn]
    naive /= np.linalg.norm(naive, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(tmp_path / "dba.npy", mode="w+", dtype=np.float32, shape=database.shape)
    got = database_augmentation(database, k=3, alpha=3.0, chunk_rows=64, out=out, chunk_size=50, device="cpu")
    assert got is out
    np.testing.assert_allclose(np.asarray(out), naive, atol=1e-5)


def test_postprocessing_is_off_by_default_and_applies_when_asked() -> None:
    rng = np.random.default_rng(6)
    database, queries = _unit(rng, (400, 16)), _unit(rng, (4, 16))
    config = PostProcessConfig()
    assert not config.enabled
    plain = topk_search(queries, database, 10, device="cpu")
    default = postprocessed_search(queries, database, 10, config, device="cpu")
    assert torch.equal(plain[1], default[1])
    qe = PostProcessConfig(query_expansion=True, qe_n=2, qe_alpha=3.0)
    ranked = plain[1].numpy()
    want = topk_search(alpha_query_expansion(queries, database, ranked, 2, 3.0), database, 10, device="cpu")
    got = postprocessed_search(queries, database, 10, qe, device="cpu")
    assert torch.equal(got[1], want[1])
    both = PostProcessConfig(query_expansion=True, dba=True, dba_k=2)
    augmented = database_augmentation(database, 2, 3.0, device="cpu")
    _, first = topk_search(queries, augmented, 10, device="cpu")
    want = topk_search(alpha_query_expansion(queries, augmented, first, 2, 3.0), augmented, 10, device="cpu")
    assert torch.equal(postprocessed_search(queries, database, 10, both, device="cpu")[1], want[1])
    # a database smaller than qe_n: αQE with all of it, as evaluation's post-processing does
    small, wide = database[:3], PostProcessConfig(query_expansion=True, qe_n=5, qe_alpha=3.0)
    _, every = topk_search(queries, small, 3, device="cpu")
    want = topk_search(alpha_query_expansion(queries, small, every, 3, 3.0), small, 2, device="cpu")
    assert torch.equal(postprocessed_search(queries, small, 2, wide, device="cpu")[1], want[1])
    # placeholders (rows of unreadable images) are no one's neighbour: as if they were not there at all
    placeholders = np.array([7, 100])
    copied = database.copy()
    copied[placeholders] = queries[:2]  # each the nearest row of a query
    kept = np.setdiff1d(np.arange(len(database)), placeholders)
    _, without = postprocessed_search(queries, database[kept], 10, both, device="cpu")
    _, got = postprocessed_search(queries, copied, 10, both, excluded=placeholders, device="cpu")
    assert torch.equal(got, torch.as_tensor(kept)[without])
    with pytest.raises(ValueError, match="qe_n"):
        PostProcessConfig(qe_n=0)


def test_evaluation_postprocessing_reads_an_fp16_database_in_place() -> None:
    """A store's fp16 memory map is not copied whole as fp32 (16 GB for ROxford+1M at 2048-D, twice): αQE
    returns the database itself, DBA a new array in its dtype; the queries match the fp32 computation."""
    rng = np.random.default_rng(8)
    database, queries = _unit(rng, (300, 16)), _unit(rng, (5, 16))
    half = torch.from_numpy(database.astype(np.float16))
    qe = PostProcessConfig(query_expansion=True, qe_n=3, qe_alpha=3.0)
    expanded, same = postprocess_descriptors(torch.from_numpy(queries), half, qe, device="cpu")
    assert same is half and expanded.dtype == torch.float32
    _, top = topk_search(queries, half, 3, device="cpu")
    torch.testing.assert_close(expanded, alpha_query_expansion(queries, half.float(), top, 3, 3.0))
    both = PostProcessConfig(query_expansion=True, dba=True, dba_k=2)
    _, augmented = postprocess_descriptors(torch.from_numpy(queries), half, both, device="cpu")
    assert augmented.dtype == torch.float16 and augmented.shape == half.shape
    reference = torch.as_tensor(database_augmentation(half.float(), 2, 3.0, device="cpu"))
    torch.testing.assert_close(augmented.float(), reference, atol=2e-3, rtol=0)


def test_an_evaluations_query_expansion_leaves_a_memory_mapped_database_in_place(tmp_path) -> None:
    """αQE rewrites the queries only: the evaluation's descriptors were one tensor, so the database was copied
    whole into every rank's memory (4 GB per rank for ROxford+1M in fp16, a review measured 402 MiB for a 390 MiB
    store). Queries and database now stay apart, and the metrics are those of the one tensor."""
    from types import SimpleNamespace

    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.evaluation import NonFiniteDescriptorError, evaluate_eval_set
    from retrieval_lightning.module import RetrievalModule

    rng = np.random.default_rng(3)
    nq, n = 6, 200
    path = tmp_path / "global.npy"
    np.save(path, _unit(rng, (nq + n, 32)).astype(np.float16))
    desc = torch.from_numpy(np.load(path, mmap_mode="r"))
    truth = [{"easy": list(rng.choice(n, 4, replace=False)), "hard": [int(rng.integers(n))], "junk": []}
             for _ in range(nq)]
    eval_set = EvalSet("mapped", list(range(nq + n)), nq, "revisitop", truth, [f"img{i}" for i in range(nq + n)])
    model = SimpleNamespace(postprocess=PostProcessConfig(query_expansion=True, qe_n=3), search_chunk=64,
                            device="cpu")
    queries, database = RetrievalModule.postprocessed(model, eval_set, desc)  # type: ignore[arg-type]
    assert database.data_ptr() == desc[nq:].data_ptr()  # the memory map itself
    assert queries.dtype == desc.dtype and not torch.equal(queries, desc[:nq])
    split = evaluate_eval_set(eval_set, (queries, database), chunk=64).metrics
    assert split == evaluate_eval_set(eval_set, torch.cat([queries, database]), chunk=64).metrics
    broken = database.clone()
    broken[7] = float("nan")
    with pytest.raises(NonFiniteDescriptorError, match=r"\['img13'\]"):  # named by its dataset position
        evaluate_eval_set(eval_set, (queries, broken), chunk=64)


@pytest.mark.parametrize(("max_side", "upscale", "size", "factor"), [
    (96, False, (128, 64), 0.75),     # long side capped
    (96, False, (64, 48), 1.0),       # never enlarged
    (96, True, (64, 48), 1.5),        # enlarged with upscale
    (None, False, (4000, 3000), 1.0),  # full size
    (96, True, (96, 50), 1.0),
])
def test_image_resize_factor(max_side, upscale, size, factor) -> None:
    from retrieval_lightning.data.types import ImageResize

    assert ImageResize(max_side, upscale).factor(*size) == factor


def test_search_sizes_queries_as_the_store_was_sized(tmp_path, capsys) -> None:
    """``extract``'s record beside the store sizes a query; a different ``--max-side`` is noted; a
    malformed record names its file; without a record the fallback is said."""
    from PIL import Image

    from retrieval_lightning.data.types import EvalSet, ImageResize
    from retrieval_lightning.errors import DataFormatError
    from retrieval_lightning.retrieval.set_files import IMAGE_RESIZE, read_image_resize, write_set_files
    from retrieval_lightning.search_cli import FALLBACK_MAX_SIDE, load_query, load_query_sized, query_resize

    store = FeatureStore.from_arrays(tmp_path / "set" / "store", {"global": np.eye(3, dtype=np.float16)})
    assert query_resize(store, None) == ImageResize(FALLBACK_MAX_SIDE)
    assert "does not record" in capsys.readouterr().err

    spec = EvalSet("set", dataset=list(range(3)), n_queries=1, protocol="revisitop", ground_truth=None,
                   image_resize=ImageResize(40, upscale=True))
    write_set_files(spec, tmp_path / "set")
    assert read_image_resize(tmp_path / "set") == ImageResize(40, True)
    assert query_resize(store, None) == ImageResize(40, True) and capsys.readouterr().err == ""
    photo = tmp_path / "q.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(photo)
    assert load_query(str(photo), query_resize(store, None)).shape == (3, 27, 40)  # enlarged to 40 as the database
    assert load_query_sized(str(photo), query_resize(store, None))[1] == (27 / 20, 40 / 30)  # for DELG's keypoints
    assert query_resize(store, 64) == ImageResize(64, True)
    assert "--max-side 64, but the database images were sized to 40" in capsys.readouterr().err

    spec.image_resize = None  # a datamodule that does not declare its sizing: no stale record left behind
    write_set_files(spec, tmp_path / "set")
    assert not (tmp_path / "set" / IMAGE_RESIZE).exists()
    (tmp_path / "set" / IMAGE_RESIZE).write_text('{"max_side": -3}')
    with pytest.raises(DataFormatError, match=IMAGE_RESIZE):
        read_image_resize(tmp_path / "set")


def test_search_device_names_a_device_this_torch_lacks_in_one_line() -> None:
    """--device mps / xpu on a machine without them were tracebacks from moving the model there."""
    from retrieval_lightning.search_cli import search_device

    assert search_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(UsageError, match="--device mps: not available here"):
            search_device("mps")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(UsageError, match="--device xpu: not available here"):
            search_device("xpu")


def _eval_set_store(root, descriptors: np.ndarray, n_queries: int, paths: list[str] | None = None) -> FeatureStore:
    """A store as ``extract`` leaves it: every item of an eval set (queries first), with its set files."""
    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.retrieval.set_files import write_set_files

    class Items(list):
        pass

    dataset = Items(range(len(descriptors)))
    dataset.paths = paths
    spec = EvalSet("set", dataset=dataset, n_queries=n_queries, protocol="revisitop", ground_truth=None,
                   image_ids=[f"id{i}" for i in range(len(descriptors))])
    store = FeatureStore.from_arrays(root / "set" / "store", {"global": descriptors})
    write_set_files(spec, root / "set")
    return store


def test_search_ranks_the_database_only_with_the_models_postprocessing(tmp_path, capsys) -> None:
    """An eval set's queries are stored too (as box crops): ``search`` ranks the database rows only, and with
    the checkpoint's αQE and DBA as evaluation ranks (``postprocess_descriptors`` over the database)."""
    from retrieval_lightning.search_cli import make_ranker

    rng = np.random.default_rng(0)
    descriptors = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((40, 8))), dim=1).float()
    n_queries = 6
    store = _eval_set_store(tmp_path, descriptors.numpy(), n_queries)
    probes = descriptors[:n_queries] + 0.01  # each nearest to a stored query
    database = descriptors[n_queries:]
    for post in (None, PostProcessConfig(query_expansion=True, qe_n=3), PostProcessConfig(dba=True, dba_k=3),
                 PostProcessConfig(query_expansion=True, dba=True)):
        ranker = make_ranker(store, postprocess=post)
        assert len(ranker) == 40 - n_queries
        scores, rows = ranker(probes, 34)
        assert (store.index[rows.numpy()] >= n_queries).all()  # no query row among the results
        q, db = postprocess_descriptors(probes, database, post)
        expected_scores, expected_rows = topk_search(q, db, 34)
        assert torch.equal(rows, expected_rows + n_queries), post
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert capsys.readouterr().err == ""
    # a store whose set record is missing (an extract before it existed) is searched whole, said once
    (tmp_path / "set" / "set.json").unlink()
    everything = make_ranker(store)
    assert len(everything) == 40 and everything(probes, 1)[1][:, 0].tolist() == list(range(n_queries))
    assert "does not record which items are the set's queries" in capsys.readouterr().err


def test_search_never_returns_a_placeholder_of_an_unreadable_image(tmp_path) -> None:
    """The store's placeholders (``on_error: skip``) are all the same blank image: ``search`` returned them as
    results, and used them as αQE/DBA neighbours, while the store's note said they match nothing."""
    from retrieval_lightning.retrieval.writer import UNREADABLE
    from retrieval_lightning.search_cli import make_ranker

    rng = np.random.default_rng(1)
    descriptors = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((20, 8))), dim=1).float()
    flags = np.zeros(20, np.uint8)  # no set record: the whole store is the database
    flags[[5, 9]] = 1
    probes = descriptors[[5, 9]].clone()  # each the copy of a placeholder: its nearest row, were it searched
    store = FeatureStore.from_arrays(tmp_path / "store", {"global": descriptors.numpy(), UNREADABLE: flags})
    for post in (None, PostProcessConfig(query_expansion=True, qe_n=3), PostProcessConfig(dba=True, dba_k=3)):
        ranker = make_ranker(store, postprocess=post)
        assert len(ranker) == 18
        scores, rows = ranker(probes, 18)
        assert rows.shape == (2, 18) and not set(rows.flatten().tolist()) & {5, 9}, post
        assert torch.isfinite(scores).all()
        kept = np.setdiff1d(np.arange(20), [5, 9])
        q, db = postprocess_descriptors(probes, descriptors[kept], post)  # the set without its placeholders
        torch.testing.assert_close(scores, topk_search(q, db, 18)[0], atol=1e-5, rtol=0)


def test_item_paths_are_absolute_and_a_malformed_items_table_leaves_results_unnamed(tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    from retrieval_lightning.errors import DataFormatError
    from retrieval_lightning.retrieval.set_files import ITEMS, read_items, read_query_count

    monkeypatch.chdir(tmp_path)
    _eval_set_store(tmp_path, np.eye(3, dtype=np.float16), 1, paths=["jpg/a.jpg", "jpg/b.jpg", "jpg/c.jpg"])
    table = read_items(tmp_path / "set")
    assert table.get(2) == ("id2", str(tmp_path / "jpg" / "c.jpg"))  # found from any directory `search` runs in
    assert read_query_count(tmp_path / "set") == 1
    for text in ("idx\tname\n0\ta\n", "index\tid\tpath\nx\tfoo\tbar\n"):  # a header, an index not a number
        (tmp_path / "set" / ITEMS).write_text(text)
        assert read_items(tmp_path / "set").get(0, ("0", "")) == ("0", "")  # the index stands for the name
        assert "is not an items table of `extract`" in capsys.readouterr().err
    (tmp_path / "set" / ITEMS).write_bytes(b"index\tid\tpath\n0\t\xff\xfe\tx\n")  # not UTF-8: named as it reads
    assert read_items(tmp_path / "set").get(0) == ("\ufffd\ufffd", "x")
    (tmp_path / "set" / "set.json").write_text('{"queries": -1}')
    with pytest.raises(DataFormatError, match="set.json: not a set record"):
        read_query_count(tmp_path / "set")


def test_search_prints_one_line_per_result_whatever_the_file_names(tmp_path) -> None:
    """A newline in a query's or a result's file name split the results table (an image-input review); a folder
    of queries skipped its GIFs, which a GIF named alone is searched as."""
    from types import SimpleNamespace

    from retrieval_lightning.search_cli import SearchResult, expand_queries, format_results

    result = SearchResult("new\nline.jpg", np.array([0, 1]), np.array([0.9, 0.5]), None, np.array([0, 1]))
    store = SimpleNamespace(index=np.array([7, 8]))
    table = format_results([result], store, {7: ("a\tb.jpg", ""), 8: ("é ü.jpg", "")})  # type: ignore[arg-type]
    assert table.splitlines() == ["query new\\nline.jpg", "rank     index    global  id",
                                  "   1         7    0.9000  a\\tb.jpg", "   2         8    0.5000  é ü.jpg"]
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "q.gif")
    assert expand_queries([str(tmp_path)]) == [str(tmp_path / "q.gif")]


def test_query_expansion_gives_a_dissimilar_neighbour_no_weight() -> None:
    """max(similarity, 0) ** alpha: a listed neighbour on the far side of the query adds nothing, whatever alpha's
    parity (without the clamp an odd alpha pushed the query away from it, an even one pulled it towards it)."""
    database = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.6, 0.0, 0.8]], dtype=np.float32)
    queries = np.array([[0.8, 0.6, 0.0]], dtype=np.float32)
    for alpha in (2.0, 3.0):
        expanded = alpha_query_expansion(queries, database, np.array([[0, 1, 2]]), n=3, alpha=alpha).numpy()[0]
        want = queries[0].astype(np.float64) + 0.8 ** alpha * database[0] + 0.96 ** alpha * database[1]  # row 2: -0.48
        np.testing.assert_allclose(expanded, want / np.linalg.norm(want), atol=1e-6)


def test_a_search_that_cannot_leave_rows_out_goes_deeper_by_their_number() -> None:
    """topk_skipping (the FAISS path): the excluded rows are the best-scoring ones here, so a search only k deep
    would return fewer than k others; it must return what topk_search(excluded=...) returns."""
    rng = np.random.default_rng(7)
    database = torch.from_numpy(_unit(rng, (60, 8)))
    queries = torch.from_numpy(_unit(rng, (4, 8)))
    excluded = np.unique(topk_search(queries, database, 3, device="cpu")[1].numpy())  # every query's best three
    for k in (1, 5):
        want = topk_search(queries, database, k, device="cpu", excluded=excluded)
        got = topk_skipping(lambda q, depth: topk_search(q, database, depth, device="cpu"), queries, k, excluded,
                            len(database))
        assert got[1].shape == (4, k) and not np.isin(got[1].numpy(), excluded).any()
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
