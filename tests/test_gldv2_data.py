"""GLDv2 readers, split, sampler, transforms and datamodule on a tiny dataset in the official format."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from datamodules._transforms import TrainTransform, sample_crop_box
from retrieval_lightning.data.loaders import collate_eval
from datamodules.sampling import ShuffleSampler
from datamodules.gldv2 import (
    ClassBalancedSampler,
    GLDv2DataModule,
    GLDv2FormatError,
    ImagePaths,
    image_path,
    read_id_csv,
    read_recognition_solution,
    read_retrieval_solution,
    read_train_clean_csv,
    read_train_csv,
    remap_labels,
    split_train_val,
)


def _hex_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:015x}"[-16:].replace(" ", "0")


def _write(path, text: str) -> str:
    with open(path, "w") as handle:
        handle.write(text)
    return str(path)


def _jpg(root, split: str, image_id: str, color: tuple[int, int, int], size=(24, 18)) -> None:
    path = image_path(str(root), split, image_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


# landmark_id -> number of training images; 12 and 40 have a single image.
CLASS_SIZES = {7: 5, 3: 4, 12: 1, 20: 3, 40: 1}
CLEAN = (7, 3, 12)


@pytest.fixture(scope="module")
def gld(tmp_path_factory):
    root = tmp_path_factory.mktemp("gldv2")
    train_rows, clean_rows, by_class = [], [], {}
    n = 0
    for landmark, count in CLASS_SIZES.items():
        for _ in range(count):
            image_id = _hex_id("a", n)
            n += 1
            by_class.setdefault(landmark, []).append(image_id)
            train_rows.append(f"{image_id},http://x.org/{image_id}.jpg,{landmark}")
            _jpg(root, "train", image_id, (10 * landmark % 255, 50, 90))
    for landmark in CLEAN:
        clean_rows.append(f"{landmark},{' '.join(by_class[landmark])}")
    _write(root / "train.csv", "id,url,landmark_id\n" + "\n".join(train_rows) + "\n")
    _write(root / "train_clean.csv", "landmark_id,images\n" + "\n".join(clean_rows) + "\n")
    index_ids = [_hex_id("b", i) for i in range(4)]
    test_ids = [_hex_id("c", i) for i in range(4)]
    for i, x in enumerate(index_ids):
        _jpg(root, "index", x, (200, 20 * i, 0), size=(40, 30))
    for i, x in enumerate(test_ids):
        _jpg(root, "test", x, (0, 20 * i, 200), size=(30, 40))
    _write(root / "index.csv", "id\n" + "\n".join(index_ids) + "\n")
    _write(root / "test.csv", "id\n" + "\n".join(test_ids) + "\n")
    _write(root / "retrieval_solution_v2.1.csv", "id,images,Usage\n"
           f"{test_ids[0]},{index_ids[0]} {index_ids[2]},Public\n"
           f"{test_ids[1]},{index_ids[1]},Private\n"
           f"{test_ids[2]},None,Ignored\n"
           f"{test_ids[3]},{index_ids[3]},Public\n")
    _write(root / "recognition_solution_v2.1.csv", "id,landmarks,Usage\n"
           f"{test_ids[0]},7,Public\n"
           f"{test_ids[1]},3 20,Private\n"
           f"{test_ids[2]},,Ignored\n"
           f"{test_ids[3]},,Public\n")
    return {"root": root, "by_class": by_class, "index": index_ids, "test": test_ids}


# ----------------------------------------------------------------------------- readers


def test_read_train_csv_and_clean(gld):
    full = read_train_csv(str(gld["root"] / "train.csv"))
    assert len(full) == sum(CLASS_SIZES.values())
    assert full.ids[:5] == gld["by_class"][7]
    assert full.landmark_ids.tolist() == [lm for lm, c in CLASS_SIZES.items() for _ in range(c)]
    clean = read_train_clean_csv(str(gld["root"] / "train_clean.csv"))
    assert clean.ids == gld["by_class"][7] + gld["by_class"][3] + gld["by_class"][12]
    assert clean.landmark_ids.tolist() == [7] * 5 + [3] * 4 + [12]


def test_malformed_rows_name_file_and_row(tmp_path, caplog):
    path = _write(tmp_path / "train.csv", "id,url,landmark_id\n"
                  "0123456789abcdef,http://a,1\n"
                  "1123456789abcdef,http://b,2\n"
                  "2123456789abcdef,http://c,notanint\n"
                  "3123456789abcdef,http://d\n"
                  "4123456789abcdef,http://e,5\n")
    with pytest.raises(GLDv2FormatError, match=r"train\.csv: row 4: landmark_id 'notanint'"):
        read_train_csv(path)
    with caplog.at_level(logging.WARNING):
        table = read_train_csv(path, on_error="skip")
    assert table.ids == ["0123456789abcdef", "1123456789abcdef", "4123456789abcdef"]
    assert "skipped 2 malformed rows" in caplog.text and "row 5" in caplog.text

    bom = tmp_path / "bom.csv"  # saved by a spreadsheet: a UTF-8 byte-order mark before the header
    bom.write_bytes(b"\xef\xbb\xbfid,url,landmark_id\n0123456789abcdef,http://a,1\n")
    assert read_train_csv(str(bom)).ids == ["0123456789abcdef"]
    extra = _write(tmp_path / "extra.csv", "id,url,landmark_id,note\n0123456789abcdef,http://a,1\n")
    with pytest.raises(GLDv2FormatError, match=r"row 2: expected 4 fields as the header \(id,url,landmark_id,note\)"):
        read_train_csv(extra)

    bad_header = _write(tmp_path / "h.csv", "image,url,landmark\nx,y,1\n")
    with pytest.raises(GLDv2FormatError, match=r"h\.csv: row 1: header"):
        read_train_csv(bad_header)

    clean = _write(tmp_path / "clean.csv", "landmark_id,images\n1,aaaaaaaa bbbbbbbb\n2,cccccccc aaaaaaaa\n")
    with pytest.raises(GLDv2FormatError, match=r"clean\.csv: row 3: image id\(s\) listed twice"):
        read_train_clean_csv(clean)
    empty = _write(tmp_path / "clean2.csv", "landmark_id,images\n1,aaaaaaaa\n2,\n")
    with pytest.raises(GLDv2FormatError, match=r"clean2\.csv: row 3: bad image id"):
        read_train_clean_csv(empty)
    # ids that ran together (separators lost) are one long "id": the id table padded every id to it (24 MiB of
    # ids became 3 GiB, silently; a review at GLDv2 scale)
    joined = _write(tmp_path / "joined.csv",
                    "landmark_id,images\n1,aaaaaaaa\n2," + "0123456789abcdef" * 126 + "\n")
    with pytest.raises(GLDv2FormatError, match=r"joined\.csv: row 3: bad image id\(s\) '(0123456789abcdef){2}"
                                               r"01234567'\.\.\. \(2016 characters\) for landmark 2 \(alphanumeric, "
                                               r"3 - 64 characters\)"):
        read_train_clean_csv(joined)
    long_train = _write(tmp_path / "long.csv", "id,url,landmark_id\n" + "f" * 65 + ",http://a,1\n")
    with pytest.raises(GLDv2FormatError, match=r"long\.csv: row 2: bad image id 'f{40}'\.\.\. \(65 characters\)"):
        read_train_csv(long_train)
    assert read_train_csv(_write(tmp_path / "ok.csv", "id,url,landmark_id\n" + "f" * 64 + ",http://a,1\n")).ids


def test_a_stray_quote_or_a_repeated_id_in_train_csv_is_an_error_not_wrong_labels(tmp_path, caplog):
    """The csv module's lenient mode let an unclosed quote swallow the next row into a URL (that image gone, the
    first one labelled with its landmark); a repeated id trained one image under two classes."""
    quote = _write(tmp_path / "quote.csv", 'id,url,landmark_id\n'
                   'abc123,"http://x/a.jpg,5\n'
                   'abc124,"http://x/b.jpg,6\n'
                   'abc125,http://x/c.jpg,7\n'
                   'abc126,"http://x/d.jpg\nmore",8\n')
    with pytest.raises(GLDv2FormatError, match=r"quote\.csv: row 2: malformed quoting .*ends on line 3"):
        read_train_csv(quote)
    with caplog.at_level(logging.WARNING):
        table = read_train_csv(quote, on_error="skip")
    assert table.ids == ["abc125"] and table.landmark_ids.tolist() == [7]
    assert "row 5: a quoted field runs over lines 5 - 6" in caplog.text

    repeated = _write(tmp_path / "rep.csv", "id,url,landmark_id\nabc123,u,5\nabc124,u,5\nabc123,u,6\n")
    with pytest.raises(GLDv2FormatError, match=r"rep\.csv: row 4: image id 'abc123' listed again \(first on row 2\)"):
        read_train_csv(repeated)
    table = read_train_csv(repeated, on_error="skip")
    assert table.ids == ["abc123", "abc124"] and table.landmark_ids.tolist() == [5, 5]


def test_solutions_usage_and_ignored(gld, tmp_path):
    t, i = gld["test"], gld["index"]
    path = str(gld["root"] / "retrieval_solution_v2.1.csv")
    assert read_retrieval_solution(path, "Public") == {t[0]: [i[0], i[2]], t[3]: [i[3]]}
    assert read_retrieval_solution(path, "Private") == {t[1]: [i[1]]}
    assert set(read_retrieval_solution(path, "All")) == {t[0], t[1], t[3]}
    rec = str(gld["root"] / "recognition_solution_v2.1.csv")
    assert read_recognition_solution(rec, "Public") == {t[0]: [7], t[3]: []}
    assert read_recognition_solution(rec, "Private") == {t[1]: [3, 20]}

    none_row = _write(tmp_path / "r.csv", "id,images,Usage\nabcdef012,None,Public\n")
    assert read_retrieval_solution(none_row, "Public") == {"abcdef012": []}
    bad = _write(tmp_path / "bad.csv", "id,landmarks,Usage\nabc123,1,Public\nabc124,2,Secret\n")
    with pytest.raises(GLDv2FormatError, match=r"bad\.csv: row 3: Usage 'Secret'"):
        read_recognition_solution(bad, "Public")
    with pytest.raises(ValueError, match="usage"):
        read_recognition_solution(rec, "public")
    bad_image = _write(tmp_path / "bad_image.csv", "id,images,Usage\nabcdef012,abcdef013 ab-cd1 abcdef014,Public\n")
    with pytest.raises(GLDv2FormatError, match=r"row 2: .*index id 'ab-cd1' is not 3 to 64 ASCII letters and digits"):
        read_retrieval_solution(bad_image, "Public")


def test_read_id_csv_and_image_path(gld):
    assert read_id_csv(str(gld["root"] / "index.csv")) == gld["index"]
    assert image_path("/d", "train", "6e158a47eb2ca3f6") == "/d/train/6/e/1/6e158a47eb2ca3f6.jpg"


def test_parse_200k_rows(tmp_path):
    """A GLDv2-sized table parses to the right rows and classes (its speed: benchmarks/gldv2_csv_parse.py)."""
    rng = np.random.default_rng(0)
    n = 200_000
    lm = rng.integers(0, 200_000, n)
    lines = [f"{i:016x},https://upload.wikimedia.org/wikipedia/commons/{i}.jpg,{lm[i]}" for i in range(n)]
    path = _write(tmp_path / "big.csv", "id,url,landmark_id\n" + "\n".join(lines) + "\n")
    table = read_train_csv(path)
    labels, classes = remap_labels(table.landmark_ids)
    assert len(table) == n and classes.size == np.unique(lm).size
    assert np.array_equal(classes[labels], lm) and table.ids[123] == f"{123:016x}"


# ----------------------------------------------------------------------------- remap and split


def test_remap_sorted_order():
    labels, classes = remap_labels(np.array([7, 3, 12, 7, 100, 3]))
    assert classes.tolist() == [3, 7, 12, 100]
    assert labels.tolist() == [1, 0, 2, 1, 3, 0]


def _official_split(labels, fraction, seed):
    """A literal transcription of the algorithm of build_image_dataset.py (string stacking and all)."""
    file_ids = [f"id{k}" for k in range(len(labels))]
    attrs = np.stack((file_ids, file_ids, [str(x) for x in labels]))
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
    val, train = [], []
    for _, indexes in groups.items():
        sub = attrs[:, indexes]
        cols = np.arange(sub.shape[1])
        rs.shuffle(cols)
        sub = sub[:, cols]
        cut = max(1, int(fraction * sub.shape[1]))
        val += [int(x[2:]) for x in sub[1, :cut]]
        train += [int(x[2:]) for x in sub[1, cut:]]
    return train, val


@pytest.mark.parametrize("seed", [0, 3])
def test_split_matches_official_algorithm(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 40, 400) ** 2 % 97  # uneven class sizes, unsorted first appearance
    labels[:3] = [500, 501, 502]  # single-image classes
    train, val = split_train_val(labels, 0.2, seed)
    ref_train, ref_val = _official_split(labels.tolist(), 0.2, seed)
    assert train.tolist() == ref_train and val.tolist() == ref_val
    assert sorted(train.tolist() + val.tolist()) == list(range(400))
    for single in (0, 1, 2):
        assert single in val.tolist()
    for cls in np.unique(labels):
        n = int((labels == cls).sum())
        assert int((labels[val] == cls).sum()) == max(1, int(0.2 * n))


# ----------------------------------------------------------------------------- sampler


def _indices(sampler) -> list[int]:
    return [index for index, _seed in sampler]


def test_class_balanced_sampler_frequencies_and_determinism():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    uniform = ClassBalancedSampler(labels, power=0.0, num_samples=30000, seed=1)
    drawn = labels[np.array(_indices(uniform))]
    freq = np.bincount(drawn, minlength=3) / drawn.size
    assert np.allclose(freq, 1 / 3, atol=0.02)
    natural = ClassBalancedSampler(labels, power=1.0, num_samples=30000, seed=1)
    freq = np.bincount(labels[np.array(_indices(natural))], minlength=3) / 30000
    assert np.allclose(freq, [0.9, 0.09, 0.01], atol=0.01)
    # Every image of the small class is reachable, indices stay in range.
    picks = np.array(_indices(uniform))
    assert set(picks[labels[picks] == 2].tolist()) == set(range(990, 1000))
    again = ClassBalancedSampler(labels, power=0.0, num_samples=30000, seed=1)
    assert list(again) == list(uniform)
    again.set_epoch(1)
    assert _indices(again) != _indices(uniform)


@pytest.mark.parametrize("kind", ["balanced", "shuffle"])
def test_samplers_reshuffle_each_epoch_and_ranks_share_it_disjointly(kind):
    labels = np.repeat(np.arange(7), [1, 2, 3, 5, 8, 13, 21])  # 53 images

    def make(world, rank):
        if kind == "balanced":
            return ClassBalancedSampler(labels, power=0.5, num_samples=41, seed=3, num_replicas=world, rank=rank)
        return ShuffleSampler(labels.size, seed=3, num_replicas=world, rank=rank)

    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(2):
            sampler = make(2, rank)
            assert isinstance(sampler, DistributedSampler)  # so Lightning neither wraps it nor skips set_epoch
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler) == (41 if kind == "balanced" else 53) // 2
        # positions (each with its own augmentation seed) are disjoint and together are the
        # single-process epoch, cut to a multiple of the world size
        assert set(shards[0]).isdisjoint(shards[1])
        whole = make(1, 0)
        whole.set_epoch(epoch)
        assert sorted(shards[0] + shards[1]) == sorted(list(whole)[: 2 * len(shards[0])])
        if kind == "shuffle":
            assert set(_indices(shards[0])).isdisjoint(_indices(shards[1]))
        epochs.append(shards)
    for rank in range(2):
        assert _indices(epochs[0][rank]) != _indices(epochs[1][rank])


def test_lightning_reaches_the_sampler_epoch_and_a_loader_resumes_mid_epoch(gld):
    """Through a real Trainer (any Lightning 2.x calls set_epoch on a loader's own DistributedSampler)."""
    import lightning.pytorch as pl

    seen: dict[int, list[int]] = {}

    class Record(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            return self.w * batch["image"].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(gld, train_set="full", sampling="balanced", validation_split=0.0, val_sets=[], test_sets=[])
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(Record(), datamodule=dm)
    expected = []
    for epoch in range(2):
        sampler = ClassBalancedSampler(dm.train_dataset.labels, seed=0)
        sampler.set_epoch(epoch)
        expected.append(_indices(sampler)[: 4 * (len(sampler) // 4)])
    assert seen[0] == expected[0] and seen[1] == expected[1] and seen[0] != seen[1]

    # a loader restored from its state continues the same epoch at the next batch
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [b["index"].tolist() for b in loader]
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch after creating the iterator
    it = iter(resumed)
    assert [b["index"].tolist() for b in it] == full[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(full)}


# ----------------------------------------------------------------------------- transforms


def test_sample_crop_box_constraints():
    gen = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(300):
        top, left, h, w = sample_crop_box(300, 400, generator=gen)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        frac = h * w / (300 * 400)
        fractions.append(frac)
        if (h, w) != (300, 400):
            assert 0.1 <= frac <= 1.0
            assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert min(fractions) < 0.3 and max(fractions) > 0.8


def test_train_transform_output():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = TrainTransform(32)(image, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    flat = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    assert torch.allclose(TrainTransform(16)(flat), torch.full((3, 16, 16), 128 / 255))


def test_collate_eval_variable_sizes():
    items = [{"image": torch.zeros(3, 5, 7), "index": 3}, {"image": torch.zeros(3, 9, 2), "index": 0}]
    batch = collate_eval(items)
    assert [t.shape for t in batch["image"]] == [(3, 5, 7), (3, 9, 2)]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [3, 0]


# ----------------------------------------------------------------------------- datamodule


def _dm(gld, **kw) -> GLDv2DataModule:
    args = dict(root=str(gld["root"]), image_size=16, batch_size=4, eval_batch_size=3, num_workers=0,
                eval_max_side=20, usage="Public", holdout_num_classes=None)
    args.update(kw)
    return GLDv2DataModule(**args)


def test_num_classes_before_setup(gld):
    assert _dm(gld).num_classes == len(CLEAN)
    full = _dm(gld, train_set="full")
    assert full.num_classes == len(CLASS_SIZES)
    assert full.class_landmark_ids.tolist() == sorted(CLASS_SIZES)


def test_present_only_trains_on_a_partial_download(gld, tmp_path):
    """``download --max_archives N`` fetches some tars: ``present_only`` keeps the listed images found
    on disk (the classes follow them), instead of failing at the first missing image."""
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(gld["root"], root)
    landmark = sorted(gld["by_class"])[0]
    gone = gld["by_class"][landmark]
    for image_id in gone:
        os.remove(image_path(str(root), "train", image_id))
    dm = _dm(gld, root=str(root), train_set="full", present_only=True, validation_split=0.0, val_sets=[],
             test_sets=["retrieval"])
    assert dm.num_classes == len(CLASS_SIZES) - 1 and landmark not in dm.class_landmark_ids.tolist()
    dm.setup("fit")
    assert len(dm.train_dataset) == sum(CLASS_SIZES.values()) - len(gone)
    assert all(os.path.isfile(dm.train_dataset.paths[i]) for i in range(len(dm.train_dataset)))
    assert _dm(gld, root=str(root), train_set="full").num_classes == len(CLASS_SIZES)  # off: every listed image
    shutil.rmtree(root / "train")
    with pytest.raises(GLDv2FormatError, match=r"present_only: none of the \d+ images of .*train\.csv is under"):
        _dm(gld, root=str(root), train_set="full", present_only=True).num_classes


def test_train_split_and_dataloader(gld):
    dm = _dm(gld, train_set="full")
    dm.setup("fit")
    val_ids = set(dm.split_ids("val"))
    train_ids = set(dm.split_ids("train"))
    assert not val_ids & train_ids and len(val_ids | train_ids) == sum(CLASS_SIZES.values())
    # int(0.2 * n) with a floor of one: 5 -> 1, 4 -> 1, 3 -> 1, 1 -> 1 (single images go to val).
    assert len(val_ids) == 5
    assert gld["by_class"][12][0] in val_ids and gld["by_class"][40][0] in val_ids
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    sorted_ids = sorted(CLASS_SIZES)
    for label, index in zip(batch["label"].tolist(), batch["index"].tolist()):
        path = dm.train_dataset.paths[index]
        image_id = os.path.basename(path)[:-4]
        true_landmark = next(lm for lm, ids in gld["by_class"].items() if image_id in ids)
        assert sorted_ids[label] == true_landmark


def test_balanced_sampling_dataloader(gld):
    dm = _dm(gld, train_set="full", sampling="balanced", validation_split=0.0, val_sets=[])
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler)
    assert len(list(loader)) == sum(CLASS_SIZES.values()) // 4


def test_eval_sets_and_loaders(gld):
    dm = _dm(gld, train_set="full")
    retrieval, recognition = dm.eval_sets("test")
    t, i = gld["test"], gld["index"]
    assert retrieval.protocol == "gldv2_retrieval" and retrieval.n_queries == 2
    assert retrieval.ground_truth["query_ids"] == [t[0], t[3]]
    assert retrieval.ground_truth["db_ids"] == i
    assert retrieval.ground_truth["solution"] == {t[0]: [i[0], i[2]], t[3]: [i[3]]}
    assert retrieval.image_ids == [t[0], t[3]] + i and len(retrieval.dataset) == 6
    assert recognition.protocol == "gldv2_recognition"
    assert recognition.ground_truth["solution"] == {t[0]: [7], t[3]: []}
    assert recognition.n_database == sum(CLASS_SIZES.values())
    assert list(recognition.ground_truth["db_labels"]) == [lm for lm, c in CLASS_SIZES.items() for _ in range(c)]

    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    seen = []
    for batch in loaders[0]:
        assert isinstance(batch["image"], list) and batch["index"].dtype == torch.long
        seen += batch["index"].tolist()
        for image in batch["image"]:
            assert image.dtype == torch.float32 and max(image.shape[1:]) == 20
    assert seen == list(range(6))
    query = retrieval.dataset[0]["image"]  # test images are 30x40 (w x h) blue-ish
    assert query.shape == (3, 20, 15) and query[2].mean() > 0.7
    db = retrieval.dataset[2]["image"]  # index images are 40x30
    assert db.shape == (3, 15, 20) and db[0].mean() > 0.7


def test_eval_sets_give_the_metrics_worked_out_by_hand(gld):
    """The protocols' glue (ids, solutions, labels) on the datamodule's own eval sets."""
    from retrieval_lightning.evaluation import evaluate_eval_set

    retrieval, recognition = _dm(gld, train_set="full").eval_sets("test")
    # retrieval: 4 index images as one-hot rows; query t0 ranks i2, i1, i0, i3 and query t3 ranks i0, i3
    queries = torch.nn.functional.normalize(torch.tensor([[0.5, 0.6, 0.9, 0.0], [0.9, 0.0, 0.0, 0.5]]), dim=1)
    result = evaluate_eval_set(retrieval, torch.cat([queries, torch.eye(4)]))
    # t0's landmarks i0, i2 at ranks 3 and 1: (1/1 + 2/3) / 2; t3's i3 at rank 2: 1/2
    assert result.metrics["mAP@100"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert result.topk[0, :4].tolist() == [2, 1, 0, 3] and result.relevance[0, :4].tolist() == [1, 0, 1, 0]

    # recognition: 14 training images as one-hot rows (labels 7 7 7 7 7 3 3 3 3 12 20 20 20 40); t0's nearest is a
    # landmark-7 image (its landmark) at 0.8, t3's (a non-landmark query) a landmark-3 image at 0.9
    database = torch.eye(16)[:14]
    queries = torch.zeros(2, 16)
    queries[0, 2], queries[0, 14] = 0.8, 0.6
    queries[1, 6], queries[1, 15] = 0.9, (1 - 0.81) ** 0.5
    result = evaluate_eval_set(recognition, torch.cat([queries, database]))
    # by confidence: t3 (wrong), then t0 (right); one query has a landmark: GAP = (1/2) / 1
    assert result.metrics["GAP"] == pytest.approx(50.0)
    assert result.metrics["top1_accuracy"] == pytest.approx(100.0)
    assert result.topk[:, 0].tolist() == [2, 6] and result.relevance[:, 0].tolist() == [1, 0]


def test_holdout_eval_set(gld):
    dm = _dm(gld, train_set="full")
    (holdout,) = dm.eval_sets("validate")
    assert holdout.name == "gldv2_holdout" and holdout.protocol == "gldv2_recognition"
    # Classes with images on both sides of the split: 7, 3, 20 (12 and 40 are val-only).
    assert holdout.n_queries == 3 and holdout.n_database == 4 + 3 + 2
    truth = holdout.ground_truth
    assert sorted(v[0] for v in truth["solution"].values()) == [3, 7, 20]
    assert set(truth["db_labels"]) == {3, 7, 20}
    assert len(dm.val_dataloader()) == 1
    capped = _dm(gld, train_set="full", holdout_num_classes=2)
    (small,) = capped.eval_sets("validate")
    assert small.n_queries == 2 and len(set(small.ground_truth["db_labels"])) == 2
    with pytest.raises(GLDv2FormatError, match=r"'gldv2_holdout' has no queries \(holdout_num_classes and "):
        _dm(gld, train_set="full", holdout_num_classes=0).eval_sets("validate")  # usage was named, which it ignores


def test_bad_arguments_and_missing_index_ids(gld, tmp_path):
    with pytest.raises(ValueError, match="train_set"):
        _dm(gld, train_set="dirty")
    with pytest.raises(ValueError, match="unknown GLDv2 eval set"):
        _dm(gld, test_sets=["retrieval", "nope"])
    sol = _write(tmp_path / "sol.csv", f"id,images,Usage\n{gld['test'][0]},ffffffffffffffff,Public\n")
    dm = _dm(gld, retrieval_solution_csv=sol, test_sets=["retrieval"])
    with pytest.raises(GLDv2FormatError, match="ffffffffffffffff.*index.csv"):
        dm.eval_sets("test")


def test_retrieval_queries_without_ground_truth_are_left_out_before_extraction(gld, tmp_path):
    """mAP@100 counts the queries with ground truth: a Public row of ``None`` is dropped at set-up (the
    metric refuses an empty truth, which would otherwise fail the run once the index is embedded)."""
    t, i = gld["test"], gld["index"]
    sol = _write(tmp_path / "sol.csv", f"id,images,Usage\n{t[0]},{i[0]},Public\n{t[1]},None,Public\n")
    dm = _dm(gld, retrieval_solution_csv=sol, test_sets=["retrieval"])
    with pytest.warns(UserWarning, match=rf"1 retrieval queries have no ground-truth.*{t[1]}"):
        (retrieval,) = dm.eval_sets("test")
    assert retrieval.n_queries == 1 and retrieval.ground_truth["query_ids"] == [t[0]]
    assert list(retrieval.ground_truth["solution"]) == [t[0]]


def test_quoted_url_with_comma_and_clean_csv_field_limit(tmp_path):
    quoted = _write(tmp_path / "quoted.csv", "id,url,landmark_id\n"
                    '0123456789abcdef,"http://a/x,1.jpg",4\n1123456789abcdef,http://b/y.jpg,2\n')
    table = read_train_csv(quoted)
    assert table.ids == ["0123456789abcdef", "1123456789abcdef"] and table.landmark_ids.tolist() == [4, 2]
    # The largest landmarks list more ids in one field than the csv module's default 128 KiB limit.
    many = [f"{i:016x}" for i in range(10_000)]
    big = _write(tmp_path / "big_clean.csv", "landmark_id,images\n5," + " ".join(many) + "\n9,ffffffffffffffff\n")
    clean = read_train_clean_csv(big)
    assert len(clean) == 10_001 and clean.landmark_ids[-1] == 9


def test_image_paths_segments():
    paths = ImagePaths("/r", [("test", ["abc123", "abd999"]), ("index", np.array(["fff000"]))])
    assert len(paths) == 3
    assert paths[0] == "/r/test/a/b/c/abc123.jpg" and paths[2] == "/r/index/f/f/f/fff000.jpg"
    with pytest.raises(IndexError):
        paths[3]


def test_unreadable_images_raise_or_skip(gld, tmp_path, caplog):
    from retrieval_lightning.data.io import ImageLoadError, LoadPolicy

    from datamodules._transforms import EvalImageDataset, EvalTransform
    from datamodules.gldv2 import GLDv2TrainDataset

    good = image_path(str(gld["root"]), "train", gld["by_class"][7][0])
    missing = str(tmp_path / "missing.jpg")
    raising = GLDv2TrainDataset([missing, good], np.array([0, 1]), TrainTransform(8), LoadPolicy("raise"))
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        raising[0]
    policy = LoadPolicy("skip")
    skipping = GLDv2TrainDataset([missing, good], np.array([0, 1]), TrainTransform(8), policy)
    with caplog.at_level(logging.WARNING):
        item = skipping[0]
    assert item["index"] == 1 and item["label"] == 1 and policy.count == 1
    evals = EvalImageDataset([good, missing], EvalTransform(16), LoadPolicy("skip"))
    assert evals[1]["index"] == 1 and evals[1]["image"].abs().sum() == 0
    # the datamodule's policy says, in the error, how to skip instead
    hinted = GLDv2TrainDataset([missing, good], np.array([0, 1]), TrainTransform(8),
                               GLDv2DataModule(root=str(gld["root"])).policy)
    with pytest.raises(ImageLoadError, match=r"missing.jpg'?: file not found \(--data.init_args.on_error=skip skips"):
        hinted[0]
    # a run of unreadable images (a partial download is stored class by class): named, with the cure
    nothing = GLDv2TrainDataset([missing] * 3, np.array([0, 1, 2]), TrainTransform(8), LoadPolicy("skip"))
    with caplog.at_level(logging.WARNING), pytest.raises(
            ImageLoadError, match=r"none of the 3 training images from index 1 on is readable .*present_only=true"):
        nothing[1]


@pytest.mark.parametrize(("options", "message"), [
    ({"image_size": 0}, "image_size must be a positive number of pixels, got 0"),  # (n, 3, 0, 0) batches
    ({"crop_area_min": 1.5}, r"crop_area_min, max\) must satisfy 0 < min <= max <= 1, got \(1.5, 1.0\)"),  # no crop
    ({"crop_area_min": -0.2}, r"crop_area_min, max\) must satisfy"),
    ({"eval_max_side": 0}, "max_side must be a positive number of pixels or None"),  # 1x1 eval images
    ({"eval_max_side": -5}, "max_side must be a positive number of pixels or None"),  # a torch internal assert
])
def test_options_that_would_silently_train_or_evaluate_otherwise_are_refused(gld, options, message):
    with pytest.raises(ValueError, match=message):
        _dm(gld, **options)


def test_a_batch_larger_than_a_ranks_training_split_is_refused_before_fit_trains_nothing(gld):
    dm = _dm(gld, batch_size=10_000)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"batch_size 10000 exceeds the \d+ training images of each rank"):
        dm.train_dataloader()


def test_constructor_signature_is_cli_friendly():
    import inspect

    from jsonargparse import ArgumentParser

    for name, param in inspect.signature(GLDv2DataModule.__init__).parameters.items():
        if name != "self":
            assert param.annotation is not inspect.Parameter.empty, name
            assert param.default is not inspect.Parameter.empty, name
    parser = ArgumentParser()
    parser.add_class_arguments(GLDv2DataModule, "data")
    cfg = parser.parse_args(["--data.train_set=full", "--data.test_sets=[retrieval]", "--data.train_max_side=800"])
    assert cfg.data.train_set == "full" and cfg.data.test_sets == ["retrieval"] and cfg.data.train_max_side == 800


# --------------------------------------------------------------------------- issue 12 items 16, 19


def test_eval_decoding_is_exact_by_default_and_reduced_size_is_an_option(gld, tmp_path):
    import shutil

    from datamodules._transforms import EvalTransform
    from retrieval_lightning.data.io import load_image

    root = tmp_path / "gldv2"
    shutil.copytree(gld["root"], root)
    copy = {**gld, "root": root}
    retrieval, _ = _dm(copy, train_set="full").eval_sets("test")
    path = retrieval.dataset.paths[0]  # a test image, shrunk 2x to eval_max_side=20: textured, so decodings differ
    noise = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    exact = EvalTransform(20)(load_image(path))
    assert torch.equal(retrieval.dataset[0]["image"], exact)
    fast, _ = _dm(copy, train_set="full", eval_fast_decode=True).eval_sets("test")
    reduced = EvalTransform(20)(load_image(path, max_side=20))
    assert fast.dataset.fast_decode and torch.equal(fast.dataset[0]["image"], reduced)
    assert not torch.equal(reduced, exact)  # the option really changes the decoding
    # decoded shrunk, the factor is still of the file's own 40 x 30 (DELG's keypoints map back to it)
    assert retrieval.dataset[0]["resize_factor"] == fast.dataset[0]["resize_factor"] == (0.5, 0.5)


def test_recognition_set_holds_ids_and_labels_compactly(gld):
    from datamodules._compact import StringArray

    dm = _dm(gld, train_set="full")
    _, recognition = dm.eval_sets("test")
    truth = recognition.ground_truth
    assert isinstance(truth["db_labels"], np.ndarray) and truth["db_labels"].dtype == np.int64
    assert isinstance(recognition.image_ids, StringArray) and isinstance(dm._train_state().table.ids, StringArray)
    assert recognition.image_ids.data.dtype.kind == "S"
    ids = list(recognition.image_ids)
    assert ids[: recognition.n_queries] == truth["query_ids"]
    assert ids[recognition.n_queries :] == list(dm._train_state().table.ids)
    assert all(os.path.basename(recognition.dataset.paths[k]) == f"{ids[k]}.jpg" for k in range(len(ids)))
