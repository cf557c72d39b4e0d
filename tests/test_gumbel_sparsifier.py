"""CVNet-DS sparsifier: selection, relaxations, budget term, sparse codec, and dense parity through
the real CVNet verifier (keep ratio 1.0 reproduces the dense scores)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from heads._sparse import codec
from heads._sparse.fill import fill_dropped, fill_rows
from heads._sparse.masked import masked_pair_logits, plackett_luce_logprob
from heads._sparse.selection import (
    budget_counts, budget_loss, concrete_st_mask, keep_count, spread_topk, temperature, topk_st_mask,
)
from heads.gumbel_sparsifier import GumbelSparsifierHead
from retrieval_lightning.head import EntryKind, VerifierHead
from retrieval_lightning.retrieval.store import FeatureStore

P = 8
REPO = Path(__file__).resolve().parents[1]


def dense_entry(seed: int = 0, shapes=((3, 4), (4, 5), (6, 8))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    entry = {}
    for i, (h, w) in enumerate(shapes):
        entry[f"level{i}"] = torch.randn(h * w, P, generator=g).half()
        entry[f"level{i}_hw"] = torch.tensor([h, w], dtype=torch.int32)
    return entry


def built_head(**kwargs) -> GumbelSparsifierHead:
    head = GumbelSparsifierHead(width=P, hidden=4, **kwargs)
    head.build({"conv4": 16}, 0)
    return head.eval()


def test_keep_count_ratio_and_budget() -> None:
    assert keep_count(100, 0.08) == 8 and keep_count(5, 0.01) == 1 and keep_count(10, 1.0) == 10
    sizes = [768, 1530, 3072]
    counts = budget_counts(sizes, 430)
    assert sum(counts) == 430 and counts[2] > counts[1] > counts[0]
    assert budget_counts([12, 24, 48], 7) == [1, 2, 4]  # shares 1, 2, 4: exact
    assert budget_counts([5, 5, 5], 10) == [4, 3, 3]  # shares 3.33 each: the first level takes the remainder
    assert budget_counts([12, 24, 48], 2) == [1, 1, 1]  # every level keeps one: more than the budget
    assert budget_counts([2, 3], 100) == [2, 3] and budget_counts([0, 4], 2) == [0, 2]
    # a level raised to 1 is paid for by another (the R50 levels with a budget of 3 stored 4), a level held at its
    # size gives to the others: the budget exactly, wherever it is between the levels and the locations
    assert budget_counts([768, 1530, 3072], 3) == [1, 1, 1] and budget_counts([12, 24, 300], 10) == [1, 1, 8]
    assert budget_counts([1, 1, 4], 3) == [1, 1, 1] and budget_counts([2, 40, 40], 60) == [2, 29, 29]
    for budget in range(3, 200):
        assert sum(budget_counts([3, 50, 90], budget)) == min(budget, 143), budget


def test_keep_count_rounds_to_the_nearest_count() -> None:
    """round(keep_ratio * n), not its floor: 2.9 locations keep 3, 2.2 keep 2, 0.4 keep the minimum 1."""
    assert [keep_count(10, r) for r in (0.29, 0.22, 0.04, 0.96)] == [3, 2, 1, 10]
    assert keep_count(3072, 0.1) == 307 and keep_count(1530, 0.1) == 153 and keep_count(768, 0.0999) == 77


@pytest.mark.parametrize("option, message", [
    ({"budget": 0}, "budget must be at least 1"),
    ({"tau_end": 0.0}, "tau_start and tau_end must be > 0"),
    ({"tau_start": -1.0}, "tau_start and tau_end must be > 0"),
    ({"tau_steps": -1}, "tau_steps must be >= 0"),
    ({"hidden": 0}, "hidden must be >= 1"),  # failed at the first forward
    ({"num_levels": 0}, "num_levels must be >= 1"),  # an IndexError in the first step
    ({"budget_weight": -1.0}, "budget_weight must be >= 0"),  # pushed the kept share away from the target
    ({"negatives_per_anchor": -1}, "negatives_per_anchor must be >= 0"),  # a slice: all negatives but the last
])
def test_options_the_relaxation_cannot_run_with_are_refused(option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GumbelSparsifierHead(width=8, **option)


def topk_positions(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the positions of a stable descending sort's first ``k`` (ties: lower position), sorted."""
    order = torch.sort(logits.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def test_topk_is_deterministic_sorted_and_breaks_ties_by_position() -> None:
    """The pick extraction and training make without spread (``spread_topk`` at 0): a stable top-k."""
    logits = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.7])
    for k, want in ((2, [1, 2]), (4, [1, 2, 4, 5])):
        assert topk_positions(logits, k).tolist() == want
        assert spread_topk(logits[None], k, (1, 6), 0.0)[0][0].nonzero().flatten().tolist() == want


def test_sparsify_respects_ratio_and_budget_and_is_deterministic() -> None:
    entry = dense_entry()
    head = built_head(keep_ratio=0.25, value_dtype="float16")
    a, b = head.sparsify([entry])[0], head.sparsify([entry])[0]
    for i, n in enumerate([12, 20, 48]):
        assert len(a[f"level{i}_pos"]) == round(0.25 * n)
        assert torch.equal(a[f"level{i}_pos"], b[f"level{i}_pos"])
        assert (a[f"level{i}_pos"].diff() > 0).all()
    budget = built_head(budget=20, value_dtype="float16").sparsify([entry])[0]
    assert sum(len(budget[f"level{i}_pos"]) for i in range(3)) == 20
    # an untrained head keeps the rows of largest norm (zero-initialised scorer)
    rows = entry["level2"].float()
    assert set(a["level2_pos"].tolist()) == set(torch.topk(rows.norm(dim=1), 12).indices.tolist())


@pytest.mark.parametrize("value_dtype,scale", [("float16", "row"), ("float32", "row"), ("int8", "row"),
                                               ("int8", "image"), ("int4", "row"), ("int4", "image")])
def test_codec_round_trip(value_dtype: str, scale: str, tmp_path) -> None:
    entry = dense_entry(1)
    head = built_head(keep_ratio=0.5, value_dtype=value_dtype, int8_scale=scale, fill_sigma=0.0)  # dropped = zero
    sparse = head.sparsify([entry])[0]
    kinds = head.entry_kinds({"level0": EntryKind("float16", (P,), True), "level0_hw": EntryKind("int32", (2,)),
                              "level1": EntryKind("float16", (P,), True), "level1_hw": EntryKind("int32", (2,)),
                              "level2": EntryKind("float16", (P,), True), "level2_hw": EntryKind("int32", (2,))})
    assert set(kinds) == set(sparse)
    for name, kind in kinds.items():  # entries match their declared kinds
        t = sparse[name]
        assert str(t.dtype).removeprefix("torch.") == kind.dtype, name
        assert tuple(t.shape[1:] if kind.ragged else t.shape) == kind.shape, name
    # through the feature store (as predict_step writes an entry: one tensor per image and kind) and back, bit
    # for bit, at the bytes the codec predicts
    store = FeatureStore.from_arrays(tmp_path / "s", {n: [sparse[n].numpy()] for n in kinds})
    for name in kinds:
        back = store.get(name, [0])[0]
        assert np.array_equal(back, sparse[name].numpy()) and back.dtype == sparse[name].numpy().dtype, name
    rows = {n: len(sparse[n]) for n in kinds if kinds[n].ragged}
    extra = 8 * len(kinds)  # a one-image store holds two int64 offsets per kind, the codec counts one
    assert sum(store.bytes_per_image.values()) == pytest.approx(codec.bytes_per_image(kinds, rows) + extra)
    dense = head.densify([sparse])[0]
    for i in range(3):
        rows, pos = entry[f"level{i}"].float(), sparse[f"level{i}_pos"].long()
        back = dense[f"level{i}"].float()
        assert back.dtype == torch.float32 or dense[f"level{i}"].dtype == torch.float16
        dropped = torch.ones(len(rows), dtype=torch.bool)
        dropped[pos] = False
        assert (back[dropped] == 0).all()
        if value_dtype in ("float16", "float32"):  # the entry is fp16: either float holds it exactly
            assert torch.equal(back[pos], rows[pos])
        else:  # symmetric integers: error at most half a quantisation step (plus the fp16 scale's rounding)
            levels = codec.INT_LEVELS[value_dtype]
            top = rows[pos].abs().amax(dim=1, keepdim=True) if scale == "row" else rows[pos].abs().max()
            err = (back[pos] - rows[pos]).abs()
            assert (err <= 0.51 * top / levels + 1e-3).all()
            assert (err > 0.1 * top / levels).any()  # it did quantise, at this many levels


def test_int4_packing_round_trips_every_code_and_halves_the_bytes() -> None:
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(3, 2)[:, :28]  # (3, 28): every code, both nibbles
    codes[1] = codes[1].flip(0)
    packed = codec.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 14)
    assert torch.equal(codec.unpack_int4(packed), codes)
    assert codec.unpack_int4(codec.pack_int4(codes[:0])).shape == (0, 28)  # a level that kept no row
    assert int(packed[0, 0]) == (-7 + 8) | ((-6 + 8) << 4)  # channel 0 low nibble, channel 1 high
    with pytest.raises(ValueError, match="odd"):
        codec.sparse_kinds("level0", 15, "int4", "row", "int16")
    with pytest.raises(ValueError, match="width 15 must be even"):
        GumbelSparsifierHead(width=15, value_dtype="int4")


def test_int16_positions_overflow_is_refused() -> None:
    with pytest.raises(ValueError, match="int32"):
        codec.encode_level("level0", torch.zeros(40000, 2), torch.arange(3), "float16", "row", "int16")


def r50_bytes(head: GumbelSparsifierHead) -> float:
    """Bytes one database image takes in the store at ``head``'s setting, R50 shapes at 768x1024."""
    dense = {}
    for i in range(3):
        dense[f"level{i}"] = EntryKind("float16", (256,), True)
        dense[f"level{i}_hw"] = EntryKind("int32", (2,))
    return head.stored_bytes(dense, [24 * 32, 34 * 45, 48 * 64])


@pytest.mark.parametrize("source", ["head", "experiments/cvnet_ds_demo.yaml", "experiments/cvnet_ds_r50_gldv2.yaml"])
def test_default_setting_at_r50_shapes_meets_the_goal(source: str) -> None:
    args = {}
    if source != "head":  # the configs' stored form (their width is the verifier's, not R50's)
        config = OmegaConf.load(REPO / source)
        args = {k: v for k, v in config.model.heads.sparsifier.init_args.items()
                if k in ("keep_ratio", "budget", "value_dtype", "int8_scale", "index_dtype")}
    nbytes = r50_bytes(GumbelSparsifierHead(width=256, **args))
    assert nbytes <= 120 * 1024 and 12 * 2**20 / nbytes >= 100


def test_int4_keeps_about_twice_the_locations_of_int8_in_the_same_bytes() -> None:
    int4 = r50_bytes(GumbelSparsifierHead(width=256, keep_ratio=0.15, value_dtype="int4"))
    int8 = r50_bytes(GumbelSparsifierHead(width=256, keep_ratio=0.08, value_dtype="int8"))
    assert int4 <= int8 <= 120 * 1024
    assert int4 / int8 > 0.9  # and not by much less: 15 % at half a byte per value is about 8 % at one


def test_topk_straight_through_is_hard_and_passes_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20, requires_grad=True)
    mask = topk_st_mask(logits, 5, tau=0.5)
    assert torch.equal(mask.detach().sum(1), torch.full((3,), 5.0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    (mask * torch.arange(20.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # without noise it is the deterministic top-k
    plain = topk_st_mask(logits.detach(), 5, tau=0.5, noise=False)
    assert torch.equal(plain[0].nonzero().flatten(), topk_positions(logits[0].detach(), 5))
    # tied k-th and (k+1)-th logits (no noise, or bf16 logits) still keep exactly k, the first positions of the tie
    tied = topk_st_mask(torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.7]]), 2, tau=1.0, noise=False)
    assert tied.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    coarse = topk_st_mask(torch.randn(4, 3072, generator=torch.Generator().manual_seed(1)).bfloat16(), 461, 0.5)
    assert torch.equal(coarse.sum(1), torch.full((4,), 461.0, dtype=torch.bfloat16))


def test_concrete_straight_through_passes_gradients() -> None:
    logits = torch.zeros(2, 50, requires_grad=True)
    mask = concrete_st_mask(logits, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert (logits.grad > 0).all()


def test_budget_loss_pulls_the_kept_fraction_to_the_target() -> None:
    logits = torch.zeros(4, 100, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    before = concrete_st_mask(logits.detach(), 1.0, generator=gen).mean().item()
    for _ in range(200):
        opt.zero_grad()
        budget_loss(logits, 0.1).backward()
        opt.step()
    after = concrete_st_mask(logits.detach(), 1.0, generator=gen).mean().item()
    assert abs(before - 0.5) < 0.1 and abs(after - 0.1) < 0.05
    assert abs(torch.sigmoid(logits).mean().item() - 0.1) < 0.01


@pytest.mark.parametrize("relaxation", ["concrete", "topk"])
def test_the_concrete_budget_grows_as_the_temperature_falls(relaxation: str) -> None:
    """The concrete relaxation's straight-through gradient grows as 1 / tau, so its budget term is
    divided by tau to keep holding the kept share while tau anneals; under top-k (the count is exact)
    the term is not rescaled."""
    module = verifier_module(relaxation=relaxation, tau_start=1.0, tau_end=0.1, tau_steps=10)
    head = module.heads["sparsifier"]
    features = module.backbone(torch.stack(photos(4, seed=5)))
    labels = torch.tensor([0, 0, 1, 1])
    budgets = []
    with torch.no_grad():
        for step in (0, 10):
            head.step.fill_(step)
            budgets.append(head.losses(features, labels)["budget"].item())
    assert budgets[0] > 0
    assert budgets[1] / budgets[0] == pytest.approx(10.0 if relaxation == "concrete" else 1.0, rel=1e-4)


def test_a_level_count_other_than_the_verifiers_is_refused_when_attached() -> None:
    """CVNet has 3 pyramid levels: 1 or 2 offsets were shared by the levels, more were never trained."""
    from heads.cvnet_verifier import CVNetVerifierHead

    verifier = CVNetVerifierHead(stage="conv4", projection="learned", width=P)
    verifier.build({"conv4": 16}, 0)
    for levels in (1, 5):
        head = GumbelSparsifierHead(width=P, hidden=4, num_levels=levels)
        head.build({"conv4": 16}, 0)
        with pytest.raises(ValueError, match=f"num_levels={levels} but the verifier has 3 pyramid levels"):
            head.attach(verifier)


def test_a_verifier_without_projected_levels_is_refused_in_one_line() -> None:
    from retrieval_lightning.errors import UsageError

    class MeanCosine(VerifierHead):  # a third-party verifier: entries and scores, no CVNet internals
        pass

    with pytest.raises(UsageError, match="needs a verifier with project and pair_logits.*MeanCosine has not"):
        GumbelSparsifierHead(width=8).attach(MeanCosine())


def test_temperature_schedule() -> None:
    assert temperature(0, 2.0, 0.5, 100) == pytest.approx(2.0)
    assert temperature(50, 2.0, 0.5, 100) == pytest.approx(1.0)
    assert temperature(500, 2.0, 0.5, 100) == pytest.approx(0.5)


def test_plackett_luce_logprob_matches_enumeration() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    perturbed = torch.tensor([[0.0, 1.0, 3.0, -2.0]])  # order 2, 1, 0, 3
    p = torch.softmax(logits[0], 0)
    expected = torch.log(p[2]) + torch.log(p[1] / (1 - p[2]))
    torch.testing.assert_close(plackett_luce_logprob(logits, perturbed, 2)[0], expected)


# ---------------------------------------------------------------- through the real CVNet verifier
def verifier_module(width: int = 8, verifier_args: dict | None = None, **sparsifier_args):
    """Global + CVNet verifier + sparsifier in one RetrievalModule on a small random ResNet-18."""
    from retrieval_lightning.backbone import Backbone
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.registry import HEADS

    torch.manual_seed(0)
    heads = {
        "global": HEADS.get("gem_arcface")(dim=8),
        "verifier": HEADS.get("cvnet_verifier")(width=width, **(verifier_args or {})),
        "sparsifier": GumbelSparsifierHead(width=width, hidden=4, **({"value_dtype": "float16"} | sparsifier_args)),
    }
    module = RetrievalModule(Backbone("resnet18", weights=None, stages=("conv4", "conv5")), heads, num_classes=4)
    return module.eval()


def photos(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (blurred noise), so the features have structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 24, 32, generator=g)
    return list(F.interpolate(x, size=(96, 128), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("fill_sigma, dtype", [(0.0, "float16"), (1.5, "float16"), (0.0, "float32")])
def test_keep_ratio_one_reproduces_dense_scores_through_the_module(fill_sigma: float, dtype: str) -> None:
    """fp16 values against the verifier's default fp16 entries; fp32 ones against ``entry_dtype: float32``."""
    module = verifier_module(verifier_args={"entry_dtype": dtype}, keep_ratio=1.0, fill_sigma=fill_sigma,
                             value_dtype=dtype)
    verifier, head = module.heads["verifier"], module.heads["sparsifier"]
    assert head.verifier[0] is verifier  # the module attached it
    images = photos(4)
    with torch.no_grad():
        dense_entries = verifier.extract_entries(images, module.features_at)
        dense = verifier.score(dense_entries[0], dense_entries[1:], [1, 2, 3])
        stored = module.rerank_entries(images[1:])  # database side: sparsified
        assert all("level0" not in e and len(e["level2_pos"]) == len(d["level2"]) for e, d in zip(stored, dense_entries[1:]))
        from_images = module.rerank_scores(images[0], images[1:], seeds=[1, 2, 3])
        from_store = module.rerank_scores(images[0], stored, seeds=[1, 2, 3])
        head.keep_ratio = 0.1
        fewer = module.rerank_scores(images[0], module.rerank_entries(images[1:]), seeds=[1, 2, 3])
    torch.testing.assert_close(from_images, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_store, dense, atol=1e-5, rtol=0)
    assert (fewer - dense).abs().max() > 1e-4  # sparsity does reach the verifier


def test_a_querys_entry_holds_no_row_norms_and_dense_entries_keep_them() -> None:
    """The row norms the verifier stores for the sparsifier's selection were in every query's entry too (4 bytes
    per location in every query store; a review of the sparse store): a query is scored dense and nothing reads
    them there. ``dense_entries`` gives the head's own entries with them, what a selection reads."""
    module = verifier_module(keep_ratio=0.5)
    images = photos(2)
    norms = {f"level{i}_norm" for i in range(3)}
    query_kinds = module.rerank_entry_kinds(database=False)
    assert not norms & set(query_kinds) and {"level0", "level0_hw"} <= set(query_kinds)
    query = module.rerank_entries(images[:1], database=False)[0]
    assert set(query) == set(query_kinds)
    dense = module.dense_entries(images)
    assert norms <= set(dense[0]) and torch.equal(dense[0]["level0"], query["level0"])
    stored = module.heads["sparsifier"].sparsify(dense[1:])  # what the selection makes of them: the store's entry
    assert all(torch.equal(a, b) for a, b in zip(stored[0].values(), module.rerank_entries(images[1:])[0].values()))
    with torch.no_grad():
        assert torch.equal(module.rerank_scores(images[0], images[1:]), module.rerank_scores(images[0], stored))


def query_database_and_masks(photo_seed: int, mask_seed: int):
    """The verifier of :func:`verifier_module`, one query's projected levels, two database images' and
    0/1 masks keeping about 30 % of their cells."""
    module = verifier_module()
    verifier = module.heads["verifier"]
    with torch.no_grad():
        levels = verifier.project(module.backbone(torch.stack(photos(3, seed=photo_seed)))["conv4"])
    q, d = [lv[:1] for lv in levels], [lv[1:] for lv in levels]
    g = torch.Generator().manual_seed(mask_seed)
    hard = [(torch.rand(2, *lv.shape[2:], generator=g) < 0.3).float() for lv in d]
    return verifier, q, d, hard


def test_db_masks_weight_normalised_rows() -> None:
    """A 0/1 mask equals zeroed rows; all ones equals no mask; a soft mask has a gradient (it would
    have none if it scaled rows before the verifier's L2 normalisation)."""
    verifier, q, d, hard = query_database_and_masks(photo_seed=2, mask_seed=0)
    with torch.no_grad():
        plain = verifier.pair_logits(q, d)
        ones = verifier.pair_logits(q, d, db_masks=[torch.ones(2, *lv.shape[2:]) for lv in d])
        masked = verifier.pair_logits(q, d, db_masks=hard)
        zeroed = verifier.pair_logits(q, [lv * m.unsqueeze(1) for lv, m in zip(d, hard)])
    torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(masked, zeroed, atol=1e-6, rtol=0)
    assert (masked - plain).abs().max() > 1e-4
    soft = [torch.full((2, *lv.shape[2:]), 0.7, requires_grad=True) for lv in d]
    verifier.pair_logits(q, d, db_masks=soft)[:, 1].sum().backward()
    assert all(m.grad.abs().sum() > 0 for m in soft)
    before = [torch.full((2, *lv.shape[2:]), 0.7, requires_grad=True) for lv in d]
    verifier.pair_logits(q, [lv * m.unsqueeze(1) for lv, m in zip(d, before)])[:, 1].sum().backward()
    assert max(m.grad.abs().max().item() for m in before) < 1e-4 * max(m.grad.abs().max().item() for m in soft)


class MasklessVerifier:
    """A third-party verifier's ``pair_logits``: no ``db_masks`` or ``db_fill`` arguments."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def pair_logits(self, query_levels, db_levels):
        return self.inner.pair_logits(query_levels, db_levels)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_a_verifier_without_mask_arguments_is_masked_alike(sigma: float) -> None:
    """The sparsifier trains with any verifier: for one that takes no masks, dropped rows are zeroed (or
    filled) before the call, which gives the native masked path's logits for 0/1 masks."""
    verifier, q, d, hard = query_database_and_masks(photo_seed=4, mask_seed=1)
    fill = (lambda units, mask: fill_dropped(units, mask, sigma)) if sigma else None
    with torch.no_grad():
        native = masked_pair_logits(verifier, q, d, hard, fill)
        fallback = masked_pair_logits(MasklessVerifier(verifier), q, d, hard, fill)
        unmasked = masked_pair_logits(MasklessVerifier(verifier), q, d, None, fill)
    torch.testing.assert_close(fallback, native, atol=1e-5, rtol=0)
    assert (native - unmasked).abs().max() > 1e-4


@pytest.mark.parametrize("estimator", ["score_function", "straight_through"])
def test_pair_loss_reaches_the_keep_logits(estimator: str) -> None:
    """One training step of the module (backbone, global head and verifier frozen): only the
    sparsifier's keep scores learn, through the verifier's pair loss on mined pairs."""
    module = verifier_module(estimator=estimator)
    module.frozen.update({"backbone", "global", "verifier"})
    module._apply_freeze()
    module.train()
    head = module.heads["sparsifier"]
    assert head.uses_straight_through() == (estimator == "straight_through")
    pairs = torch.tensor([[0, 1, 1], [0, 2, 0], [2, 3, 1], [2, 1, 0]])
    batch = {"image": torch.stack(photos(4, seed=1)), "label": torch.tensor([0, 0, 1, 1]), "pairs": pairs}
    module.log = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grad = head.scorer[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0 and head.norm_weight.grad.abs() > 0
    assert all(p.grad is None for name in ("global", "verifier") for p in module.heads[name].parameters())
    assert int(head.step) == 1
    # without mined pairs the head forms its own in-batch pairs
    losses = head.losses(module.backbone(batch["image"]), batch["label"])
    assert set(losses) >= {"pair_ce", "budget"} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("estimator", ["score_function", "straight_through"])
def test_dense_target_is_the_kl_to_the_dense_verifier(estimator: str) -> None:
    """``target: dense`` fits the masked logits to the dense pair's probabilities: with every
    location kept the loss is exactly the dense distribution's entropy (KL 0, labels ignored);
    with fewer kept it is larger, and it still reaches the keep scores."""
    module = verifier_module(estimator=estimator, target="dense", keep_ratio=1.0, fill_sigma=0.0)
    head, verifier = module.heads["sparsifier"], module.heads["verifier"]
    features = module.backbone(torch.stack(photos(4, seed=1)))
    labels = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        levels = verifier.project(features["conv4"])
        q, d, _ = head.pairs(labels)
        p = verifier.pair_logits([lv[q] for lv in levels], [lv[d] for lv in levels]).softmax(dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    full = head.losses(features, labels)
    assert set(full) >= {"pair_distill", "budget"} and "pair_ce" not in full
    torch.testing.assert_close(full["pair_distill"], entropy, atol=1e-5, rtol=0)
    assert torch.equal(head.losses(features, 1 - labels)["pair_distill"], full["pair_distill"])  # labels unused
    head.keep_ratio = 0.1
    head.train()
    sparse = head.losses(features, labels)
    assert sparse["pair_distill"] > entropy + 1e-4
    (sparse["pair_distill"] + sparse.get("score_function", 0)).backward()
    assert head.scorer[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target"):
        GumbelSparsifierHead(target="teacher")


# ---------------------------------------------------------------- filling dropped locations
def gaussian_average_reference(rows: torch.Tensor, kept: list[int], h: int, w: int, sigma: float) -> torch.Tensor:
    """Each dropped cell: the sum over kept cells of exp(-d^2 / 2 sigma^2) * unit row, normalised."""
    out = rows.clone()
    for j in range(h * w):
        if j in kept:
            continue
        acc = torch.zeros(rows.shape[1], dtype=torch.float64)
        for i in kept:
            d2 = (j // w - i // w) ** 2 + (j % w - i % w) ** 2
            weight = torch.exp(torch.tensor(-d2 / (2 * sigma ** 2), dtype=torch.float64))
            acc += weight * F.normalize(rows[i].double(), dim=0)
        out[j] = (acc / acc.norm()).float()
    return out


def test_fill_is_the_gaussian_average_of_the_kept_rows_in_both_paths() -> None:
    """Scoring (``fill_rows`` on decoded rows) and training (``fill_dropped`` on unit maps with a
    mask) fill a dropped cell alike, as a per-cell loop says; stored rows are left as stored."""
    h, w, sigma = 5, 7, 1.5
    rows = torch.randn(h * w, P, generator=torch.Generator().manual_seed(3))
    kept = [0, 9, 23, 34]
    decoded = torch.zeros_like(rows)
    decoded[kept] = rows[kept]
    expected = gaussian_average_reference(decoded, kept, h, w, sigma)
    scored = fill_rows(decoded, torch.tensor(kept), (h, w), sigma)
    torch.testing.assert_close(scored, expected, atol=1e-6, rtol=0)
    assert torch.equal(scored[kept], rows[kept])
    mask = torch.zeros(h * w)
    mask[kept] = 1
    unit = F.normalize(rows, dim=1).t().reshape(1, P, h, w)
    trained = fill_dropped(unit, mask.reshape(1, h, w), sigma)[0].reshape(P, -1).t()
    torch.testing.assert_close(trained, F.normalize(expected, dim=1), atol=1e-6, rtol=0)
    assert torch.equal(fill_rows(decoded, torch.tensor(kept), (h, w), 0.0), decoded)  # sigma 0: zeros stay


def test_filled_training_logits_equal_the_stored_entries_scores() -> None:
    """The masks the sparsifier trains through and the entries it stores give the verifier the
    same input: hard top-k masks with the fill equal scoring the sparsified, densified entries."""
    module = verifier_module(keep_ratio=0.2, fill_sigma=1.5)
    verifier, head = module.heads["verifier"], module.heads["sparsifier"]
    with torch.no_grad():
        levels = verifier.project(module.backbone(torch.stack(photos(3, seed=4)))["conv4"])
        q, d = [lv[:1] for lv in levels], [lv[1:] for lv in levels]
        entries = [{**{f"level{i}": lv[b].flatten(1).t().contiguous() for i, lv in enumerate(d)},
                    **{f"level{i}_hw": torch.tensor(lv.shape[2:]) for i, lv in enumerate(d)}} for b in range(2)]
        sparse = head.sparsify(entries)
        stored = head.densify(sparse)
        masks = []
        for i, lv in enumerate(d):
            m = torch.zeros(2, lv.shape[2] * lv.shape[3])
            for b in range(2):
                m[b, sparse[b][f"level{i}_pos"].long()] = 1
            masks.append(m.reshape(2, *lv.shape[2:]))
        trained = masked_pair_logits(verifier, q, d, masks, head._fill())
        stored_levels = [torch.stack([s[f"level{i}"].float().t().reshape(lv.shape[1:]) for s in stored])
                         for i, lv in enumerate(d)]
        from_store = verifier.pair_logits(q, stored_levels)
        zero = masked_pair_logits(verifier, q, d, masks)

        class PlainVerifier:  # a third-party verifier without db_masks / db_fill
            pair_logits = staticmethod(lambda ql, dl: verifier.pair_logits(ql, dl))

        plain = masked_pair_logits(PlainVerifier(), q, d, masks, head._fill())
    torch.testing.assert_close(trained, from_store, atol=1e-3, rtol=0)  # stored values are fp16
    torch.testing.assert_close(plain, trained, atol=1e-5, rtol=0)
    assert (zero - trained).abs().max() > 2e-2  # the fill does change what the verifier sees
    mask = [m.clone().requires_grad_() for m in masks]
    masked_pair_logits(verifier, q, d, mask, head._fill())[:, 1].sum().backward()
    assert all(m.grad.abs().sum() > 0 for m in mask)


def test_negative_fill_sigma_is_refused() -> None:
    with pytest.raises(ValueError, match="fill_sigma"):
        GumbelSparsifierHead(fill_sigma=-1.0)


def test_fill_sigma_is_scoring_only_and_left_out_of_the_store_identity() -> None:
    """Changing the fill re-scores an existing store (its rows do not depend on it); changing the
    keep ratio does change what is stored, so it changes the identity."""
    filled = verifier_module(fill_sigma=1.5).entry_identity()
    assert "fill_sigma" not in filled["heads"]["sparsifier"][1]
    assert verifier_module(fill_sigma=0.0).entry_identity() == filled
    assert verifier_module(keep_ratio=0.2).entry_identity() != filled


def test_stores_of_an_earlier_store_revision_are_not_this_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before the selection read true norms (revision 0) has another identity; heads that never
    bumped their revision keep the identities they had."""
    from retrieval_lightning.trainer import extraction_identity

    class Data:
        hparams = {"eval_max_side": 224}

    module = verifier_module()
    current = extraction_identity(module, Data())
    assert current["heads"]["sparsifier"][2] == GumbelSparsifierHead.store_revision == 1
    assert len(current["heads"]["verifier"]) == 2 and len(current["heads"]["global"]) == 2
    monkeypatch.setattr(GumbelSparsifierHead, "store_revision", 0)
    assert extraction_identity(module, Data()) != current


# ---------------------------------------------------------------- pictures of a pair
def test_kept_cells_mark_the_finest_stored_level() -> None:
    head = built_head(keep_ratio=0.25, value_dtype="int4")
    dense = dense_entry(2)
    stored = head.sparsify([dense])[0]
    kept = head.kept_cells(stored)
    assert kept.shape == (6, 8) and kept.dtype == bool
    assert sorted(np.flatnonzero(kept)) == sorted(stored["level2_pos"].long().tolist())
    assert kept.sum() == keep_count(48, 0.25)
    assert head.kept_cells(dense) is None  # a dense entry keeps everything: nothing to mark


def test_match_explains_a_sparse_verifier_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``retrieval-lightning match`` with a verifier + sparsifier checkpoint: the printed score is the
    module's re-ranking score of the stored candidate, and the picture is drawn."""
    from PIL import Image

    from retrieval_lightning.match import read_rgb, run_match
    from retrieval_lightning.pair_picture import MIN_PANEL_HEIGHT

    module = verifier_module(keep_ratio=0.25)
    module.save_checkpoint(tmp_path / "ds.ckpt")
    paths = []
    for k, image in enumerate(photos(2, seed=5)):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    out = tmp_path / "pair.png"
    assert run_match([str(paths[0]), str(paths[1]), "--checkpoint", str(tmp_path / "ds.ckpt"), "--out", str(out)]) == 0
    printed = float(capsys.readouterr().out.split("score: ")[1].split()[0])

    query, cand = (torch.from_numpy(read_rgb(p)).permute(2, 0, 1).float() / 255.0 for p in paths)
    explanation = module.explain_pair(query, cand)
    assert printed == pytest.approx(float(module.rerank_scores(query, [cand])[0]), abs=1e-4)
    assert explanation.score == pytest.approx(printed, abs=1e-4)
    stored = module.rerank_entries([cand])[0]
    assert explanation.candidate_kept.sum() == len(stored["level2_pos"]) < explanation.candidate_kept.size
    with Image.open(out) as picture:
        assert picture.height > MIN_PANEL_HEIGHT and picture.width >= 2 * MIN_PANEL_HEIGHT


def test_evaluate_scores_a_sparse_store_with_the_queries_dense(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate`` of a sparsifier model: the database's entries from the extracted (sparse) store, the
    queries' dense entries extracted once beside it, so the scores are those of ``test``'s path."""
    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.retrieval.rerank import RerankConfig
    from retrieval_lightning.retrieval.rerank_eval import evaluate_reranked, extract_entries
    from retrieval_lightning.retrieval.store_eval import evaluate_store, stored_descriptors, write_query_entries
    from retrieval_lightning.retrieval.writer import ShardWriter, merge_shards

    module = verifier_module(keep_ratio=0.3)
    module.rerank = RerankConfig(k=4, shortlist="plain", fusion="weighted")
    images = photos(9, seed=3)
    items = [{"image": image, "index": i} for i, image in enumerate(images)]
    truth = [{"easy": [0, 1], "hard": [2], "junk": []}, {"easy": [3], "hard": [4, 5], "junk": [6]}]
    eval_set = EvalSet("toy", items, n_queries=2, protocol="revisitop", ground_truth=truth)  # type: ignore[arg-type]
    identity = {"weights": "toy model"}

    # what `extract` writes: predict_step's outputs (every item sparsified, as a database image), merged
    set_dir = tmp_path / "features" / "toy"
    dtypes = {"global": "float16"} | {module.rerank_prefix + k: v.dtype for k, v in module.rerank_entry_kinds().items()}
    shards = ShardWriter(set_dir, identity=identity, dtypes=dtypes)
    for start in (0, 5):
        batch = {"image": torch.stack(images[start:start + 5]), "index": torch.arange(start, min(start + 5, 9))}
        shards.add(module.predict_step(batch, 0))
    shards.close()
    store = merge_shards(set_dir, expect_identity=identity, expected_indices=range(9))
    # the bytes the head predicts without extracting are the store's own (the photos are of one size)
    verifier_kinds = module.heads["verifier"].entry_kinds()
    sizes = [len(module.dense_entries(images[:1])[0][name])
             for name in module.heads["sparsifier"].dense_levels(verifier_kinds)]
    entry_kinds = [k for k in store.kinds if k.startswith(module.rerank_prefix)]
    entry_bytes = sum(store.bytes_per_image[k] for k in entry_kinds) - 8 * len(entry_kinds) / 9  # n + 1 offsets
    assert module.heads["sparsifier"].stored_bytes(verifier_kinds, sizes) == pytest.approx(entry_bytes)

    for part in module.modules():  # as the CLI builds it: training mode (BatchNorm would use batch statistics)
        part.training = True
    result, reranked = evaluate_store(module, eval_set, tmp_path / "features", identity, progress=False)
    assert reranked is not None and module.backbone.training  # its mode given back
    queries = FeatureStore.open(set_dir / "query_entries" / "queries" / "store")
    assert queries.count == 2 and not any(kind.endswith("_pos") for kind in queries.kinds)  # dense, as queried
    assert any(kind.endswith("_pos") for kind in store.kinds)  # the store holds every item sparsified

    # `test`'s path: entries of both sides written apart, the same (fp16-stored) global descriptors
    _, test_queries, test_database = extract_entries(module, eval_set, tmp_path / "test", identity, progress=False)
    descriptors = stored_descriptors(eval_set, store)
    expected = evaluate_reranked(module, eval_set, descriptors, test_queries, test_database, module.rerank,
                                 progress=False)
    assert reranked.metrics == expected.metrics
    for q, (positions, scores) in expected.extra["rerank_scores"].items():
        got_positions, got_scores = reranked.extra["rerank_scores"][q]
        np.testing.assert_array_equal(got_positions, positions)
        np.testing.assert_allclose(got_scores, scores, atol=1e-6, rtol=0)

    # a second evaluation reuses the query entries; those of another store are replaced
    def no_extraction(*args, **kwargs):
        raise AssertionError("query entries extracted again")

    monkeypatch.setattr(module, "rerank_entries", no_extraction)
    _, again = evaluate_store(module, eval_set, tmp_path / "features", identity, progress=False)
    assert again is not None and again.metrics == reranked.metrics
    monkeypatch.undo()
    replaced = write_query_entries(module, eval_set, set_dir / "query_entries", {"weights": "other"}, progress=False)
    assert replaced.identity == {"weights": "other"} and replaced.count == 2

    # under `--trainer.precision bf16-mixed` the queries' entries are extracted in its autocast, as `test`'s are
    in_autocast: list[bool] = []
    entries = module.rerank_entries
    monkeypatch.setattr(module, "rerank_entries", lambda *args, **kwargs: in_autocast.append(
        torch.is_autocast_enabled("cpu")) or entries(*args, **kwargs))
    evaluate_store(module, eval_set, tmp_path / "features", identity, progress=False,
                   forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert in_autocast and all(in_autocast)
    monkeypatch.undo()

    # under DDP rank 0 writes the query entries; when it fails, the other ranks are told instead of waiting
    import retrieval_lightning.retrieval.store_eval as store_eval

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    sent: list[bool] = []
    monkeypatch.setattr(store_eval, "write_query_entries", disk_full)
    with pytest.raises(OSError, match="disk full"):
        evaluate_store(module, eval_set, tmp_path / "features", identity, progress=False, rank=0, world_size=2,
                       broadcast=lambda failed: sent.append(failed) or failed)
    with pytest.raises(RuntimeError, match="writing the queries' entries: rank 0 failed"):
        evaluate_store(module, eval_set, tmp_path / "features", identity, progress=False, rank=1, world_size=2,
                       broadcast=lambda failed: True)
    assert sent == [True]


def test_norm_overlap_watches_how_far_training_moved_the_selection_from_norm() -> None:
    """The scorer starts at top-k by feature norm (overlap 1); a scorer that learnt something else departs.
    The top-k relaxation keeps exactly the target share of cells."""
    module = verifier_module(keep_ratio=0.2)
    head = module.heads["sparsifier"]
    features = module.backbone(torch.stack(photos(4, seed=5)))
    labels = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        head.losses(features, labels)
        watched = head.training_metrics()
        assert watched["norm_overlap"].item() == pytest.approx(1.0)
        sizes = [lv.shape[2] * lv.shape[3] for lv in module.heads["verifier"].project(features["conv4"])]
        assert watched["kept_fraction"].item() == pytest.approx(head.target_fraction(sizes))  # top-k: exactly k
        last = [m for m in head.scorer.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.normal_(0, 5.0, generator=torch.Generator().manual_seed(0))
        head.losses(features, labels)
        moved = head.training_metrics()["norm_overlap"].item()
    assert 0.0 < moved < 0.9


@pytest.mark.parametrize("selection,prior,spread", [("learned", "norm", 0.0), ("learned", "sparsity", 0.0),
                                                   ("norm", "norm", 0.0), ("learned", "norm", 2.0)])
def test_extraction_selects_what_training_selects(selection: str, prior: str, spread: float) -> None:
    """The stored rows are unit vectors: the selection at extraction must see each location's norm before
    normalisation, as ``keep_logits`` does in training on the projected levels. (Without the norms it ranked
    fp16 rounding noise: every unit row's norm is 1 within 2e-4.)"""
    module = verifier_module(keep_ratio=0.2, selection=selection, prior=prior, spread=spread)
    head, verifier = module.heads["sparsifier"], module.heads["verifier"]
    with torch.no_grad():
        for p in head.scorer.parameters():  # a scorer that has learnt something other than norm's order
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        image = photos(1, seed=6)[0]
        stored = module.rerank_entries([image])[0]
        levels = verifier.project(module.features_at(image[None])["conv4"])
    assert not any(name.endswith("_norm") for name in stored)  # read by the selection, not stored
    counts = head._counts([lv.shape[2] * lv.shape[3] for lv in levels])
    for i, (level, k) in enumerate(zip(levels, counts)):
        score = head.keep_logits(level, i)[0] if selection == "learned" else level[0].norm(dim=0).flatten()
        train = head.greedy_masks([score[None]], [tuple(level.shape[2:])])[0][0]  # what training keeps
        assert torch.equal(stored[f"level{i}_pos"].long(), train.nonzero().flatten()), i
        if not spread:
            assert torch.equal(train.nonzero().flatten(), torch.sort(torch.topk(score, k).indices).values), i


def test_an_untrained_scorer_keeps_its_prior_order() -> None:
    """``prior: sparsity`` starts from the peakiest unit rows (smallest L1 norm), ``norm`` from the largest norms."""
    torch.manual_seed(0)
    level = torch.randn(2, 8, 5, 6) * torch.rand(2, 1, 5, 6) * 3
    level[:, :2] += 4 * torch.rand(2, 2, 5, 6)  # some rows peaky, some not
    for prior, score in (("norm", level.norm(dim=1)),
                         ("sparsity", -F.normalize(level, dim=1).abs().sum(dim=1))):
        head = built_head(prior=prior)
        with torch.no_grad():
            logits = head.keep_logits(level, 0)
        assert torch.equal(torch.argsort(logits, dim=1), torch.argsort(score.flatten(1), dim=1)), prior
    level[0, :, 0, 0] = 0  # a zero row (a dropped border cell): ranked last, not first, and no NaN
    with torch.no_grad():
        logits = built_head(prior="sparsity").keep_logits(level, 0)
    assert torch.isfinite(logits).all() and int(logits[0].argmin()) == 0
    with pytest.raises(ValueError, match="prior must be one of"):
        GumbelSparsifierHead(prior="entropy")


def _naive_spread(scores: np.ndarray, k: int, w: int, spread: float) -> list[int]:
    """Greedy spread top-k, one location at a time in plain Python (the reference for ``spread_topk``)."""
    n = len(scores)
    sigma = 0.5 / (k / n) ** 0.5
    scale, left, kept = spread * scores.std(), [float(v) for v in scores], []
    for _ in range(k):
        pick = max((i for i in range(n) if i not in kept), key=lambda i: (left[i], -i))
        kept.append(pick)
        for j in range(n):
            d2 = (j // w - pick // w) ** 2 + (j % w - pick % w) ** 2
            left[j] -= scale * np.exp(-d2 / (2 * sigma * sigma))
    return sorted(kept)


def test_spread_topk_matches_a_plain_loop_and_spreads_a_blob() -> None:
    """A blob of high scores: plain top-k keeps a clump and leaves the rest of the level far from any
    kept cell; spread picks cover it, exactly k of them, as the plain-Python greedy picks."""
    h, w, k = 9, 12, 16
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blob = torch.exp(-((ys - 2.0) ** 2 + (xs - 3.0) ** 2) / 8.0).flatten()
    scores = torch.stack([blob, blob + 0.05 * torch.randn(h * w, generator=torch.Generator().manual_seed(0))])
    plain, _ = spread_topk(scores, k, (h, w), 0.0)
    spread, competing = spread_topk(scores, k, (h, w), 3.0)
    assert torch.equal(plain.sum(1), torch.full((2,), float(k))) and torch.equal(spread.sum(1), plain.sum(1))
    assert torch.equal(plain[0].nonzero().flatten(), topk_positions(blob, k))
    for row in range(2):
        want = _naive_spread(scores[row].double().numpy(), k, w, 3.0)
        assert spread[row].nonzero().flatten().tolist() == want

    def farthest_from_kept(mask: torch.Tensor) -> float:
        cells = torch.stack([ys.flatten(), xs.flatten()], 1).float()
        return torch.cdist(cells, cells[mask.bool()]).min(dim=1).values.max().item()

    assert farthest_from_kept(spread[0]) < 0.5 * farthest_from_kept(plain[0])
    dropped = spread[0] == 0
    assert (competing[0][dropped] < blob[dropped] - 1e-3).any()  # what kept them out: their neighbours' picks
    with pytest.raises(ValueError, match="scores for a"):
        spread_topk(scores, k, (h, w + 1), 1.0)


def test_spread_straight_through_mask_is_the_greedy_pick_and_passes_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6 * 7, requires_grad=True)
    mask = topk_st_mask(logits, 8, tau=0.5, hw=(6, 7), spread=2.0)
    assert torch.equal(mask.detach().sum(1), torch.full((3,), 8.0))
    (mask * torch.arange(42.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    plain = topk_st_mask(logits.detach(), 8, tau=0.5, noise=False, hw=(6, 7), spread=2.0)
    assert torch.equal(plain, spread_topk(logits.detach(), 8, (6, 7), 2.0)[0])
    with pytest.raises(ValueError, match="spread needs the level"):
        topk_st_mask(logits, 8, tau=0.5, spread=2.0)
    with pytest.raises(ValueError, match="spread must be >= 0"):
        GumbelSparsifierHead(spread=-1.0)
    with pytest.raises(ValueError, match="spread needs relaxation 'topk'"):
        GumbelSparsifierHead(spread=1.0, relaxation="concrete")


def test_a_sparsifier_learning_on_a_random_verifier_is_warned_about() -> None:
    """The sparsifier stage fine-tuning its verifier (cvnet_ds_demo.yaml) run without ``init_from``: the
    verifier is random, which fit cannot refuse (training both from scratch is allowed) but says."""
    module = verifier_module()
    module.frozen = {"backbone", "global"}
    with pytest.warns(UserWarning, match="sparsifier trains against a verifier of random weights"):
        module.warn_if_sparsifier_learns_on_a_random_verifier()
    module._loaded_tensors = {f"heads.verifier.{n}" for n in module.heads["verifier"].untrained_tensors()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.warn_if_sparsifier_learns_on_a_random_verifier()  # loaded: nothing to say
