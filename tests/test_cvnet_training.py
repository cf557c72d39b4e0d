"""CVNet verifier training recipe: pair batches with mined hard negatives, Hide-and-Seek, configs."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from datamodules.hide_and_seek import HideAndSeek
from datamodules.pairs import PairBatchSampler, PairCollate, PairMiner, PairSampling
from datamodules.patch_shuffle import shuffle_tiles, step_permutations
from datamodules.sampling import rank_share
from retrieval_lightning.callbacks import hard_negatives
from retrieval_lightning.callbacks.hard_negatives import (HardNegativeMining, mined_examples, nearest_other_label,
                                                          part_rows)
from retrieval_lightning.data.io import ImageLoadError

REPO = Path(__file__).resolve().parents[1]
# 9 labels of 1..6 images (label 8 has one image: never an anchor, still a negative)
LABELS = np.repeat(np.arange(9), [3, 4, 2, 6, 5, 3, 2, 4, 1])


def _groups(batches: list[list[int]], size: int) -> list[list[int]]:
    return [b[i:i + size] for b in batches for i in range(0, len(b), size)]


def _brute_nearest(desc: np.ndarray, labels: np.ndarray, k: int, distinct: bool = True) -> np.ndarray:
    """Independent reference: full argsort per row, skip own label (and repeated labels if ``distinct``)."""
    sims = desc @ desc.T
    out = np.full((len(desc), k), -1)
    for r in range(len(desc)):
        order = sorted(range(len(desc)), key=lambda j: (-sims[r, j], j))
        picked, seen = [], set()
        for j in order:
            if labels[j] != labels[r] and (labels[j] not in seen or not distinct):
                seen.add(labels[j])
                picked.append(j)
        out[r, :min(k, len(picked))] = picked[:k]
    return out


def test_groups_have_same_label_positive_and_other_label_negatives() -> None:
    config = PairSampling(groups_per_batch=3, negatives=3, seed=1)
    sampler = PairBatchSampler(PairMiner(LABELS, config))
    batches = list(sampler)
    assert len(batches) == len(sampler) == LABELS.size // 3
    assert all(len(b) == config.batch_size == 15 for b in batches)
    for anchor, positive, *negatives in _groups(batches, config.group_size):
        assert anchor != positive and LABELS[anchor] == LABELS[positive]
        neg_labels = LABELS[negatives]
        assert (neg_labels != LABELS[anchor]).all() and len(set(neg_labels)) == 3  # distinct labels
        assert LABELS[anchor] != 8  # a single-image label has no positive


def test_same_image_positives_take_their_share_and_leave_the_rest_unchanged() -> None:
    base = _groups(list(PairBatchSampler(PairMiner(LABELS, PairSampling(groups_per_batch=1, negatives=2, seed=3,
                                                                         groups_per_epoch=400)))), 4)
    for share, low, high in ((1.0, 400, 400), (0.3, 80, 160)):
        config = PairSampling(groups_per_batch=1, negatives=2, seed=3, groups_per_epoch=400, same_image_positives=share)
        groups = _groups(list(PairBatchSampler(PairMiner(LABELS, config))), config.group_size)
        same = sum(anchor == positive for anchor, positive, *_ in groups)
        assert low <= same <= high
        assert [g[0] for g in groups] == [g[0] for g in base]  # the same anchors, in the same order
        for anchor, positive, *negatives in groups:
            assert LABELS[positive] == LABELS[anchor] and (LABELS[negatives] != LABELS[anchor]).all()
    with pytest.raises(ValueError, match="same_image_positives"):
        PairSampling(same_image_positives=1.5)
    for option in ("pool_size", "groups_per_epoch", "mining_max_side"):  # at once, not after the pool's embedding
        with pytest.raises(ValueError, match=f"needs {option} >= 1"):
            PairSampling(**{option: 0})


def test_negatives_are_the_mined_nearest_and_change_after_refresh() -> None:
    gen = torch.Generator().manual_seed(0)
    config = PairSampling(groups_per_batch=2, negatives=2)
    miner = PairMiner(LABELS, config)
    sampler = PairBatchSampler(miner)
    before = _groups(list(sampler), config.group_size)  # random negatives: nothing mined yet
    tables = []
    for _ in range(2):  # two "epochs" of a changing global model
        desc = F.normalize(torch.randn(LABELS.size, 8, generator=gen), dim=1)
        table = nearest_other_label(desc, torch.as_tensor(LABELS), k=2, distinct=True, chunk=7).numpy()
        np.testing.assert_array_equal(table, _brute_nearest(desc.numpy(), LABELS, 2))
        miner.set_negatives(0, np.arange(LABELS.size), table)
        groups = _groups(list(sampler), config.group_size)
        for anchor, _, *negatives in groups:
            assert negatives == table[anchor].tolist()  # exactly the nearest other-label images
        tables.append(groups)
    assert [g[2:] for g in tables[0]] != [g[2:] for g in tables[1]] != [g[2:] for g in before]


def test_share_of_mined_negatives_rises_over_the_warmup_batches() -> None:
    config = PairSampling(groups_per_batch=2, negatives=4, groups_per_epoch=400, hard_start=0.0,
                          hard_warmup_batches=100, seed=0)
    miner = PairMiner(LABELS, config)
    table = np.stack([np.flatnonzero(LABELS != LABELS[a])[:4] for a in range(LABELS.size)])  # a fixed "mined" table
    miner.set_negatives(0, np.arange(LABELS.size), table)
    groups = _groups(list(PairBatchSampler(miner)), config.group_size)  # 200 batches of 2 groups
    mined = np.array([np.isin(g[2:], table[g[0]]).mean() for g in groups]).reshape(200, 2).mean(axis=1)  # per batch
    halves = [mined[:50].mean(), mined[50:100].mean(), mined[100:].mean()]  # shares 0-0.5, 0.5-1, 1
    assert 0.15 < halves[0] < 0.4 and 0.6 < halves[1] < 0.9 and halves[2] == 1.0, halves  # means 0.25, 0.75, 1
    assert config.hard_share(0) == 0.0 and config.hard_share(50) == 0.5 and config.hard_share(100) == 1.0
    with pytest.raises(ValueError, match="hard_start"):
        PairSampling(hard_start=1.5)


def test_mined_share_counts_the_batches_an_epoch_really_takes() -> None:
    """Under ``limit_train_batches`` an epoch takes fewer batches than the sampler holds; the curriculum
    counts those (as Hide-and-Seek counts steps), or epoch 1 would start with the share of batch ``len``."""
    config = PairSampling(groups_per_batch=2, negatives=2, groups_per_epoch=40, hard_start=0.0,
                          hard_warmup_batches=8, seed=0)
    miner = PairMiner(LABELS, config)
    miner.set_negatives(0, np.arange(LABELS.size), np.stack([np.flatnonzero(LABELS != LABELS[a])[:2]
                                                              for a in range(LABELS.size)]))
    sampler = PairBatchSampler(miner)
    shares: list[float] = []
    miner.group = lambda anchor, rng, hard_share=1.0: shares.append(hard_share) or [anchor, anchor, 0, 0]
    sampler.epoch_groups(1)
    assert shares[0] == 1.0  # the sampler's 20 batches per epoch: epoch 1 starts past the warm-up
    shares.clear()
    miner.epoch_batches = lambda: 2  # what the trainer runs with limit_train_batches=2
    sampler.epoch_groups(1)
    assert shares[0] == pytest.approx(2 / 8) and shares[-1] == pytest.approx(min(1.0, (2 + 19) / 8))
    shares.clear()
    miner.epoch_batches = lambda: None  # not known yet (before the trainer sized the loader): every batch
    sampler.epoch_groups(1)
    assert shares[0] == 1.0


@pytest.fixture(params=["one block", "blocks of 7"])
def column_blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search over all columns at once, and over blocks of 7 columns merged (a large pool's search, whose
    descriptors stay on the host)."""
    if request.param == "blocks of 7":
        monkeypatch.setattr(hard_negatives, "COLUMN_BLOCK", 7)
        monkeypatch.setattr(hard_negatives, "RESIDENT_BYTES", 0)


@pytest.mark.usefixtures("column_blocks")
def test_nearest_other_label_looks_past_a_crowded_label() -> None:
    """Row 0's 28 nearest rows all carry label 1: the distinct search must look further for 2 and 3."""
    labels = np.array([0] + [1] * 30 + [2, 3])
    desc = torch.zeros(33, 3)
    desc[:, 0] = torch.tensor([1.0] + [0.99 - 0.001 * i for i in range(30)] + [0.2, 0.3])
    desc[:, 1] = 0.1
    desc = F.normalize(desc, dim=1)
    table = nearest_other_label(desc, torch.as_tensor(labels), k=3, distinct=True, chunk=5)
    np.testing.assert_array_equal(table.numpy(), _brute_nearest(desc.numpy(), labels, 3))
    assert table[0].tolist() == [1, 32, 31]


def test_rows_of_a_crowded_label_look_further_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row short of k labels searched the whole pool alone (0.46 s per row at 1.3M images; a review at GLDv2
    scale): they now look 16x further together, pass after pass, with the same table as a brute-force search."""
    generator = torch.Generator().manual_seed(1)
    labels = np.array([7] * 40 + list(range(40)))  # 40 near-duplicates of one landmark, then 40 other landmarks
    desc = torch.randn(80, 6, generator=generator)
    desc[:40] = desc[0] + 0.01 * torch.randn(40, 6, generator=generator)
    desc = F.normalize(desc, dim=1)
    calls: list[int] = []
    search = hard_negatives._nearest_columns

    def counted(queries, *args):
        calls.append(len(queries))
        return search(queries, *args)

    monkeypatch.setattr(hard_negatives, "_nearest_columns", counted)
    monkeypatch.setattr(hard_negatives, "WIDEN", 2)
    table = nearest_other_label(desc, torch.as_tensor(labels), k=4, distinct=True, chunk=64)
    np.testing.assert_array_equal(table.numpy(), _brute_nearest(desc.numpy(), labels, 4))
    assert calls[0] == 64 and len(calls) <= 6 and max(calls[1:]) > 1  # was one search per crowded row


@pytest.mark.usefixtures("column_blocks")
@pytest.mark.parametrize("distinct", [False, True])
def test_nearest_other_label_breaks_ties_by_the_lower_row_on_every_device(distinct: bool) -> None:
    """Many equal similarities (duplicate images, a few distinct descriptors): ``topk`` alone picks
    among values tied at the k-th place as it likes; the table must still be the lowest rows."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (60,), generator=generator).numpy()
    # small whole numbers: every product is exact, so ties are ties however a matrix product sums (the
    # products of a block of 7 columns and of all 60 differ in their last bits for unit-norm rows)
    desc = torch.randint(0, 3, (60, 4), generator=generator).float()
    table = nearest_other_label(desc, torch.as_tensor(labels), k=4, distinct=distinct, chunk=16)
    np.testing.assert_array_equal(table.numpy(), _brute_nearest(desc.numpy(), labels, 4, distinct))
    same = nearest_other_label(torch.ones(40, 4), torch.arange(40), k=3, distinct=distinct)
    assert same[:3].tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3]]
    for world in (2, 3):  # ranks' shares of the rows (chunks of 16) assemble to the one-process table
        rows = [part_rows(60, 16, rank, world) for rank in range(world)]
        assert sorted(torch.cat(rows).tolist()) == list(range(60))
        assembled = torch.full_like(table, -2)
        for rank, own in enumerate(rows):
            part = nearest_other_label(desc, torch.as_tensor(labels), k=4, distinct=distinct, chunk=16,
                                       part=(rank, world))
            assert bool((part[own] == table[own]).all()) and bool((part[own] >= 0).any())
            assembled[own] = part[own]
        assert torch.equal(assembled, table)


def test_pair_labels_follow_the_images_loaded_not_the_slots() -> None:
    """With ``on_error: skip`` an unreadable image is replaced by the next readable one: a positive slot
    can then hold another landmark ("different") and a negative slot the anchor's ("same"); a
    patch-shuffled mosaic of the anchor stays "different"."""
    def items(labels: list[int]) -> list[dict]:
        return [{"image": torch.zeros(3, 4, 4), "label": lab, "index": i} for i, lab in enumerate(labels)]

    batch = PairCollate(4)(items([5, 5, 7, 8]) + items([3, 9, 4, 3]))  # second group: positive and a negative swapped
    assert batch["pairs"].tolist() == [[0, 1, 1], [0, 2, 0], [0, 3, 0], [4, 5, 0], [4, 6, 0], [4, 7, 1]]
    shuffled = PairCollate(4, shuffled=1)(items([5, 5, 7, 5]))
    assert shuffled["pairs"].tolist() == [[0, 1, 1], [0, 2, 0], [0, 3, 0]]


def test_candidates_pool_and_positions_mapping() -> None:
    config = PairSampling(groups_per_batch=1, negatives=2, candidates=4, pool_size=20, distinct_labels=False)
    miner = PairMiner(LABELS, config)
    pools = [miner.pool(e) for e in range(3)]
    assert all(p.size == 20 and len(set(p)) == 20 for p in pools) and not np.array_equal(pools[0], pools[1])
    table = np.stack([(np.arange(4) + 5 * p) % LABELS.size for p in pools[1]])
    miner.set_negatives(1, pools[1], table)
    sampler = PairBatchSampler(miner)
    sampler.set_epoch(1)
    for anchor, _, *negatives in _groups(list(sampler), config.group_size):
        assert anchor in pools[1]
        row = table[np.searchsorted(pools[1], anchor)].tolist()
        assert negatives == [x for x in row if x in negatives] and set(negatives) <= set(row)


def test_epochs_between_minings_draw_anchors_the_mined_table_covers() -> None:
    """``every_n_epochs`` > 1 with a pool: epoch 1 (no mining) takes its anchors from epoch 0's mined
    pool, so every group has mined negatives rather than random ones; a run resumed in epoch 1
    mines epoch 0's table again, and one resumed in a due epoch mines that epoch."""
    config = PairSampling(groups_per_batch=1, negatives=2, candidates=4, pool_size=20, distinct_labels=False)
    miner = PairMiner(LABELS, config)
    pool = miner.pool(0)
    table = np.stack([(np.arange(4) + 5 * p) % LABELS.size for p in pool])
    miner.set_negatives(0, pool, table)
    sampler = PairBatchSampler(miner)
    sampler.set_epoch(1)
    anchors = [g[0] for g in _groups(list(sampler), config.group_size)]
    assert anchors and all(miner.mined_negatives(a) is not None for a in anchors)

    callback = HardNegativeMining(every_n_epochs=3, first_epoch=1)
    assert [callback.table_epoch(e) for e in range(8)] == [None, 1, 1, 1, 4, 4, 4, 7]
    mined: list[int] = []
    callback.mine = lambda trainer, module, m, epoch: (mined.append(epoch), m.set_negatives(epoch, pool, table))
    fresh = PairMiner(LABELS, config)
    for epoch in (0, 2, 3, 4, 5):
        callback.mine_if_due(None, None, fresh, epoch)
    assert mined == [1, 4]


def test_ranks_disjoint_and_deterministic_per_epoch_through_lightning_injection() -> None:
    """Lightning re-instantiates a BatchSampler subclass with a DistributedSampler under DDP."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from lightning.fabric.utilities.data import _replace_dunder_methods

    from datamodules.pairs import PairLoader

    config = PairSampling(groups_per_batch=2, negatives=1, seed=4)
    miner = PairMiner(LABELS, config)
    dataset = list(range(LABELS.size))
    per_rank = []
    for rank in range(2):
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = PairLoader(dataset, batch_sampler=PairBatchSampler(miner))
        dist = DistributedSampler(dataset, num_replicas=2, rank=rank)
        loader = _update_dataloader(loader, dist)
        assert isinstance(loader, PairLoader) and isinstance(loader.batch_sampler, PairBatchSampler)
        assert loader.batch_sampler.miner is miner
        epochs = []
        for epoch in (3, 3, 4):
            loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning's _set_sampler_epoch reaches
            epochs.append([b.tolist() for b in loader])
        assert epochs[0] == epochs[1] and epochs[0] != epochs[2]
        per_rank.append(_groups(epochs[0], config.group_size))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    anchors = [{g[0] for g in groups} for groups in per_rank]
    assert anchors[0].isdisjoint(anchors[1])
    reference = PairBatchSampler(miner).epoch_groups(3)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(reference[: 2 * len(per_rank[0])])


class _TinyModule(torch.nn.Module):
    """What the callback touches of a RetrievalModule: backbone, global_head.embed/dim, device."""

    def __init__(self, proj: torch.Tensor) -> None:
        super().__init__()
        self.proj = proj
        self.backbone = lambda x: {"conv5": x.mean(dim=(2, 3))}
        self.global_head = SimpleNamespace(dim=proj.shape[1], embed=lambda f: F.normalize(f["conv5"] @ self.proj, dim=1))
        self.device = torch.device("cpu")


def test_callback_mines_pool_from_descriptors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    colours = torch.rand(LABELS.size, 3, generator=gen)
    config = PairSampling(groups_per_batch=2, negatives=2)
    dataset = [{"image": colours[i].view(3, 1, 1).expand(3, 6, 5).clone(), "index": i} for i in range(LABELS.size)]
    miner = PairMiner(LABELS, config, make_dataset=lambda pos: [dict(dataset[p], index=r) for r, p in enumerate(pos)])
    module = _TinyModule(torch.randn(3, 4, generator=gen))
    trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=2, datamodule=SimpleNamespace(pair_miner=miner),
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), default_root_dir=tmp_path)
    callback = HardNegativeMining(first_epoch=1, every_n_epochs=1, batch_size=4, picture_anchors=3, picture_negatives=2)
    callback.on_fit_start(trainer, module)  # registers the request the sampler makes per epoch
    sampler = PairBatchSampler(miner)
    first = list(sampler)  # epoch 0: before first_epoch, random negatives
    assert miner.mined_epoch is None
    sampler.set_epoch(2)
    before = torch.get_rng_state()
    groups = _groups(list(sampler), config.group_size)
    assert miner.mined_epoch == 2
    assert torch.equal(torch.get_rng_state(), before)  # mining draws nothing from the global generator
    desc = F.normalize(colours @ module.proj, dim=1).numpy()
    expected = _brute_nearest(desc, LABELS, 2)
    for anchor, _, *negatives in groups:
        assert negatives == expected[anchor].tolist()
    assert first != list(PairBatchSampler(miner))  # the same epoch 0 now draws mined negatives
    # the picture of the mining: one PNG per mined epoch, of anchors spread over the pool
    assert callback.pictures == [tmp_path / "mining" / "epoch002.png"] and callback.pictures[0].stat().st_size > 0
    table = np.stack([expected[p] for p in range(LABELS.size)])
    examples = mined_examples(table, torch.from_numpy(desc), 3, 2)
    assert LABELS.size == 30 and [a for a, _ in examples] == [0, 14, 29]  # first, middle (14.5, to even), last
    for a, negs in examples:
        assert [j for j, _ in negs] == expected[a].tolist()
        for j, cos in negs:
            assert cos == pytest.approx(float(desc[a] @ desc[j]), abs=1e-6)


class _MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"conv5": x.mean(dim=(2, 3))}


class _Projection(torch.nn.Module):
    def __init__(self, proj: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Parameter(proj)
        self.dim = proj.shape[1]

    def embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        self.autocast = torch.is_autocast_enabled("cpu")
        return F.normalize(features["conv5"] @ self.proj, dim=1)


class _ColourPool:
    """A pool of one-colour images whose global descriptor is a projection of the colour, and a counting
    mining callback over it."""

    def __init__(self, root: Path | None = None) -> None:
        gen = torch.Generator().manual_seed(2)
        self.colours = torch.rand(LABELS.size, 3, generator=gen)
        self.dataset = [{"image": colour.view(3, 1, 1).expand(3, 4, 4).clone(), "index": i}
                        for i, colour in enumerate(self.colours)]
        self.module = torch.nn.Module()
        self.module.backbone, self.module.global_head = _MeanColour(), _Projection(torch.randn(3, 4, generator=gen))
        self.module.device = torch.device("cpu")
        self.trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=None, default_root_dir=root,
                                       strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
        self.embedded: list[int] = []

    def miner(self, pool_size: int | None = None, identity: str | None = None) -> PairMiner:
        return PairMiner(LABELS, PairSampling(groups_per_batch=2, negatives=2, pool_size=pool_size),
                         make_dataset=lambda pos: [dict(self.dataset[p], index=r) for r, p in enumerate(pos)],
                         identity=identity)

    def callback(self) -> HardNegativeMining:
        callback = HardNegativeMining(batch_size=4, picture_anchors=0)
        embed_pool = callback.embed_pool
        callback.embed_pool = lambda *a, **k: (self.embedded.append(1), embed_pool(*a, **k))[1]
        return callback

    def nearest(self) -> np.ndarray:
        desc = F.normalize(self.colours @ self.module.global_head.proj.detach(), dim=1).numpy()
        return _brute_nearest(desc, LABELS, 2)


def _table(miner: PairMiner) -> np.ndarray:
    return np.stack([miner.mined_negatives(p) for p in range(LABELS.size)])


def test_callback_keeps_the_table_while_the_global_model_and_pool_are_unchanged() -> None:
    """A frozen global model over the whole set (CVNet's verifier stage): the pool is embedded once, later
    epochs keep its table; a changed weight or another pool (``pool_size``) is mined again."""
    pool = _ColourPool()
    module, trainer, embedded, callback = pool.module, pool.trainer, pool.embedded, pool.callback()
    make_miner, table = pool.miner, _table
    miner = make_miner(None)
    for epoch in range(3):
        callback.mine(trainer, module, miner, epoch)
    assert len(embedded) == 1 and miner.mined_epoch == 2
    np.testing.assert_array_equal(table(miner), pool.nearest())
    with torch.no_grad():
        module.global_head.proj[0, 0] += 0.5  # one weight moved: mined again, from the new descriptors
    callback.mine(trainer, module, miner, 3)
    assert len(embedded) == 2
    np.testing.assert_array_equal(table(miner), pool.nearest())
    callback.mine(trainer, module, make_miner(None, identity="other images"), 4)  # other images, same labels
    assert len(embedded) == 3
    subset = make_miner(12)
    for epoch in range(2):  # a pool redrawn per epoch is mined every epoch
        callback.mine(trainer, module, subset, epoch)
    assert len(embedded) == 5
    callback.teardown(trainer, module, "fit")
    callback.mine(trainer, module, subset, 1)  # a new fit mines its first table
    assert len(embedded) == 6 and not module.global_head.autocast
    # under `precision: bf16-mixed` the pool is embedded in the trainer's autocast, as validation is
    trainer.precision_plugin = SimpleNamespace(forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    callback.mine(trainer, module, subset, 2)
    assert len(embedded) == 7 and module.global_head.autocast


def test_a_resumed_run_loads_the_table_its_first_run_saved(tmp_path: Path) -> None:
    """The table is saved under its key: a new process (a fresh callback) with the same global model, pool and
    images loads it instead of embedding the pool; a damaged file, other weights or other images are mined."""
    pool = _ColourPool(tmp_path)
    first = pool.callback()
    first.mine(pool.trainer, pool.module, pool.miner(identity="v1"), 0)
    saved = sorted((tmp_path / "mining").glob("table-*.npy"))
    assert len(pool.embedded) == 1 and len(saved) == 1
    resumed = pool.miner(identity="v1")
    pool.callback().mine(pool.trainer, pool.module, resumed, 4)
    assert len(pool.embedded) == 1 and resumed.mined_epoch == 4
    np.testing.assert_array_equal(_table(resumed), pool.nearest())

    saved[0].write_bytes(saved[0].read_bytes()[:100])  # a file cut short (a full disk, a copy interrupted)
    with pytest.warns(UserWarning, match=r"table-.*\.npy cannot be used .*mining again"):
        pool.callback().mine(pool.trainer, pool.module, pool.miner(identity="v1"), 4)
    assert len(pool.embedded) == 2
    pool.callback().mine(pool.trainer, pool.module, pool.miner(identity="v2"), 4)  # other images
    assert len(pool.embedded) == 3
    with torch.no_grad():
        pool.module.global_head.proj[1, 1] -= 0.5
    other = pool.miner(identity="v2")
    pool.callback().mine(pool.trainer, pool.module, other, 4)
    assert len(pool.embedded) == 4
    np.testing.assert_array_equal(_table(other), pool.nearest())
    assert len(list((tmp_path / "mining").glob("*"))) == 1  # only the latest table stays

    anonymous = _ColourPool(tmp_path / "anonymous")  # a miner that does not name its images: nothing saved
    anonymous.callback().mine(anonymous.trainer, anonymous.module, anonymous.miner(), 0)
    assert not (tmp_path / "anonymous").exists()


def test_an_image_that_fails_while_the_pool_is_embedded_stops_the_mining_with_its_error() -> None:
    """Its own error (on every rank under DDP, where the others would have waited at the gather)."""
    pool = _ColourPool()
    miner = pool.miner()

    def unreadable(positions: np.ndarray) -> list[dict]:
        raise ImageLoadError("/data/train/0/0/0/000abc.jpg: cannot identify image file")

    miner._make_dataset = unreadable
    with pytest.raises(ImageLoadError, match="000abc.jpg"):
        pool.callback().mine(pool.trainer, pool.module, miner, 0)
    assert pool.module.training  # the module's mode is restored


def test_pair_batches_without_a_mining_callback_warn_once() -> None:
    """``sampling: pairs`` without ``HardNegativeMining`` trained on random negatives without a word."""
    import warnings

    config = PairSampling(groups_per_batch=2, negatives=1, seed=0)
    sampler = PairBatchSampler(PairMiner(LABELS, config))
    with pytest.warns(UserWarning, match="random negatives only.*HardNegativeMining"):
        list(sampler)
    mined = PairMiner(LABELS, config)
    mined.request = lambda epoch: None  # what the callback registers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.set_epoch(1)
        list(sampler)  # once per run
        list(PairBatchSampler(mined))


def test_pair_loader_resumes_mid_epoch() -> None:
    from datamodules.pairs import PairLoader

    config = PairSampling(groups_per_batch=2, negatives=1, seed=2)
    miner = PairMiner(LABELS, config)
    dataset = [{"image": torch.zeros(1), "label": int(lab)} for lab in LABELS]
    make = lambda: PairLoader(dataset, batch_sampler=PairBatchSampler(miner), collate_fn=PairCollate(3))
    loader = make()
    loader.batch_sampler.set_epoch(5)
    full = [b["label"].tolist() for b in loader]
    it = iter(loader)
    seen = [next(it)["label"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 5, "batches": 3} and seen == full[:3]
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)  # created before the epoch is set, as Lightning does on resume
    resumed.batch_sampler.set_epoch(5)
    assert [b["label"].tolist() for b in it] == full[3:]
    assert [b["label"].tolist() for b in resumed] == full  # the next pass is whole again


def test_pair_items_carry_seeds_that_resume_with_the_batches() -> None:
    """GLDv2's pair stages without a crop pool: each place of an epoch carries its own augmentation seed, so
    a crop depends on (seed, epoch, place), not on a loader worker's random state, which a resumed run restarts."""
    from datamodules.pairs import PairLoader

    config = PairSampling(groups_per_batch=2, negatives=1, seed=2)
    miner = PairMiner(LABELS, config)
    plain = PairBatchSampler(miner)
    plain.set_epoch(4)
    make = lambda: PairLoader(SeededItems(), batch_sampler=PairBatchSampler(miner, augmentation_seeds=True),
                              collate_fn=lambda items: items)
    loader = make()
    loader.batch_sampler.set_epoch(4)
    full = list(loader)
    assert [[p for p, _ in batch] for batch in full] == list(plain)  # the same groups as without seeds
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every place its own seed, also a same-image positive's
    it = iter(loader)
    [next(it) for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    it = iter(resumed)
    resumed.batch_sampler.set_epoch(4)
    assert list(it) == full[2:]  # the resumed batches draw the uninterrupted run's crops
    loader.batch_sampler.set_epoch(5)
    assert [s for batch in loader for _, s in batch] != seeds  # another epoch, other crops


class SeededItems:
    """A dataset that returns the (position, seed) item it is given."""

    def __len__(self) -> int:
        return LABELS.size

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int]:
        assert isinstance(item, tuple), item
        return item


def test_hide_and_seek_schedule_and_hidden_fraction() -> None:
    has = HideAndSeek(start=0.1, end=0.5, warmup_steps=100, delay_steps=20, grid=4)
    assert [has.share(s) for s in (0, 19, 20, 70, 120, 10_000)] == pytest.approx([0, 0, 0.1, 0.3, 0.5, 0.5])
    images = torch.rand(400, 3, 30, 26)
    assert has.apply(images, step=5) is images
    for step, share in ((70, 0.3), (500, 0.5)):
        out = has.apply(images, step)
        hidden = (out != images).any(dim=1)  # pixels changed by hiding
        fill = torch.tensor(has.fill).view(1, 3, 1, 1)
        assert torch.equal(out[:, :, :, :][hidden[:, None].expand_as(out)],
                           fill.expand_as(out)[hidden[:, None].expand_as(out)])
        assert float(hidden.float().mean()) == pytest.approx(share, abs=0.03)
        mask = has.masks(400, 30, 26, step)
        per_cell = mask[:, [0, 8, 15, 23], :][:, :, [0, 7, 13, 20]]  # one pixel in each of the 4x4 cells
        assert torch.equal(mask.float().mean(dim=(1, 2)) > 0, per_cell.flatten(1).any(dim=1))
        assert torch.equal(has.apply(images, step), out)  # deterministic per step
    assert not torch.equal(has.masks(8, 30, 26, 500), has.masks(8, 30, 26, 501))


def test_crops_per_image_draws_from_a_fixed_pool_and_keeps_the_groups() -> None:
    plain = PairSampling(groups_per_batch=2, negatives=2, seed=5, same_image_positives=0.5, shuffled_negatives=1)
    pooled = PairSampling(groups_per_batch=2, negatives=2, seed=5, same_image_positives=0.5, shuffled_negatives=1,
                          crops_per_image=3)
    seeds: dict[int, set[int]] = {}
    for epoch in range(6):
        reference = PairBatchSampler(PairMiner(LABELS, plain))
        reference.set_epoch(epoch)
        sampler = PairBatchSampler(PairMiner(LABELS, pooled))
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [[p for p, _ in b] for b in batches] == list(reference)  # same positions, own random stream
        for anchor, positive, *_ in _groups(batches, pooled.group_size):
            if anchor[0] == positive[0]:
                assert anchor[1] != positive[1]  # a same-image positive is another crop of the pool
        for batch in batches:
            for position, seed in batch:
                seeds.setdefault(position, set()).add(seed)
    assert max(len(s) for s in seeds.values()) == 3  # each image: at most its pool, and the pool is used
    all_seeds = [x for s in seeds.values() for x in s]
    assert len(set(all_seeds)) == len(all_seeds)  # no two images share a crop seed
    again = PairBatchSampler(PairMiner(LABELS, pooled))
    again.set_epoch(5)
    assert list(again) == batches
    for bad in (1, 1010):
        with pytest.raises(ValueError, match="crops_per_image"):
            PairSampling(crops_per_image=bad)


def test_gldv2_pair_mode_and_batch_transform(tmp_path: Path) -> None:
    from PIL import Image

    from datamodules.gldv2 import GLDv2DataModule, image_path

    rows = []
    for i, label in enumerate(LABELS):
        image_id = f"{i:016x}"
        path = image_path(str(tmp_path), "train", image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (20, 16), (20 * int(label), 40, 9 * i)).save(path)
        rows.append((image_id, int(label)))
    (tmp_path / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{i},u,{lab}\n" for i, lab in rows))
    has = HideAndSeek(start=1.0, end=1.0, warmup_steps=0)
    dm = GLDv2DataModule(root=str(tmp_path), train_set="full", sampling="pairs", validation_split=0.0,
                         val_sets=[], test_sets=[], image_size=16, num_workers=0, hide_and_seek=has,
                         pairs=PairSampling(groups_per_batch=2, negatives=2, mining_max_side=12))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16)
    labels = batch["label"].view(2, 4)
    assert (labels[:, 0] == labels[:, 1]).all() and (labels[:, 2:] != labels[:, :1]).all()
    assert batch["pairs"].tolist() == [[0, 1, 1], [0, 2, 0], [0, 3, 0], [4, 5, 1], [4, 6, 0], [4, 7, 0]]
    same = batch["label"][batch["pairs"][:, 0]] == batch["label"][batch["pairs"][:, 1]]
    assert torch.equal(same.long(), batch["pairs"][:, 2])
    with pytest.raises(ValueError, match="groups of 4"):
        PairCollate(4).pairs(6)
    pool = dm.pair_miner.pool_dataset(np.array([3, 5]))
    assert pool[1]["index"] == 1 and max(pool[1]["image"].shape[1:]) == 12
    hidden = dm.train_batch_transform(batch, step=0)["image"]
    assert torch.allclose(hidden, torch.tensor(has.fill).view(1, 3, 1, 1).expand_as(hidden))
    pooled = GLDv2DataModule(root=str(tmp_path), train_set="full", sampling="pairs", validation_split=0.0,
                             val_sets=[], test_sets=[], image_size=16, num_workers=0,
                             pairs=PairSampling(groups_per_batch=2, negatives=2, mining_max_side=12, crops_per_image=4))
    pooled_batch = next(iter(pooled.train_dataloader()))  # (position, crop seed) items load through the dataset
    assert torch.equal(pooled_batch["label"], batch["label"]) and pooled_batch["image"].shape == (8, 3, 16, 16)
    dm.trainer = SimpleNamespace(num_training_batches=3)  # the curriculum's batches per epoch come from the trainer
    assert dm.pair_miner.epoch_batches() == 3
    dm.trainer = SimpleNamespace(num_training_batches=float("inf"))  # not sized yet
    assert dm.pair_miner.epoch_batches() is None
    dm.trainer = None
    # more groups per batch than the epoch holds: no batch, so fit would end at once, status 0, untrained
    few = GLDv2DataModule(root=str(tmp_path), train_set="full", sampling="pairs", validation_split=0.0,
                          val_sets=[], test_sets=[], image_size=16, num_workers=0,
                          pairs=PairSampling(groups_per_batch=31, negatives=1))
    with pytest.raises(ValueError, match=r"30 groups per epoch .* groups_per_batch=31"):
        few.train_dataloader()
    # pair options with another sampling went unread: plain shuffled batches, no word said
    with pytest.raises(ValueError, match="sampling: pairs"):
        GLDv2DataModule(root=str(tmp_path), sampling="shuffle", pairs=PairSampling(groups_per_batch=3))
    from datamodules.minilandmarks import MiniLandmarksDataModule
    with pytest.raises(ValueError, match="sampling: pairs"):
        MiniLandmarksDataModule(root=str(tmp_path / "mini"), pairs=PairSampling(groups_per_batch=3))


def test_shuffle_tiles_permutes_whole_tiles_and_keeps_the_remainder() -> None:
    images = torch.rand(6, 3, 34, 27)  # 4x4 tiles of 8x6 px; 2 rows and 3 columns of remainder
    out = shuffle_tiles(images, 4, step_permutations(seed=0, step=3, count=6, grid=4))
    assert torch.equal(out[:, :, 32:], images[:, :, 32:]) and torch.equal(out[:, :, :, 24:], images[:, :, :, 24:])

    def tiles(x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, r * 8:(r + 1) * 8, q * 6:(q + 1) * 6] for r in range(4) for q in range(4)]

    for before, after in zip(images, out):
        src, dst = tiles(before), tiles(after)
        # every output tile is exactly one input tile, each used once, and not all in place
        match = [[k for k, t in enumerate(src) if torch.equal(t, d)] for d in dst]
        assert all(len(m) == 1 for m in match) and sorted(m[0] for m in match) == list(range(16))
        assert [m[0] for m in match] != list(range(16))
    assert torch.equal(shuffle_tiles(images, 4, step_permutations(0, 3, 6, 4)), out)  # deterministic per (seed, step)
    assert not torch.equal(shuffle_tiles(images, 4, step_permutations(0, 4, 6, 4)), out)
    with pytest.raises(ValueError, match="grid >= 2"):
        step_permutations(0, 3, 6, 1)
    with pytest.raises(ValueError, match="too small"):
        shuffle_tiles(images, 30, step_permutations(0, 3, 6, 30))
    with pytest.raises(ValueError, match="one permutation of 16 tiles per image"):
        shuffle_tiles(images, 4, step_permutations(0, 3, 5, 4))


def test_batch_transforms_draw_as_one_process_with_the_whole_batch() -> None:
    """Hide-and-Seek masks and mosaic permutations of N ranks are those of one process whose batch holds
    all of the step's units, each rank's being units ``j * N + rank`` (how the samplers deal them)."""
    has = HideAndSeek(start=0.5, end=0.5, warmup_steps=0, grid=4, seed=3)
    whole = has.masks(12, 16, 16, step=7)  # one process: 4 groups of 3 items
    for rank in (0, 1):
        share = has.masks(6, 16, 16, step=7, rank=rank, world_size=2, unit=3)
        units = [u for u in range(4) if u % 2 == rank]  # groups 0, 2 on rank 0; 1, 3 on rank 1
        assert torch.equal(share, torch.cat([whole[3 * u:3 * u + 3] for u in units]))
    perms = step_permutations(0, 5, count=4, grid=3)  # one process: 4 groups of 1 mosaic
    assert torch.equal(step_permutations(0, 5, 2, 3, rank=1, world_size=2), perms[[1, 3]])
    with pytest.raises(ValueError, match="are not 2 ranks' units of 3"):
        rank_share(torch.zeros(8), 0, 2, unit=3)


def test_shuffled_negatives_are_anchor_mosaics_marked_by_the_collate(tmp_path: Path) -> None:
    from PIL import Image

    from datamodules.gldv2 import GLDv2DataModule, image_path

    base = PairSampling(groups_per_batch=1, negatives=2, seed=3, groups_per_epoch=50)
    config = PairSampling(groups_per_batch=1, negatives=2, seed=3, groups_per_epoch=50, shuffled_negatives=2)
    plain = _groups(list(PairBatchSampler(PairMiner(LABELS, base))), base.group_size)
    groups = _groups(list(PairBatchSampler(PairMiner(LABELS, config))), config.group_size)
    assert config.group_size == 6 and [g[:4] for g in groups] == plain  # extra slots draw nothing
    assert all(g[4] == g[5] == g[0] for g in groups)
    collate = PairCollate(config.group_size, shuffled=2)
    assert collate.pairs(6).tolist() == [[0, 1, 1], [0, 2, 0], [0, 3, 0], [0, 4, 0], [0, 5, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        PairCollate(4, shuffled=2)
    with pytest.raises(ValueError, match="shuffle_grid"):
        PairSampling(shuffle_grid=1)

    rng = np.random.default_rng(0)
    for i, label in enumerate(LABELS):
        path = image_path(str(tmp_path), "train", f"{i:016x}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    (tmp_path / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{i:016x},u,{lab}\n" for i, lab in enumerate(LABELS)))
    dm = GLDv2DataModule(root=str(tmp_path), train_set="full", sampling="pairs", validation_split=0.0,
                         val_sets=[], test_sets=[], image_size=16, num_workers=0,
                         pairs=PairSampling(groups_per_batch=2, negatives=1, shuffled_negatives=1,
                                            shuffle_grid=2, mining_max_side=12))
    batch = next(iter(dm.train_dataloader()))
    assert batch["shuffled"].tolist() == [False, False, False, True] * 2
    assert (batch["label"][3::4] == batch["label"][0::4]).all()
    out = dm.train_batch_transform(batch, step=0)["image"]
    assert torch.equal(out[~batch["shuffled"]], batch["image"][~batch["shuffled"]])
    for k in (3, 7):  # the marked rows are 2x2 mosaics of their own crop
        quads = lambda x: sorted(x[:, r:r + 8, q:q + 8].flatten().tolist() for r in (0, 8) for q in (0, 8))
        assert not torch.equal(out[k], batch["image"][k]) and quads(out[k]) == quads(batch["image"][k])


NEW_CONFIGS = ["cvnet_r50_gldv2.yaml", "cvnet_demo.yaml"]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_configs_parse_and_instantiate(name: str, cache_root: Path, tmp_path: Path) -> None:
    from retrieval_lightning.cli import run_lightning_cli

    config = REPO / "experiments" / name
    text = yaml.safe_load(config.read_text())
    assert text["model"]["freeze"] == ["backbone", "global"]
    assert text["data"]["init_args"]["sampling"] == "pairs"
    args = ["--config", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_from=null"]
    if text["data"]["class_path"] == "minilandmarks":
        args += [f"--data.init_args.root={cache_root}", "--data.init_args.build_size=128"]
    else:
        from datamodules.minilandmarks import MiniLandmarksDataModule

        built = MiniLandmarksDataModule(root=str(cache_root), build_size=128).dataset_dir
        args += [f"--data.init_args.root={built / 'gldv2'}", "--model.backbone.init_args.weights=null",
                 "--model.backbone.init_args.name=resnet18"]
    cli = run_lightning_cli(args, run=False)
    assert set(cli.model.heads) == {"global", "verifier"}
    assert cli.datamodule.pair_miner is not None
    assert any(isinstance(c, HardNegativeMining) for c in cli.trainer.callbacks)


@pytest.mark.slow
def test_demo_config_fit_steps_train_the_verifier_only(cache_root: Path, tmp_path: Path) -> None:
    """Two optimiser steps of the demo recipe: mined pairs reach the verifier, frozen parts stay put."""
    from retrieval_lightning.cli import run_lightning_cli

    args = ["--config", str(REPO / "experiments" / "cvnet_demo.yaml"), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.root={cache_root}", "--data.init_args.build_size=128",
            "--data.init_args.image_size=64", "--data.init_args.eval_max_side=64",
            "--data.init_args.pairs.pool_size=24", "--data.init_args.pairs.mining_max_side=64",
            "--data.init_args.pairs.groups_per_batch=2", "--data.init_args.pairs.groups_per_epoch=24"]
    cli = run_lightning_cli(args, run=False)
    model = cli.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert cli.datamodule.pair_miner.mined_epoch == 0  # mined before the first batch was drawn
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.verifier.") for k in changed), sorted(changed)[:5]
    assert any("learner" in k for k in changed)  # the demo's verifier has no projection to train (identity)
    assert not any("projections" in k for k in before)


def test_pair_statistics_watch_the_same_different_call() -> None:
    from heads.cvnet_verifier import pair_statistics

    p_same = torch.tensor([0.9, 0.2, 0.6, 0.1])
    logits = torch.stack([torch.log(1 - p_same), torch.log(p_same)], dim=1)
    stats = pair_statistics(logits, torch.tensor([1, 1, 0, 0]))
    assert stats["pair_accuracy"].item() == pytest.approx(0.5)  # right on the first and the last pair
    assert stats["p_same_positive"].item() == pytest.approx(0.55)
    assert stats["p_same_negative"].item() == pytest.approx(0.35)
    assert set(pair_statistics(logits[:2], torch.tensor([1, 1]))) == {"pair_accuracy", "p_same_positive"}
