"""Revisitop ground truth, query crops, +1M distractors and datamodule on a tiny official-format dataset."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules._transforms import EvalTransform, check_box
from helpers import REPO
from datamodules.revisitop import (
    RevisitopDataModule,
    RevisitopFormatError,
    load_revisitop,
    read_distractor_list,
)

N_DB = 5


def _noise_jpg(path: str, size: tuple[int, int], seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    # Smooth noise keeps JPEG artefacts small, so decoded pixels are stable.
    small = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=98)


def _make_dataset(directory, name: str, query_sizes, boxes, seed: int) -> dict:
    imlist = [f"{name}_db_{i}" for i in range(N_DB)]
    qimlist = [f"{name}_q_{i}" for i in range(len(query_sizes))]
    for i, db in enumerate(imlist):
        _noise_jpg(os.path.join(directory, "jpg", db + ".jpg"), (48, 36), seed + i)
    for i, (q, size) in enumerate(zip(qimlist, query_sizes)):
        _noise_jpg(os.path.join(directory, "jpg", q + ".jpg"), size, seed + 100 + i)
    gnd = [
        {"bbx": np.array(boxes[i], dtype=np.float64), "easy": np.array([0, 2]), "hard": [1],
         "junk": np.array([4], dtype=np.int64)}
        for i in range(len(qimlist))
    ]
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(os.path.join(directory, f"gnd_{name}.pkl"), "wb") as handle:
        pickle.dump(cfg, handle)
    return cfg


# Boxes with .5 coordinates: PIL rounds half to even (2.5 -> 2, 3.5 -> 4, 40.5 -> 40).
OX_BOXES = [[2.5, 3.5, 40.5, 27.2], [10.0, 0.0, 30.0, 50.0]]
OX_SIZES = [(60, 40), (40, 64)]


@pytest.fixture(scope="module")
def rop(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisitop")
    ox = _make_dataset(str(root / "datasets" / "roxford5k"), "roxford5k", OX_SIZES, OX_BOXES, 0)
    pa = _make_dataset(str(root / "rparis6k"), "rparis6k", [(50, 30)], [[-3.0, 1.0, 20.0, 35.0]], 50)
    distractor_names = ["0a/img_a.jpg", "0b/img_b.jpg", "0b/img_c.jpg"]
    for k, rel in enumerate(distractor_names):
        Image.new("RGB", (30 + k, 20), (250, 10 * k, 5)).save(_mk(root / "revisitop1m" / "jpg" / rel))
    listing = root / "revisitop1m" / "revisitop1m.txt"
    listing.write_text("\n".join(distractor_names) + "\n")
    return {"root": str(root), "ox": ox, "pa": pa, "distractors": str(listing), "d_names": distractor_names}


def _mk(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return str(path)


def test_load_both_layouts(rop):
    ox = load_revisitop(rop["root"], "roxford5k")
    assert ox.directory.endswith(os.path.join("datasets", "roxford5k"))
    assert ox.imlist == rop["ox"]["imlist"] and ox.qimlist == rop["ox"]["qimlist"]
    assert ox.gnd[0] == {"easy": [0, 2], "hard": [1], "junk": [4], "bbx": OX_BOXES[0]}
    pa = load_revisitop(rop["root"], "rparis6k")
    assert pa.directory.endswith("rparis6k") and len(pa.qimlist) == 1
    assert pa.database_paths[0].endswith(os.path.join("rparis6k", "jpg", "rparis6k_db_0.jpg"))
    with pytest.raises(FileNotFoundError, match="gnd_rmissing.pkl.*retrieval-lightning download revisitop"):
        load_revisitop(rop["root"], "rmissing")


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda c: c["gnd"][1].update(hard=[1, N_DB]), r"query 1 \(q1\): key 'hard': index 5 out of range"),
        (lambda c: c["gnd"][0].update(bbx=[1, 2, 3]), r"query 0 \(q0\): key 'bbx': bbx must be 4"),
        (lambda c: c["gnd"][0].update(bbx=[5, 2, 3, 9]), r"query 0 \(q0\): key 'bbx'.*x2 < x1"),
        (lambda c: c["gnd"][1].pop("junk"), r"query 1 \(q1\): missing key 'junk'"),
        (lambda c: c["gnd"][0].update(easy=[0.5]), r"query 0 \(q0\): key 'easy': index 0.5 is not an integer"),
        (lambda c: c.pop("qimlist"), r"missing key 'qimlist'"),
        (lambda c: c["gnd"].pop(), r"1 gnd entries for 2 queries"),
    ],
)
def test_ground_truth_validation_names_file_query_key(tmp_path, mutate, pattern):
    cfg = {"imlist": [f"d{i}" for i in range(N_DB)], "qimlist": ["q0", "q1"],
           "gnd": [{"bbx": [0, 0, 4, 4], "easy": [0], "hard": [1], "junk": []} for _ in range(2)]}
    mutate(cfg)
    os.makedirs(tmp_path / "rtest")
    with open(tmp_path / "rtest" / "gnd_rtest.pkl", "wb") as handle:
        pickle.dump(cfg, handle)
    with pytest.raises(RevisitopFormatError, match=pattern) as info:
        load_revisitop(str(tmp_path), "rtest")
    assert "gnd_rtest.pkl" in str(info.value)


def test_a_positive_listed_twice_is_said_since_the_official_map_counts_it_twice(tmp_path):
    """The official compute_map concatenates easy and hard, so a repeated image counts twice in its AP's
    denominator, here once: a file holding one is warned about (the published ones are not expected to)."""
    import warnings

    _make_dataset(str(tmp_path / "rtest"), "rtest", [(60, 40)], [[1, 1, 20, 20]], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_revisitop(str(tmp_path), "rtest")  # easy [0, 2], hard [1]: nothing repeated
    with open(tmp_path / "rtest" / "gnd_rtest.pkl", "rb") as handle:
        cfg = pickle.load(handle)
    cfg["gnd"][0]["hard"] = [1, 2]
    with open(tmp_path / "rtest" / "gnd_rtest.pkl", "wb") as handle:
        pickle.dump(cfg, handle)
    with pytest.warns(UserWarning, match=r"1 queries list a database image twice .*query 0 \(rtest_q_0\), images \[2\]"):
        load_revisitop(str(tmp_path), "rtest")


def _pil_reference(path: str, box, factor: float | None) -> torch.Tensor:
    img = Image.open(path).convert("RGB").crop(box)
    if factor is not None:
        w, h = img.size
        img = img.resize((round(w * factor), round(h * factor)), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_query_box_crops_as_pil_within_the_image_and_cuts_a_rounded_edge(rop):
    """Inside the image the crop is PIL's (half-to-even rounding); an edge rounded up to at most one pixel
    past the image is cut there (as the MATLAB reference clamps it), not zero-filled as PIL would; a box
    further out, or empty, is refused."""
    path = load_revisitop(rop["root"], "roxford5k").query_paths[0]
    pil = Image.open(path).convert("RGB")  # 60 x 40
    tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    for box in (OX_BOXES[0], [0.5, 1.5, 2.5, 3.5], [0.0, 0.0, 60.0, 40.0], [-0.7, 2.0, 60.6, 40.9]):
        x0, y0, x1, y1 = check_box(box, 40, 60)
        inside = [min(max(round(v), 0), side) for v, side in zip(box, (60, 40, 60, 40))]
        ref = torch.from_numpy(np.asarray(pil.crop(inside)).copy()).permute(2, 0, 1)
        assert torch.equal(tensor[:, y0:y1, x0:x1], ref), box
    assert check_box([-0.7, 2.0, 60.6, 40.9], 40, 60) == (0, 2, 60, 40)
    assert check_box([2.9, 3.9, 10.9, 12.9], 40, 60, "truncate") == (2, 3, 10, 12)
    for box in ([-5.2, -1.0, 70.0, 45.5], [3, 3, 3, 9], [60.0, 0.0, 61.0, 10.0], [0.0, 0.0, 61.6, 10.0]):
        with pytest.raises(ValueError, match="is empty or lies outside the 60x40 image"):
            check_box(box, 40, 60)


def test_query_crops_full_size_and_scaled(rop):
    data = load_revisitop(rop["root"], "roxford5k")
    full = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], max_side=None, num_workers=0)
    (es,) = full.eval_sets("test")
    for q in range(2):
        ref = _pil_reference(data.query_paths[q], OX_BOXES[q], None)
        assert torch.equal(es.dataset[q]["image"], ref)
    # Query 0: full image 60x40, max_side 30 -> factor 0.5; crop (2,4,40,27) is 38x23 -> 19x12 (round half even 11.5 -> 12).
    small = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], max_side=30, num_workers=0)
    (es,) = small.eval_sets("test")
    got = es.dataset[0]["image"]
    ref = _pil_reference(data.query_paths[0], OX_BOXES[0], 0.5)
    assert got.shape == ref.shape == (3, 12, 19)
    assert (got - ref).abs().max() <= 3 / 255
    # Query 1 is portrait 40x64: factor 30/64, crop 20x50 -> 9x23 (9.375 -> 9, 23.4375 -> 23).
    assert es.dataset[1]["image"].shape == (3, 23, 9)
    # Database images are whole, scaled by their own factor (48x36 -> 30x22.5 -> 30x22).
    assert es.dataset[2]["image"].shape == (3, 22, 30)


def test_truncated_query_boxes_as_the_official_cvnet_tester(rop):
    """``box_rounding: truncate`` crops ``img[int(y1):int(y2), int(x1):int(x2)]`` (CVNet's tester);
    box 0 (2.5, 3.5, 40.5, 27.2) then differs from PIL's rounding (2, 4, 40, 27) on two edges."""
    data = load_revisitop(rop["root"], "roxford5k")
    dm = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], max_side=None, box_rounding="truncate",
                             num_workers=0)
    (es,) = dm.eval_sets("test")
    for q in range(2):
        x1, y1, x2, y2 = (int(v) for v in OX_BOXES[q])
        full = np.asarray(Image.open(data.query_paths[q]).convert("RGB"))
        ref = torch.from_numpy(full[y1:y2, x1:x2].copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(es.dataset[q]["image"], ref)
    assert es.dataset[0]["image"].shape != _pil_reference(data.query_paths[0], OX_BOXES[0], None).shape
    with pytest.raises(ValueError, match="box_rounding must be one of"):
        RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], box_rounding="ceil")


def test_eval_transform_no_upscale_by_default():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    assert EvalTransform(64)(image).shape == (3, 10, 20)
    assert EvalTransform(64, upscale=True)(image).shape == (3, 32, 64)


def test_datamodule_sets_and_loaders(rop):
    dm = RevisitopDataModule(root=rop["root"], eval_batch_size=3, num_workers=0, max_side=40)
    assert dm.num_classes == 0
    ox, pa = dm.eval_sets("test")
    assert [ox.name, pa.name] == ["roxford5k", "rparis6k"]
    assert ox.protocol == pa.protocol == "revisitop"
    assert ox.n_queries == 2 and ox.n_database == N_DB and pa.n_queries == 1
    assert ox.ground_truth[1]["easy"] == [0, 2] and ox.ground_truth[1]["bbx"] == OX_BOXES[1]
    assert ox.image_ids == rop["ox"]["qimlist"] + rop["ox"]["imlist"]
    assert dm.eval_sets("validate") == dm.eval_sets("predict") == [ox, pa]
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and len(dm.val_dataloader()) == 2
    indices = []
    before = torch.get_rng_state()
    for batch in loaders[0]:  # started with a generator of its own: a validation in fit moves no training draw
        assert isinstance(batch["image"], list) and batch["index"].dtype == torch.long
        assert all(t.dtype == torch.float32 and t.shape[0] == 3 and 0 <= t.min() and t.max() <= 1
                   for t in batch["image"])
        indices += batch["index"].tolist()
    assert indices == list(range(2 + N_DB))
    assert torch.equal(torch.get_rng_state(), before)
    # The Paris query box starts at x = -3: outside the image is an error naming the file, not black padding.
    (pa_full,) = RevisitopDataModule(root=rop["root"], datasets=["rparis6k"], max_side=None,
                                     num_workers=0).eval_sets("test")
    with pytest.raises(ValueError, match=r"rparis6k_q_0\.jpg: query box \[-3\.0, 1\.0, 20\.0, 35\.0\].*outside "
                                         r"the 50x30 image"):
        pa_full.dataset[0]
    with pytest.raises(RuntimeError, match="no training data"):
        dm.train_dataloader()


def test_distractors_appended_after_database(rop):
    dm = RevisitopDataModule(root=rop["root"], datasets=["roxford5k", "rparis6k"],
                             distractors=rop["distractors"], max_side=None, num_workers=0)
    ox, pa = dm.eval_sets("test")
    assert ox.name == "roxford5k+1m" and pa.name == "rparis6k+1m"
    assert len(ox.dataset) == 2 + N_DB + 3 and ox.n_database == N_DB + 3
    assert ox.image_ids[2 + N_DB :] == rop["d_names"]
    assert ox.ground_truth[0]["easy"] == [0, 2]  # indices untouched: database still starts at 0
    for k in range(3):
        image = ox.dataset[2 + N_DB + k]["image"]
        assert image.shape == (3, 20, 30 + k) and image[0].mean() > 0.9
    db0 = ox.dataset[2]["image"]
    assert db0.shape == (3, 36, 48)
    limited = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], distractors=rop["distractors"],
                                  max_distractors=2, num_workers=0)
    (es,) = limited.eval_sets("test")
    assert es.name == "roxford5k+2d" and es.n_database == N_DB + 2


def test_distractor_list_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(RevisitopFormatError, match="empty.txt: lists no distractor"):
        read_distractor_list(str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_text("a/b.jpg\n/abs/c.jpg\n")
    with pytest.raises(RevisitopFormatError, match=r"bad.txt: line 2: expected a relative path"):
        read_distractor_list(str(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a/b.jpg\n\xff\xfeb.jpg\n")
    with pytest.raises(RevisitopFormatError, match=r"latin.txt: not UTF-8 text"):
        read_distractor_list(str(latin))


def test_constructor_signature_is_cli_friendly():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RevisitopDataModule, "data")
    cfg = parser.parse_args(["--data.datasets=[roxford5k]", "--data.distractors=/x/revisitop1m.txt"])
    assert cfg.data.datasets == ["roxford5k"] and cfg.data.distractors == "/x/revisitop1m.txt"
    assert cfg.data.max_side == 1024


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_ground_truth_pickle_that_would_run_code_is_refused(tmp_path):
    directory = tmp_path / "evil"
    (directory / "jpg").mkdir(parents=True)
    with open(directory / "gnd_evil.pkl", "wb") as fh:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [],
                                                               "junk": [], "x": _RunsCode()}]}, fh)
    with pytest.raises(RevisitopFormatError, match="refused to load"):
        load_revisitop(str(tmp_path), "evil")
    with open(directory / "gnd_evil.pkl", "wb") as fh:  # numpy index arrays are fine
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0.0, 0.0, 1.0, 1.0], "easy": np.array([0]),
                                                               "hard": np.array([], dtype=np.int64), "junk": []}]}, fh)
    assert load_revisitop(str(tmp_path), "evil").gnd[0]["easy"] == [0]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_ground_truth_with_numpy_arrays_loads_under_every_pickle_protocol(tmp_path, protocol):
    """numpy pickles arrays through other functions under protocols 0 - 2 and 5 (Python 3.14's default)."""
    (tmp_path / "rnp").mkdir()
    cfg = {"imlist": np.array(["a", "b"]), "qimlist": ["q"],
           "gnd": [{"bbx": np.array([0.0, 0.0, 1.5, 1.0]), "easy": np.array([1]), "hard": np.array([0]),
                    "junk": np.array([], dtype=np.int64)}]}
    (tmp_path / "rnp" / "gnd_rnp.pkl").write_bytes(pickle.dumps(cfg, protocol=protocol))
    data = load_revisitop(str(tmp_path), "rnp")
    assert data.imlist == ["a", "b"] and data.gnd[0]["easy"] == [1] and data.gnd[0]["bbx"][2] == 1.5


@pytest.mark.parametrize("key, value", [("gnd", None), ("imlist", None), ("gnd", 3)])
def test_a_top_level_key_of_the_wrong_type_is_named(tmp_path, key, value):
    (tmp_path / "rkey").mkdir()
    cfg = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "rkey" / "gnd_rkey.pkl").write_bytes(pickle.dumps({**cfg, key: value}))
    with pytest.raises(RevisitopFormatError, match=rf"gnd_rkey\.pkl: key '{key}' must be a list, got"):
        load_revisitop(str(tmp_path), "rkey")


# --------------------------------------------------------------------------- issue 12 items 16-18, 20


def test_query_box_is_applied_in_the_stored_frame_then_turned_upright(tmp_path):
    """The ground truth box was drawn on the stored pixels (reference loaders ignore EXIF orientation)."""
    directory = tmp_path / "rrot"
    cfg = _make_dataset(str(directory), "rrot", [(60, 40)], [[5.0, 2.0, 45.0, 30.0]], 7)
    query = directory / "jpg" / f"{cfg['qimlist'][0]}.jpg"
    stored = Image.open(query).convert("RGB")
    stored.save(query, quality=98, exif=_exif_orientation(6))  # a portrait photo stored landscape
    stored = Image.open(query).convert("RGB")
    (es,) = RevisitopDataModule(root=str(tmp_path), datasets=["rrot"], max_side=None,
                                num_workers=0).eval_sets("test")
    got = es.dataset[0]["image"]
    crop = np.asarray(stored.crop((5, 2, 45, 30)))
    ref = torch.from_numpy(np.ascontiguousarray(np.rot90(crop, k=-1))).permute(2, 0, 1).float() / 255
    assert got.shape == ref.shape == (3, 40, 28)
    assert torch.equal(got, ref)


def test_query_box_in_the_upright_frame_as_the_cvnet_tester(tmp_path):
    """``box_frame: upright``: the image is turned upright per EXIF first and the box cropped from that
    (``cv2.imread`` applies EXIF orientation in the official CVNet tester); the config for it says so."""
    from PIL import ImageOps

    directory = tmp_path / "rrot"
    cfg = _make_dataset(str(directory), "rrot", [(60, 40)], [[5.0, 2.0, 35.0, 50.0]], 7)
    query = directory / "jpg" / f"{cfg['qimlist'][0]}.jpg"
    Image.open(query).convert("RGB").save(query, quality=98, exif=_exif_orientation(6))
    (es,) = RevisitopDataModule(root=str(tmp_path), datasets=["rrot"], max_side=None, box_frame="upright",
                                box_rounding="truncate", num_workers=0).eval_sets("test")
    upright = ImageOps.exif_transpose(Image.open(query)).convert("RGB")
    assert upright.size == (40, 60)
    ref = torch.from_numpy(np.asarray(upright.crop((5, 2, 35, 50))).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(es.dataset[0]["image"], ref)
    with pytest.raises(ValueError, match="box_frame must be one of"):
        RevisitopDataModule(root=str(tmp_path), datasets=["rrot"], box_frame="rotated")
    config = yaml.safe_load((REPO / "experiments/eval_cvnet_revisitop.yaml").read_text())
    assert config["data"]["init_args"]["box_frame"] == "upright"


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_zero_distractors_means_none(rop):
    dm = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], distractors=rop["distractors"],
                             max_distractors=0, num_workers=0)
    (es,) = dm.eval_sets("test")
    assert es.name == "roxford5k" and es.n_database == N_DB and len(es.image_ids) == 2 + N_DB
    assert len(read_distractor_list(rop["distractors"], 0)) == 0
    with pytest.raises(ValueError, match="max_distractors must be >= 0"):
        read_distractor_list(rop["distractors"], -1)
    # the distractor options without the list would evaluate the plain set under its plain name: refused
    for unused in ({"max_distractors": 1000}, {"distractors_root": str(rop["root"])}):
        with pytest.raises(ValueError, match=f"{next(iter(unused))} set without distractors"):
            RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], num_workers=0, **unused)


def test_large_sets_hold_names_and_paths_compactly(rop):
    from datamodules._compact import JoinedPaths, StringArray

    dm = RevisitopDataModule(root=rop["root"], datasets=["roxford5k"], distractors=rop["distractors"], num_workers=0)
    (es,) = dm.eval_sets("test")
    assert isinstance(es.image_ids, StringArray) and isinstance(es.dataset.paths, JoinedPaths)
    assert es.image_ids.data.dtype.kind == "S"  # one bytes array, not Python strings
    assert list(es.image_ids) == rop["ox"]["qimlist"] + rop["ox"]["imlist"] + rop["d_names"]
    assert es.image_ids[-1] == "0b/img_c.jpg" and es.dataset.paths[-1].endswith(os.path.join("jpg", "0b/img_c.jpg"))
    assert es.dataset.paths[0].endswith(os.path.join("roxford5k", "jpg", "roxford5k_q_0.jpg"))


@pytest.mark.parametrize("payload", [
    # numpy's _reconstruct (an allowed global) called with arguments it rejects -> TypeError inside load()
    b"\x80\x04cnumpy.core.multiarray\n_reconstruct\n(I1\nI2\ntR.",
    # OrderedDict (allowed) called with a non-iterable -> TypeError
    b"\x80\x04ccollections\nOrderedDict\n(I5\ntR.",
])
def test_malformed_pickle_calling_allowed_globals_badly_is_a_format_error(tmp_path, payload):
    (tmp_path / "rbad").mkdir()
    (tmp_path / "rbad" / "gnd_rbad.pkl").write_bytes(payload)
    with pytest.raises(RevisitopFormatError, match=r"gnd_rbad\.pkl: not a readable pickle \(TypeError"):
        load_revisitop(str(tmp_path), "rbad")


def test_items_carry_their_resize_factor_per_axis_and_batches_stack_them(tmp_path):
    """Heads measuring pixel distances in the original image (DELG's RANSAC threshold) read each image's
    size as given over its original's: per axis for a whole image (the rounded sides), the whole image's
    factor for a query crop (scaled by it)."""
    from retrieval_lightning.data.loaders import collate_eval

    directory = tmp_path / "rfac"
    _make_dataset(str(directory), "rfac", [(60, 40)], [[5.0, 2.0, 45.0, 30.0]], 3)
    (es,) = RevisitopDataModule(root=str(tmp_path), datasets=["rfac"], max_side=25, num_workers=0).eval_sets("test")
    query, db = es.dataset[0], es.dataset[1]
    assert query["resize_factor"] == (25 / 60, 25 / 60)
    assert db["image"].shape[1:] == (19, 25)  # 36 x 48 stored: round(36 * 25 / 48) = 19
    assert db["resize_factor"] == (19 / 36, 25 / 48) and 19 / 36 != 25 / 48
    batch = collate_eval([query, db, {"image": torch.zeros(3, 2, 2), "index": 9}])
    assert batch["resize_factor"].dtype == torch.float64
    assert batch["resize_factor"].tolist() == [[25 / 60, 25 / 60], [19 / 36, 25 / 48], [1.0, 1.0]]
