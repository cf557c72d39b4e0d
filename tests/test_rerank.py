"""The core re-ranking stage as plain objects (no Trainer): shortlists per protocol variant, fusion,
pair seeds, only shortlisted rows read, rank-split scoring equal to one process, the notebook path,
self-contained checkpoints and the inference API."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rerank_plugin import PLUGIN_SOURCE
from retrieval_lightning.backbone import Backbone
from retrieval_lightning.errors import UsageError
from retrieval_lightning.checkpoints import ARCHITECTURE_KEY, CheckpointLoadError, IncompatibleWeightsError
from retrieval_lightning.head import EntryKind, PairExplanation
from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.evaluation import AP_PER_QUERY, evaluate_eval_set, revisitop_exclusions, revisitop_protocol
from retrieval_lightning.metrics import evaluate_revisitop
from retrieval_lightning.head_plugins import gem_arcface
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.retrieval.rerank import (
    ALL,
    split_queries,
    EntryReader,
    QueryScores,
    RerankConfig,
    build_shortlists,
    fuse,
    pair_seeds,
    score_shortlists,
    search_depth,
)
from retrieval_lightning.retrieval.rerank_eval import RerankEntryWriter, evaluate_reranked, extract_entries
from retrieval_lightning.retrieval.search import topk_search
from retrieval_lightning.retrieval.store import FeatureStore
from retrieval_lightning.retrieval.writer import UNREADABLE


def plugin_module() -> types.ModuleType:
    """The test plugin as an importable module (checkpoints record it by import path: it has no entry point here)."""
    if "acme_rerank_inline" not in sys.modules:
        module = types.ModuleType("acme_rerank_inline")
        exec(PLUGIN_SOURCE, module.__dict__)  # noqa: S102 - the test plugin's own source
        sys.modules[module.__name__] = module
    return sys.modules["acme_rerank_inline"]


def test_protocol_shortlists_skip_each_variants_junk_and_score_each_pair_once() -> None:
    ranking = np.array([[5, 3, 7, 1, 0, 2, 4, 6]])
    gt = [{"easy": [3], "hard": [1, 7], "junk": [5]}]
    exclusions = revisitop_exclusions(gt, 1)
    assert search_depth(3, 8, exclusions) == 3 + 3
    short = build_shortlists(ranking, 3, exclusions)
    assert short.variants["easy"][0].tolist() == [3, 0, 2]  # junk 5 and hard 7, 1 skipped
    assert short.variants["medium"][0].tolist() == [3, 7, 1]
    assert short.variants["hard"][0].tolist() == [7, 1, 0]  # easy 3 is junk under Hard
    assert short.candidates(0).tolist() == [3, 0, 2, 7, 1]
    assert build_shortlists(ranking, 3).variants[ALL][0].tolist() == [5, 3, 7]


def test_each_protocols_per_query_ap_is_of_its_own_reranked_ranking() -> None:
    """Easy, Medium and Hard are re-ranked on shortlists of their own: each query's AP per protocol is that
    of the ranking its variant put first (then the rest in global order), as the ranking door computes it."""
    gen = torch.Generator().manual_seed(0)
    queries, database = torch.randn(3, 8, generator=gen), torch.randn(12, 8, generator=gen)
    gt = [{"easy": [0, 4], "hard": [7], "junk": [2]}, {"easy": [], "hard": [1, 9], "junk": [3]},
          {"easy": [5], "hard": [6, 11], "junk": []}]
    rng = np.random.default_rng(0)
    first = {v: [rng.permutation(12)[:4] for _ in range(3)] for v in ("easy", "medium", "hard")}
    result = revisitop_protocol(queries, database, gt, chunk=5, reranked=first)
    global_order = torch.argsort(queries @ database.T, dim=1, descending=True, stable=True).numpy()
    for variant, suffix in (("easy", "E"), ("medium", "M"), ("hard", "H")):
        for q in range(3):
            lead = [int(i) for i in first[variant][q]]
            ranking = np.array(lead + [int(i) for i in global_order[q] if i not in lead])[:, None]
            alone = evaluate_revisitop(ranking, gt[q:q + 1])[f"mAP_{suffix}"]
            got = result.extra[AP_PER_QUERY][suffix][q]
            assert (np.isnan(alone) and np.isnan(got)) or got == pytest.approx(alone, abs=1e-9), (variant, q)
        assert np.nanmean(result.extra[AP_PER_QUERY][suffix]) == pytest.approx(result.metrics[f"mAP_{suffix}"])


def test_fusion_orders() -> None:
    positions = np.array([10, 11, 12, 13])
    glob = np.array([0.9, 0.8, 0.7, 0.6])
    inliers = np.array([3.0, 20.0, 20.0, 0.0])
    assert fuse(positions, glob, inliers, "lexicographic").tolist() == [11, 12, 10, 13]
    verifier = np.array([0.0, 0.1, 0.9, 0.0])
    assert fuse(positions, glob, verifier, "weighted", 0.5).tolist() == [12, 10, 11, 13]  # 1.15, .9, .85, .6
    assert fuse(positions, glob, verifier, "weighted", 2.0).tolist() == [12, 11, 10, 13]  # 2.5, 1.0, .9, .6
    assert fuse(positions, glob, verifier, "weighted", 0.1).tolist() == [10, 11, 12, 13]  # .9, .81, .79, .6
    for weight in (float("nan"), float("inf")):  # NaN kept the global order silently; inf made 0 x inf = NaN
        with pytest.raises(ValueError, match="rerank.weight must be a finite number"):
            RerankConfig(fusion="weighted", weight=weight)


def test_fused_ties_keep_the_global_order() -> None:
    """Equal fused scores keep the shortlist's (global) order in both fusions: 0.5 + 0.5 * 0.5 = 0.75 + 0.5 * 0
    exactly, and equal inlier counts fall back to the global score, then to the input order."""
    positions = np.array([10, 11, 12, 13])
    glob = np.array([0.5, 0.75, 0.5, 0.25])
    verifier = np.array([0.5, 0.0, 0.5, 0.0])
    assert fuse(positions, glob, verifier, "weighted", 0.5).tolist() == [10, 11, 12, 13]
    assert fuse(positions[::-1], glob[::-1], verifier[::-1], "weighted", 0.5).tolist() == [12, 11, 10, 13]
    same = np.array([0.5, 0.5, 0.5, 0.5])
    assert fuse(positions, same, np.array([4.0, 4.0, 4.0, 9.0]), "lexicographic").tolist() == [13, 10, 11, 12]


def test_pair_seeds_depend_on_the_pair_only() -> None:
    a = pair_seeds(7, [1, 2, 3])
    assert a == [pair_seeds(7, [i])[0] for i in (1, 2, 3)]
    assert a[::-1] == pair_seeds(7, [3, 2, 1])
    assert len(set(a + pair_seeds(8, [1, 2, 3]))) == 6 and all(0 <= s < 2**31 for s in a)


def test_entry_reader_reads_only_the_requested_rows(tmp_path: Path) -> None:
    rows = [np.full((n, 2), i, dtype=np.float16) for i, n in enumerate([1, 3, 2, 4])]
    store = FeatureStore.from_arrays(tmp_path / "s", {"local-rows": rows}, index=[10, 11, 12, 13])
    calls = []
    original = store.get

    def spy(kind, positions):
        calls.append(np.asarray(positions).tolist())
        return original(kind, positions)

    store.get = spy  # type: ignore[method-assign]
    entries = EntryReader(store, "local-").read([13, 11])
    assert calls == [[1, 3]]  # sorted positions of the two requested images, nothing else
    assert entries[0]["rows"].shape == (4, 2) and float(entries[0]["rows"][0, 0]) == 3
    assert entries[1]["rows"].shape == (3, 2) and float(entries[1]["rows"][0, 0]) == 1


class Images(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(4, 3, 72, 64, generator=g)
        sizes = [64 + 8 * (i % 2) for i in range(n)]  # images of different sizes, as in real sets
        self.images = [(base[i % 4, :, : sizes[i]] * 0.7 + 0.3 * torch.rand(3, sizes[i], 64, generator=g)).clamp(0, 1)
                       for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i, "unreadable": i in getattr(self, "unreadable", ())}


def tiny_eval_set() -> EvalSet:
    n_q, n_db = 4, 12
    gt = [{"easy": [j for j in range(n_db) if j % 4 == q and j < 6], "hard": [j for j in range(n_db) if j % 4 == q and j >= 6],
           "junk": [(q + 1) % 4]} for q in range(n_q)]
    return EvalSet("tiny", Images(n_q + n_db), n_q, "revisitop", gt, [f"img{i}" for i in range(n_q + n_db)])


def tiny_module(sign: float = 1.0, fusion: str = "weighted", shortlist: str = "protocol") -> RetrievalModule:
    torch.manual_seed(0)
    head = plugin_module().CosineRerankHead(sign=sign)
    return RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(), "verifier": head},
                           eval_scales=[1.0], rerank=RerankConfig(k=5, fusion=fusion, shortlist=shortlist)).eval()


def test_notebook_path_reproduces_global_metrics_and_split_ranks_agree(tmp_path: Path) -> None:
    eval_set = tiny_eval_set()
    module = tiny_module()
    desc, qstore, dbstore = extract_entries(module, eval_set, tmp_path / "e", module.entry_identity(), progress=False)
    assert len(qstore) == 4 and len(dbstore) == 12 and dbstore.index[0] == 4
    glob = evaluate_eval_set(eval_set, desc).metrics
    same = evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, progress=False).metrics
    assert same == glob  # the head re-computes the global similarity; weighted fusion keeps every order

    module.rerank = RerankConfig(k=5, fusion="lexicographic", shortlist="plain")
    module.heads["verifier"].sign = -1.0
    alone = evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, progress=False)
    assert alone.metrics["mAP_M"] < glob["mAP_M"]

    other: list[QueryScores] = []
    scored_here: list[int] = []

    def gather(local):  # rank 0's gather sees rank 1's scores, computed independently
        if isinstance(local, bool):  # whether a rank failed: neither did
            return [local, False]
        scored_here.extend(q.query for q in local)
        return [local, other]

    queries, database = desc[:4], desc[4:]
    _, ranking = topk_search(queries, database, k=5, device="cpu")
    other.extend(score_shortlists(build_shortlists(ranking, 5), split_queries(4, 1, 2), EntryReader(qstore, "verifier-"),
                                  EntryReader(dbstore, "verifier-"), module.score_entries,
                                  db_index=lambda p: p + 4, progress=False))
    split = evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, rank=0, world_size=2,
                              all_gather_object=gather, progress=False)
    assert split.metrics == alone.metrics
    assert scored_here == [0, 2] and [q.query for q in other] == [1, 3]  # each rank scored its half only
    # a placeholder of an unreadable database image is in no shortlist (it matches nothing, as globally)
    flags = torch.zeros(len(desc), dtype=torch.bool)
    flags[4 + 1] = True  # database position 1
    skipped = evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, progress=False,
                                unreadable=flags)
    assert all(1 not in positions.tolist() for positions, _ in skipped.extra["rerank_scores"].values())
    assert any(1 in positions.tolist() for positions, _ in alone.extra["rerank_scores"].values())
    assert all(1 not in row for row in skipped.topk.tolist())  # last of 12: past the 10 shown
    # the notebook path marks a placeholder in its stores, and the re-ranking reads the marks there
    eval_set.dataset.unreadable = {4 + 1}
    _, marked_q, marked_db = extract_entries(module, eval_set, tmp_path / "marked", module.entry_identity(),
                                             progress=False)
    from_stores = evaluate_reranked(module, eval_set, desc, marked_q, marked_db, module.rerank, progress=False)
    assert from_stores.extra["rerank_scores"].keys() == skipped.extra["rerank_scores"].keys()
    for q, (positions, scores) in skipped.extra["rerank_scores"].items():
        assert np.array_equal(from_stores.extra["rerank_scores"][q][0], positions)
    # two ranks but no way to gather (a notebook without a process group): named before any scoring
    with pytest.raises(ValueError, match="world_size=2 needs all_gather_object"):
        evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, rank=0, world_size=2,
                          progress=False)


def test_a_rank_whose_share_fails_stops_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head refusing one rank's queries: that rank raises its error, and a rank whose share went well
    raises too, instead of waiting in the gather of the scores until the process group's timeout."""
    from retrieval_lightning.rank_zero import OtherRankFailed

    eval_set = tiny_eval_set()
    module = tiny_module()
    desc, qstore, dbstore = extract_entries(module, eval_set, tmp_path / "e", module.entry_identity(), progress=False)
    said: list[bool] = []

    def rank1_fails(failed):  # rank 0's view of the first gather: rank 1 failed
        said.append(failed)
        return [failed, True]

    with pytest.raises(OtherRankFailed, match=r"re-ranking tiny: rank\(s\) \[1\] failed"):
        evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, rank=0, world_size=2,
                          all_gather_object=rank1_fails, progress=False)
    assert said == [False]  # rank 0's own share went well: it only learnt of rank 1's failure

    def refuse(*args, **kwargs):
        raise UsageError("head 'verifier': scores contain NaN")

    monkeypatch.setattr(module, "score_entries", refuse)
    with pytest.raises(UsageError, match="NaN"):
        evaluate_reranked(module, eval_set, desc, qstore, dbstore, module.rerank, rank=1, world_size=2,
                          all_gather_object=lambda failed: [False, failed], progress=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: {**e, "extra": torch.zeros(1)}, r"returned entries \['descriptor', 'extra', 'rows'\].*declares"),
    (lambda e: {**e, "descriptor": e["descriptor"][None]}, r"entry 'descriptor' of image 0 has shape \(1, \d+\)"),
    (lambda e: {**e, "rows": e["rows"][:, :1]}, r"entry 'rows' of image 0 has shape \(\d+, 1\), .*\(n, 2\) \(ragged\)"),
])
def test_entries_that_differ_from_their_declared_kinds_are_named(monkeypatch: pytest.MonkeyPatch, change,
                                                                message: str) -> None:
    """A store is laid out from ``entry_kinds()``: an undeclared name, a missing row dimension or a row of
    another width is the head's error, named when the entries are made."""
    module = tiny_module()
    head = module.heads["verifier"]
    real = head.extract_entries
    monkeypatch.setattr(head, "extract_entries", lambda images, at: [change(e) for e in real(images, at)])
    with pytest.raises(UsageError, match=message):
        module.rerank_entries([tiny_eval_set().dataset[0]["image"]])


def test_entries_the_store_would_truncate_or_wrap_are_refused() -> None:
    """The store casts entries to their declared dtype: float32 into a float16 kind is what the declaration asks
    for, but a float into an integer kind (truncated) or integers beyond its range (wrapped) are named."""
    from retrieval_lightning.entry_checks import check_entries

    kinds = {"keep": EntryKind("int16", (2,), ragged=True), "values": EntryKind("float16", (3,))}
    fine = {"keep": torch.tensor([[0, 5], [-7, 32767]]), "values": torch.rand(3, dtype=torch.float32)}
    check_entries([fine, {**fine, "keep": torch.ones(1, 2, dtype=torch.bool)}], kinds, "Head")
    with pytest.raises(UsageError, match=r"Head entry 'keep' of image 1 is torch.float32, but entry_kinds\(\) "
                                         r"declares int16: the store would truncate it"):
        check_entries([fine, {**fine, "keep": torch.full((1, 2), 0.5)}], kinds, "Head")
    with pytest.raises(UsageError, match=r"entry 'keep' of image 0 holds values in \[0, 40000\], beyond int16's "
                                         r"\[-32768, 32767\]: the store would wrap them"):
        check_entries([{**fine, "keep": torch.tensor([[0, 40000]])}], kinds, "Head")
    # bool: any non-zero value is True, so descriptors (or counts) became all True and every score equal
    flags = {"flag": EntryKind("bool", (3,))}
    check_entries([{"flag": torch.tensor([True, False, True])}, {"flag": torch.tensor([1, 0, 0])}], flags, "Head")
    with pytest.raises(UsageError, match=r"'flag' of image 0 is torch.float32, but entry_kinds\(\) declares bool"):
        check_entries([{"flag": torch.tensor([0.2, -0.7, 0.0])}], flags, "Head")
    with pytest.raises(UsageError, match=r"'flag' of image 0 holds values other than 0 and 1"):
        check_entries([{"flag": torch.tensor([0, 2, 1])}], flags, "Head")


@pytest.mark.parametrize(("kind", "message"), [
    (EntryKind("floaty", (4,)), r"kind 'descriptor': dtype 'floaty' cannot be stored"),
    (EntryKind("float128", (4,)), r"kind 'descriptor': dtype 'float128' cannot be stored and read back"),
    (EntryKind("float16", 4), r"kind 'descriptor': shape 4 is not a tuple of sizes"),
])
def test_declared_kinds_that_cannot_be_stored_are_named_before_extraction(monkeypatch: pytest.MonkeyPatch, kind,
                                                                          message: str) -> None:
    """A dtype numpy does not know or torch cannot read back (float128: found only when scoring, after the whole
    extraction), a shape that is no tuple, a name that is no file name: one line naming the head, up front."""
    module = tiny_module()
    head = module.heads["verifier"]
    monkeypatch.setattr(head, "entry_kinds", lambda: {**type(head).entry_kinds(head), "descriptor": kind})
    with pytest.raises(UsageError, match=message) as err:
        module.entry_identity()
    assert type(head).__name__ in str(err.value)
    monkeypatch.setattr(head, "entry_kinds", lambda: {"../descriptor": EntryKind("float16", (4,))})
    with pytest.raises(UsageError, match=r"kind '../descriptor': feature kind name 'verifier-../descriptor' is "):
        module.rerank_entry_kinds()


def test_a_head_scoring_the_wrong_number_of_candidates_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    module = tiny_module()
    head = module.heads["verifier"]
    real = head.score
    monkeypatch.setattr(head, "score", lambda query, candidates, seeds: real(query, candidates, seeds)[:-1])
    entries = module.rerank_entries([tiny_eval_set().dataset[i]["image"] for i in range(3)])
    with pytest.raises(UsageError, match=r"CosineRerankHead.score returned scores of shape \(2,\) for 3 candidates"):
        module.score_entries(entries[0], entries, [0, 1, 2])


def test_a_head_scoring_nan_or_returning_too_few_entries_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN score would reorder a fused shortlist silently (``search`` showed it as "not re-ranked"); entries
    for fewer images, or one dict for the batch, failed later without the head's name."""
    module = tiny_module()
    head = module.heads["verifier"]
    images = [tiny_eval_set().dataset[i]["image"] for i in range(3)]
    entries = module.rerank_entries(images)
    real_score, real_extract = head.score, head.extract_entries
    monkeypatch.setattr(head, "score", lambda q, c, s: real_score(q, c, s).index_fill(0, torch.tensor([1]), torch.nan))
    with pytest.raises(UsageError, match=r"CosineRerankHead.score returned NaN/Inf for 1 of 3 candidates "
                                         r"\(positions \[1\]"):
        module.score_entries(entries[0], entries, [0, 1, 2])
    monkeypatch.setattr(head, "explain", lambda q, c: PairExplanation(score=float("nan"), matches=np.zeros((0, 4)),
                                                                      strengths=np.zeros(0)))
    with pytest.raises(UsageError, match=r"CosineRerankHead.explain returned the score nan"):
        module.explain_pair(images[0], images[1])  # what match draws
    monkeypatch.setattr(head, "extract_entries", lambda imgs, at: real_extract(imgs, at)[:-1])
    with pytest.raises(UsageError, match="CosineRerankHead.extract_entries returned 2 entries for 3 images"):
        module.rerank_entries(images)
    monkeypatch.setattr(head, "extract_entries", lambda imgs, at: real_extract(imgs, at)[0])
    with pytest.raises(UsageError, match="CosineRerankHead.extract_entries returned one dict for 3 images"):
        module.rerank_entries(images)
    monkeypatch.setattr(head, "extract_entries", lambda imgs, at: iter(real_extract(imgs, at)))
    with pytest.raises(UsageError, match="CosineRerankHead.extract_entries returned one list_iterator for 3 images"):
        module.dense_entries(images)
    monkeypatch.setattr(head, "extract_entries", real_extract)
    # a score of another type is named; (K, 1) is taken and given back as the documented (K,)
    monkeypatch.setattr(head, "score", lambda q, c, s: {"scores": [0.0] * len(c)})
    with pytest.raises(UsageError, match="CosineRerankHead.score returned dict, not a tensor of scores"):
        module.score_entries(entries[0], entries, [0, 1, 2])
    monkeypatch.setattr(head, "score", lambda q, c, s: torch.zeros(len(c), 1))
    assert module.rerank_scores(images[0], images).shape == (3,)
    # a global head whose descriptors are not of its dim
    monkeypatch.setattr(type(module.global_head), "dim", property(lambda self: 7))
    with pytest.raises(UsageError, match=r"embed gave a descriptor of shape \(\d+,\) per image, but its dim is 7"):
        module.embed_image(images[0])


def test_fit_refuses_to_train_a_head_that_implements_no_losses() -> None:
    """A parameter-free verifier is a plugin author's first head: fit names it before the first step (it died
    in the first step with a bare NotImplementedError); frozen, it is fine."""
    from retrieval_lightning.head import Head

    no_losses = type("NoLossHead", (plugin_module().CosineRerankHead,), {"losses": Head.losses})
    for freeze, refused in (((), True), (("verifier",), False)):
        heads = {"global": gem_arcface(), "verifier": no_losses()}
        module = RetrievalModule(Backbone("resnet18", stages=["conv5"]), heads, freeze=freeze)
        if refused:
            with pytest.raises(UsageError, match=r"NoLossHead \('verifier'\) implements no losses.*model.freeze"):
                module.check_trained_heads_have_losses()
        else:
            module.check_trained_heads_have_losses()


def test_entries_are_resumed_not_recomputed(tmp_path: Path) -> None:
    eval_set = tiny_eval_set()
    module = tiny_module()
    first = RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity(), shard_size=3)
    first.add([eval_set.dataset[i]["image"] for i in range(7)], list(range(7)))
    first.close()
    again = RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity(), shard_size=3)
    again.add([eval_set.dataset[i]["image"] for i in range(16)], list(range(16)))
    again.close()
    assert again.extracted == 16 - 7
    again.merge()
    qstore, dbstore = again.open()
    assert qstore.index.tolist() == list(range(4)) and dbstore.index.tolist() == list(range(4, 16))


def test_an_unreadable_images_placeholder_entry_is_extracted_again_once_the_image_reads(tmp_path: Path) -> None:
    """``test`` under ``on_error: skip`` stores a blank placeholder's entries: marked, a later run (the file
    fixed) extracts the image again and the merged store holds its real entries, as ``extract`` does."""
    eval_set = tiny_eval_set()
    module = tiny_module()
    images = [eval_set.dataset[i]["image"] for i in range(16)]
    blank = [torch.zeros_like(img) if i == 9 else img for i, img in enumerate(images)]
    first = RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity(), shard_size=4)
    first.add(blank, list(range(16)), unreadable=[i == 9 for i in range(16)])
    first.close()
    first.merge()
    stale = first.open_side("database")
    kind = next(k for k in stale.kinds if k.startswith(module.rerank_prefix))
    placeholder = np.array(stale.get(kind, [int(np.flatnonzero(stale.index == 9)[0])])[0])
    again = RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity(), shard_size=4)
    assert 9 not in again.done["database"] and len(again.done["database"]) == 11
    again.add(images, list(range(16)), unreadable=[False] * 16)
    again.close()
    assert again.extracted == 1
    again.merge()
    fixed = again.open_side("database")
    row = int(np.flatnonzero(fixed.index == 9)[0])
    want = module.rerank_entries([images[9]])[0][kind[len(module.rerank_prefix):]].numpy()
    np.testing.assert_array_equal(np.asarray(fixed.get(kind, [row])[0]).reshape(want.shape), want)
    assert not np.array_equal(placeholder.reshape(want.shape), want)


def test_rank_zeros_merge_takes_in_the_entry_another_rank_extracted_again(tmp_path: Path) -> None:
    """Under DDP rank 0 merges every rank's shards: when only rank 1 extracted a fixed image again (rank 0 wrote
    nothing this time), the merge must still run, and so must one after a run killed before its merge."""
    eval_set = tiny_eval_set()
    module = tiny_module()
    images = [eval_set.dataset[i]["image"] for i in range(16)]
    blank = [torch.zeros_like(img) if i == 9 else img for i, img in enumerate(images)]

    def run(pictures: list[Tensor], merge: bool) -> list[RerankEntryWriter]:
        writers = [RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity(), rank=rank,
                                     shard_size=4) for rank in (0, 1)]
        for rank, writer in enumerate(writers):  # a DistributedSampler's split: rank r has items r, r + 2, ...
            mine = list(range(rank, 16, 2))
            writer.add([pictures[i] for i in mine], mine, unreadable=[pictures[i] is blank[9] for i in mine])
            writer.close()
        if merge:
            writers[0].merge()
        return writers

    run(blank, merge=True)
    stale = RerankEntryWriter(module, eval_set, tmp_path / "w", module.entry_identity()).open_side("database")
    assert int(stale.array(UNREADABLE)[int(np.flatnonzero(stale.index == 9)[0])]) == 1
    writers = run(images, merge=False)  # killed before the merge: rank 1 wrote image 9's shard
    assert [w.extracted for w in writers] == [0, 1]
    again = run(images, merge=True)  # nothing left to extract on either rank
    assert [w.extracted for w in again] == [0, 0]
    fixed = again[0].open_side("database")
    row = int(np.flatnonzero(fixed.index == 9)[0])
    kind = next(k for k in fixed.kinds if k.startswith(module.rerank_prefix))
    want = module.rerank_entries([images[9]])[0][kind[len(module.rerank_prefix):]].numpy()
    np.testing.assert_array_equal(np.asarray(fixed.get(kind, [row])[0]).reshape(want.shape), want)
    assert int(fixed.array(UNREADABLE)[row]) == 0


def test_self_contained_checkpoint_and_inference_api(tmp_path: Path) -> None:
    module = tiny_module()
    images = [Images(3, seed=1)[i]["image"] for i in range(3)]
    scores = module.rerank_scores(images[0], images[1:])
    entries = module.rerank_entries(images[1:])
    assert torch.allclose(module.rerank_scores(images[0], entries), scores)
    expected = (torch.stack([module.embed_image(x) for x in images[1:]]) @ module.embed_image(images[0]))
    assert torch.allclose(scores, expected, atol=1e-5)

    path = tmp_path / "m.ckpt"
    module.save_checkpoint(path)
    restored = RetrievalModule.load_from_checkpoint(path)
    assert type(restored.heads["verifier"]).__name__ == "CosineRerankHead"
    assert restored.rerank == module.rerank and restored.eval_scales == module.eval_scales
    assert torch.equal(restored.rerank_scores(images[0], images[1:]), scores)

    wrong = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=64)})
    with pytest.raises(IncompatibleWeightsError, match="shapes differ.*heads.global.whiten.weight"):
        wrong.load_weights(path)


def test_a_checkpoint_whose_plugin_is_not_installed_names_its_distribution(tmp_path: Path) -> None:
    """"unknown head 'x'; did you mean 'cvnet_verifier'?" misled: the checkpoint says which distribution to install."""
    from retrieval_lightning.checkpoints import PLUGINS_KEY

    path = tmp_path / "m.ckpt"
    tiny_module().save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[PLUGINS_KEY]["gem_arcface"].startswith("retrieval-lightning ")
    checkpoint[ARCHITECTURE_KEY]["heads"]["global"]["class_path"] = "acme_avgpool"
    checkpoint[PLUGINS_KEY] = {"acme_avgpool": "acme-retrieval-heads 0.3.0"}
    torch.save(checkpoint, tmp_path / "plugin.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"plugin.ckpt: head 'global': unknown head 'acme_avgpool'.*"
                                                  r"came from distribution acme-retrieval-heads 0.3.0: install it"):
        RetrievalModule.load_from_checkpoint(tmp_path / "plugin.ckpt")
    # the command line too: `test --ckpt_path` without a model config said "unknown head" of the parser's
    # temporary model-config file (a README review)
    from retrieval_lightning.checkpoint_model import with_checkpoint_model

    with pytest.raises(CheckpointLoadError, match=r"^--ckpt_path \S*plugin.ckpt: head 'global': unknown head "
                                                  r"'acme_avgpool'.*acme-retrieval-heads 0.3.0: install it$"):
        with_checkpoint_model(["test", "--data=minilandmarks"], str(tmp_path / "plugin.ckpt"), [])


def test_a_checkpoint_written_by_another_plugin_version_names_what_does_not_fit(tmp_path: Path) -> None:
    """A head argument the installed plugin does not take (or refuses) is an error naming the
    checkpoint, the head's role and class and the argument, not a bare TypeError."""
    path = tmp_path / "m.ckpt"
    tiny_module().save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[ARCHITECTURE_KEY]["heads"]["global"]["init_args"]["objective"] = "labels"
    torch.save(checkpoint, tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"newer.ckpt: head 'global' \(.*GemArcFace.*takes no argument 'objective'"):
        RetrievalModule.load_from_checkpoint(tmp_path / "newer.ckpt")
    head_args = checkpoint[ARCHITECTURE_KEY]["heads"]["global"]["init_args"]
    head_args.pop("objective")
    margin, head_args["margin"] = head_args["margin"], "no-such-margin"
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointLoadError, match="bad.ckpt: head 'global'.*no-such-margin"):
        RetrievalModule.load_from_checkpoint(tmp_path / "bad.ckpt")
    head_args["margin"] = margin
    checkpoint[ARCHITECTURE_KEY]["module"]["rerank"]["rescore"] = True
    torch.save(checkpoint, tmp_path / "module.ckpt")
    with pytest.raises(CheckpointLoadError, match="module.ckpt: the module's rerank .*RerankConfig.*'rescore'"):
        RetrievalModule.load_from_checkpoint(tmp_path / "module.ckpt")
    del checkpoint[ARCHITECTURE_KEY]["backbone"]  # an edited or cut record: named, not a KeyError
    torch.save(checkpoint, tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointLoadError, match="cut.ckpt: its architecture record has no complete 'backbone'"):
        RetrievalModule.load_from_checkpoint(tmp_path / "cut.ckpt")


def test_training_only_tensors_are_optional_in_both_directions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=16)}, num_classes=7)
    trained.save_checkpoint(tmp_path / "t.ckpt")
    eval_only = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=16)})
    eval_only.load_weights(tmp_path / "t.ckpt")  # classifier dropped, everything else loaded
    x = torch.rand(3, 48, 48)
    assert torch.equal(eval_only.eval().embed_image(x), trained.eval().embed_image(x))
    checkpoint = {"state_dict": dict(trained.state_dict())}
    eval_only.on_load_checkpoint(checkpoint)  # what `test --ckpt_path` does before Lightning's strict load
    eval_only.load_state_dict(checkpoint["state_dict"], strict=True)


def test_a_classifier_over_another_class_count_is_no_obstacle_to_evaluation_but_is_to_a_resumed_fit(
        tmp_path: Path) -> None:
    """``test --data=<another data set> --ckpt_path``: the CLI builds the classifier over the evaluating
    datamodule's classes, which nothing evaluated reads; resuming ``fit`` on other classes is still an error."""
    torch.manual_seed(0)
    trained = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=16)}, num_classes=7)
    trained.save_checkpoint(tmp_path / "t.ckpt")
    other = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=16)}, num_classes=3)
    own_classifier = {k: v.clone() for k, v in other.state_dict().items() if other.is_training_only(k)}
    assert own_classifier
    other.load_weights(tmp_path / "t.ckpt")  # extract / evaluate --ckpt_path
    x = torch.rand(3, 48, 48)
    assert torch.equal(other.eval().embed_image(x), trained.eval().embed_image(x))
    for fn in ("test", "validate", "predict"):
        other._trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        checkpoint = {"state_dict": dict(trained.state_dict())}
        other.on_load_checkpoint(checkpoint)
        other.load_state_dict(checkpoint["state_dict"], strict=True)  # Lightning's strict load
        assert all(torch.equal(other.state_dict()[k], v) for k, v in own_classifier.items())
    other._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(IncompatibleWeightsError,
                       match=r"shapes differ \(heads\.global\..*file \(7, 16\) vs model \(3, 16\)"):
        other.on_load_checkpoint({"state_dict": dict(trained.state_dict())})
    other._trainer = None


def test_a_model_trained_under_one_margin_evaluates_under_a_config_naming_the_other(tmp_path: Path) -> None:
    """CurricularFace's running statistic ``t`` is a training state: a CVNet-Global checkpoint loads into an
    ArcFace config (eval_revisitop.yaml's) and a DELG one into a CurricularFace config, with the same descriptor."""
    torch.manual_seed(0)
    built = {margin: RetrievalModule(Backbone("resnet18", stages=["conv5"]),
                                     {"global": gem_arcface(dim=16, margin=margin, margin_m=0.1)}, num_classes=5)
             for margin in ("curricularface", "arcface")}
    x = torch.rand(3, 48, 48)
    for source, target in (("curricularface", "arcface"), ("arcface", "curricularface")):
        built[source].save_checkpoint(tmp_path / f"{source}.ckpt")
        built[target].load_weights(tmp_path / f"{source}.ckpt")
        assert torch.equal(built[target].eval().embed_image(x), built[source].eval().embed_image(x))
        checkpoint = {"state_dict": dict(built[source].state_dict())}
        built[target].on_load_checkpoint(checkpoint)  # `test --ckpt_path`, then Lightning's strict load
        built[target].load_state_dict(checkpoint["state_dict"], strict=True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        gem_arcface(scale=0.0)


def test_match_names_a_checkpoint_without_a_reranking_head(tmp_path: Path) -> None:
    from PIL import Image

    from retrieval_lightning.errors import user_error_types
    from retrieval_lightning.match import run_match

    RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface()}).save_checkpoint(tmp_path / "g.ckpt")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(image)
    with pytest.raises(UsageError, match=r"g\.ckpt has no re-ranking head \(heads: global\)") as caught:
        run_match([str(image), str(image), "--checkpoint", str(tmp_path / "g.ckpt"), "--out", str(tmp_path / "x.png")])
    assert isinstance(caught.value, user_error_types())  # the CLI prints one error line, no traceback


def test_during_fit_false_keeps_fits_validations_global_only() -> None:
    module = tiny_module()
    for during_fit, fn, reranks in ((True, "fit", True), (False, "fit", False), (False, "validate", True),
                                    (False, "test", True)):
        module.rerank = RerankConfig(k=5, during_fit=during_fit)
        module._trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        assert module._reranks() is reranks, (during_fit, fn)


def test_the_python_api_scales_uint8_runs_in_evaluation_mode_and_refuses_what_is_no_image() -> None:
    """Notebook inputs: torchvision's ``read_image`` gives uint8, which gave NaN descriptors (the mean and std
    cast to uint8, zeros) and scores of a 255-times brighter image; a model left in training mode (as built)
    gave other descriptors and scores and moved its BatchNorm statistics. RGBA or a batch of one failed deep in
    torch."""
    from heads.cvnet_verifier import CVNetVerifierHead

    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=["conv4", "conv5"]),
                             {"global": gem_arcface(dim=16), "verifier": CVNetVerifierHead(width=8)}, eval_scales=[1.0])
    assert module.training
    gen = torch.Generator().manual_seed(1)
    query, other = ((torch.rand(3, 64, 48, generator=gen) * 255).round().to(torch.uint8) for _ in range(2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    embedded = module.embed_image(query)
    scores = module.rerank_scores(query, [query, other])
    explained = module.explain_pair(query, other)
    assert module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    module.eval()
    as_float = [query.float() / 255, other.float() / 255]
    torch.testing.assert_close(embedded, module.embed_image(as_float[0]), rtol=0, atol=0)
    torch.testing.assert_close(module.embed_batch(torch.stack([query, other]))[0], embedded, rtol=0, atol=0)
    torch.testing.assert_close(scores, module.rerank_scores(as_float[0], as_float), rtol=0, atol=0)
    assert explained.score == pytest.approx(float(scores[1]), abs=1e-6)
    for bad, said in ((torch.rand(4, 32, 32), r"image: expected 1 or 3 channels.*\(RGBA\? drop the alpha"),
                      (torch.rand(1, 3, 32, 32), r"image: expected one \(C, H, W\) image.*\(a batch"),
                      (torch.zeros(3, 8, 8, dtype=torch.int64), r"image: dtype torch.int64 is not an image type"),
                      # read_image(p).float(): silently 0.85 from the right descriptor (an image-input review)
                      (query.float(), r"image: values span \[\d+, 255\]; give a float image in \[0, 1\] \(a uint8"),
                      (torch.full((3, 8, 8), float("nan")), r"image: holds NaN or Inf"),
                      (torch.zeros(3, 0, 7), r"image: an empty image, shape \(3, 0, 7\)")):
        with pytest.raises(ValueError, match=said):
            module.embed_image(bad)
        with pytest.raises(ValueError, match=said.replace("image:", "image 1:")):
            module.rerank_scores(as_float[0], [as_float[1], bad])
    with pytest.raises(ValueError, match=r"image 1: expected 1 or 3 channels"):
        module.rerank_scores(as_float[0], [as_float[1], torch.rand(4, 32, 32)])
    module.double()  # a model cast in a notebook failed in a convolution ("Input type ... and bias type ...")
    for call in (lambda: module.embed_image(query), lambda: module.rerank_scores(query, [other]),
                 lambda: module.explain_pair(query, other), lambda: module.embed_batch([query])):
        with pytest.raises(UsageError, match=r"the model's weights are torch.float64.*call model.float\(\)"):
            call()
    module.float()
    torch.testing.assert_close(module.embed_image(query), embedded, rtol=0, atol=0)
    assert module.embed_batch([]).shape == (0, 16)
    # a part the caller put in eval mode stays there (each module's mode is restored, not the model's alone)
    module.train()
    module.heads["verifier"].eval()
    module.rerank_scores(query, [other])
    assert module.training and not any(m.training for m in module.heads["verifier"].modules())
    assert module.heads["global"].training
    # RANSAC's seeds follow the pixels the model reads: a uint8 query and its float copy are one query
    seen: list[list[int]] = []
    score = module.heads["verifier"].score
    module.heads["verifier"].score = lambda q, c, seeds: seen.append(list(seeds)) or score(q, c, seeds)
    module.rerank_scores(query, [other])
    module.rerank_scores(as_float[0], [other])
    assert seen[0] == seen[1]
    del module.heads["verifier"].score
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the speed the fp32 refusal advises: explained as well
        assert 0 <= module.explain_pair(query, other).score <= 1
