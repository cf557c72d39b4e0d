"""Tests of the minilandmarks builder: official formats, determinism, disjoint splits, recorded geometry."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from datamodules import minilandmarks_build as mb

SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
HEX16 = re.compile(r"^[0-9a-f]{16}$")
SMALL = dict(include_skimage=False, image_size=64, views_train=3, views_db=4, views_distractor=2, progress=False)


@pytest.fixture(scope="module")
def skimage_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default build from the scikit-image photos alone."""
    return mb.build_minilandmarks(tmp_path_factory.mktemp("ml"), progress=False)


@pytest.fixture()
def small_photos(tmp_path: Path) -> Path:
    """A folder of seven real skimage photos (one two-view scene) for quick builds."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "motorcycle_right.png", "coins.png"):
        shutil.copy(mb.skimage_data_dir() / name, folder / name)
    return folder


def _views(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "views.jsonl").read_text().splitlines()]


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def check_formats(out: Path, image_size: int) -> None:
    """Everything a GLDv2 or revisitop reader relies on."""
    gld = out / "gldv2"
    with (gld / "train.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "url", "landmark_id"]
    ids = [r[0] for r in rows[1:]]
    assert ids and all(HEX16.match(i) for i in ids) and len(set(ids)) == len(ids)
    label_of = {r[0]: int(r[2]) for r in rows[1:]}
    with (gld / "train_clean.csv").open(newline="") as fh:
        clean = list(csv.reader(fh))
    assert clean[0] == ["landmark_id", "images"]
    grouped = {int(r[0]): r[1].split(" ") for r in clean[1:]}
    assert sorted(i for images in grouped.values() for i in images) == sorted(ids)
    assert all(label_of[i] == lm for lm, images in grouped.items() for i in images)
    for i in ids:
        path = gld / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG" and max(im.size) == image_size

    rop = out / "revisitop" / "minilandmarks"
    gnd = pickle.loads((rop / "gnd_minilandmarks.pkl").read_bytes())
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert len(gnd["gnd"]) == len(qimlist) > 0 and not set(imlist) & set(qimlist)
    assert len(set(imlist)) == len(imlist)
    for name in imlist + qimlist:
        assert not name.endswith(".jpg") and (rop / "jpg" / f"{name}.jpg").is_file()
    for name, g in zip(qimlist, gnd["gnd"]):
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        with Image.open(rop / "jpg" / f"{name}.jpg") as im:
            w, h = im.size
        x1, y1, x2, y2 = g["bbx"]
        assert all(isinstance(v, float) for v in g["bbx"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        lists = [g[k] for k in ("easy", "hard", "junk")]
        for lst in lists:
            assert lst == sorted(lst) and all(isinstance(i, int) and 0 <= i < len(imlist) for i in lst)
        assert not (set(lists[0]) & set(lists[1]) or set(lists[0]) & set(lists[2]) or set(lists[1]) & set(lists[2]))
        assert g["easy"] and g["hard"], f"query {name} lacks an easy or a hard positive"
    labelled = {imlist[i] for g in gnd["gnd"] for k in ("easy", "hard", "junk") for i in g[k]}
    distractors = {v["name"] for v in _views(out) if v["role"] == "distractor"}
    assert distractors and not distractors & labelled and distractors <= set(imlist)


def test_skimage_build_formats(skimage_build: Path) -> None:
    out = skimage_build
    check_formats(out, 256)
    counts = json.loads((out / ".complete").read_text())["counts"]
    assert counts["train_landmarks"] >= 8 and counts["queries"] >= 8 and counts["distractors"] > 0


def test_train_and_test_photos_are_disjoint(skimage_build: Path) -> None:
    out = skimage_build
    views = _views(out)
    train = {v["source_sha256"] for v in views if v["split"] == "train"}
    test = {v["source_sha256"] for v in views if v["split"] == "test"}
    assert train and test and not train & test
    scenes = {split: {v["scene"] for v in views if v["split"] == split} for split in ("train", "test")}
    assert not scenes["train"] & scenes["test"]
    # the two motorcycle photos are one scene, so they share a split and (in train) a landmark
    moto = {v["split"] for v in views if v["source"].startswith("skimage/motorcycle_")}
    assert len(moto) == 1
    textures = {v["source"] for v in views if v["role"] == "distractor"}
    assert {"skimage/brick.png", "skimage/grass.png", "skimage/gravel.png"} <= textures


def _grey(path: Path, blur: float) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L").filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample at continuous coordinates whose pixel centres are at half-integers."""
    x = np.clip(xy[:, 0] - 0.5, 0, img.shape[1] - 1.001)
    y = np.clip(xy[:, 1] - 0.5, 0, img.shape[0] - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    return top * (1 - fy) + (img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx) * fy


def test_recorded_homography_matches_pixels(skimage_build: Path) -> None:
    """Source pixels warped by the recorded H line up with the view's pixels to under half a pixel."""
    out = skimage_build
    views = [v for v in _views(out) if v["params"]["photometric"]["blur_sigma"] == 0 and v["visible_fraction"] > 0.3]
    rng = np.random.default_rng(0)
    shifts = [(dx, dy) for dx in (-1.0, -0.5, 0.0, 0.5, 1.0) for dy in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    best, at_zero, far = [], [], []
    for v in views[:: max(1, len(views) // 25)]:
        hom = np.array(v["homography"])
        quad = np.array(v["params"]["quad"])
        corners = np.c_[quad, np.ones(4)] @ hom.T
        vw, vh = v["size"]
        np.testing.assert_allclose(corners[:, :2] / corners[:, 2:], [[0, 0], [vw, 0], [vw, vh], [0, vh]], atol=1e-6)
        sw, sh = v["source_size"]
        scale = float(np.sqrt(abs(np.linalg.det(hom[:2, :2]))))
        src = _grey(mb.skimage_data_dir() / v["source"].split("/", 1)[1], max(1.0, 1.0 / scale))
        view = _grey(out / v["file"], 1.0)
        pts = rng.uniform([0, 0], [sw, sh], (4000, 2))
        proj = np.c_[pts, np.ones(len(pts))] @ hom.T
        uv = proj[:, :2] / proj[:, 2:]
        keep = (proj[:, 2] > 0) & (uv[:, 0] >= 3) & (uv[:, 0] < vw - 3) & (uv[:, 1] >= 3) & (uv[:, 1] < vh - 3)
        for x1, y1, x2, y2, _ in v["params"]["occluders"]:
            keep &= ~((uv[:, 0] >= x1 - 3) & (uv[:, 0] < x2 + 3) & (uv[:, 1] >= y1 - 3) & (uv[:, 1] < y2 + 3))
        pts, uv = pts[keep], uv[keep]
        if len(pts) < 200:
            continue
        a = _bilinear(src, pts)
        corr = [np.corrcoef(a, _bilinear(view, uv + s))[0, 1] for s in shifts]
        best.append(shifts[int(np.argmax(corr))])
        at_zero.append(corr[shifts.index((0.0, 0.0))])
        far.append(np.corrcoef(a, _bilinear(view, uv + [0.15 * vw, 0.15 * vh]))[0, 1])
    assert len(best) >= 10
    assert np.median(at_zero) > 0.8 and np.median(at_zero) > np.median(far) + 0.3, (np.median(at_zero), np.median(far))
    centred = sum(abs(dx) <= 0.5 and abs(dy) <= 0.5 for dx, dy in best)
    exact = sum(s == (0.0, 0.0) for s in best)
    assert centred == len(best) and exact >= 0.6 * len(best), best


def _visible(v: dict, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proj = np.c_[grid, np.ones(len(grid))] @ np.array(v["homography"]).T
    uv = proj[:, :2] / proj[:, 2:]
    vw, vh = v["size"]
    inframe = (proj[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < vw) & (uv[:, 1] >= 0) & (uv[:, 1] < vh)
    covered = np.zeros(len(grid), dtype=bool)
    for x1, y1, x2, y2, _ in v["params"]["occluders"]:
        covered |= (uv[:, 0] >= x1) & (uv[:, 0] < x2) & (uv[:, 1] >= y1) & (uv[:, 1] < y2)
    return inframe, inframe & ~covered


def test_labels_agree_with_recorded_overlap(skimage_build: Path) -> None:
    """Recompute the overlap of each (query, view of the same photo) from views.jsonl alone."""
    out = skimage_build
    views = {v["name"]: v for v in _views(out)}
    gnd = pickle.loads((out / "revisitop/minilandmarks/gnd_minilandmarks.pkl").read_bytes())
    checked = 0
    for qname, g in zip(gnd["qimlist"], gnd["gnd"]):
        q = views[qname]
        sw, sh = q["source_size"]
        cells = (np.arange(40) + 0.5) / 40
        gx, gy = np.meshgrid(cells * sw, cells * sh)
        grid = np.c_[gx.ravel(), gy.ravel()]
        q_in, _ = _visible(q, grid)
        for label in ("easy", "hard", "junk"):
            for i in g[label]:
                v = views[gnd["imlist"][i]]
                assert v["scene"] == q["scene"] and v["labels"][qname] == label
                if v["source_sha256"] != q["source_sha256"]:
                    assert label != "easy"  # another real photo of the scene is never easy
                    continue
                overlap = (q_in & _visible(v, grid)[1]).sum() / q_in.sum()
                assert (overlap < 0.25) == (label == "junk"), (qname, v["name"], overlap, label)
                if label == "easy":
                    assert overlap >= 0.5
                checked += 1
    assert checked > 30


def test_build_is_deterministic_and_config_sensitive(tmp_path: Path, small_photos: Path) -> None:
    a = mb.build_minilandmarks(tmp_path / "a", [small_photos], **SMALL)
    b = mb.build_minilandmarks(tmp_path / "b", [small_photos], **SMALL)
    assert a.name == b.name
    tree = _tree(a)
    assert len(tree) > 30 and tree == _tree(b)
    other = mb.build_minilandmarks(tmp_path / "a", [small_photos], **{**SMALL, "seed": 1})
    assert other != a and _tree(other) != tree and (a / ".complete").is_file()
    check_formats(a, 64)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")], "temporary directories left"


def test_the_build_progress_bar_reaches_its_total(tmp_path: Path, small_photos: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The bar was wrapped around the rendered views but zipped after the plans, so it stopped at N - 1."""
    mb.build_minilandmarks(tmp_path, [small_photos], **{**SMALL, "progress": True})
    frames = re.findall(r"minilandmarks:.*?(\d+)/(\d+)", capsys.readouterr().err)
    assert frames and frames[-1][0] == frames[-1][1], frames[-3:]


def test_second_call_does_not_rebuild(tmp_path: Path, small_photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = mb.build_minilandmarks(tmp_path, [small_photos], **SMALL)
    stamp = (first / ".complete").stat().st_mtime_ns
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: a shared cache stays readable

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt although a complete build exists")

    monkeypatch.setattr(mb, "_build_into", fail)
    assert mb.build_minilandmarks(tmp_path, [small_photos], **SMALL) == first
    assert (first / ".complete").stat().st_mtime_ns == stamp
    (first / ".complete").unlink()  # an incomplete directory is rebuilt, not trusted
    with pytest.raises(AssertionError, match="rebuilt"):
        mb.build_minilandmarks(tmp_path, [small_photos], **SMALL)


def test_changed_photo_bytes_change_the_directory(tmp_path: Path, small_photos: Path) -> None:
    first = mb.build_minilandmarks(tmp_path, [small_photos], **SMALL)
    with Image.open(small_photos / "coins.png") as im:
        im.rotate(90).save(small_photos / "coins.png")
    assert mb.build_minilandmarks(tmp_path, [small_photos], **SMALL) != first


def test_corrupt_photo_raises_naming_it(tmp_path: Path, small_photos: Path) -> None:
    (small_photos / "sub").mkdir()
    (small_photos / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    root = tmp_path / "out"
    with pytest.raises(mb.PhotoReadError, match=r"sub/broken\.jpg"):
        mb.build_minilandmarks(root, [small_photos], **SMALL)
    assert not list(root.iterdir()), "a failed build left files behind"


def test_missing_or_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mb.list_source_photos([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        mb.list_source_photos([tmp_path / "empty"])


def test_scene_grouping_by_stem_manifest_and_dedup(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    (folder / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["graf1.png", "graf3.png", "scenetext01.jpg", "scenetext02.jpg", "001.jpg", "002.jpg",
             "left.jpg", "right.jpg", "aloeL.jpg", "aloeR.jpg", "a/graf1.png", "x.png", "y.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / name)
    shutil.copy(mb.skimage_data_dir() / "camera.png", folder / "camera_copy.png")
    (tmp_path / "MANIFEST.tsv").write_text("scene\tpath\tnote\nduo\tpics/x.png\t\nduo\tpics/y.png\ta texture\n")
    sources = {s.name: s for s in mb.load_photo_sources([folder])}
    scene = {n.split("/", 1)[1]: s.scene for n, s in sources.items()}
    assert scene["graf1.png"] == scene["graf3.png"] != scene["a/graf1.png"]
    assert scene["aloeL.jpg"] == scene["aloeR.jpg"] and scene["left.jpg"] == scene["right.jpg"]
    assert scene["scenetext01.jpg"] != scene["scenetext02.jpg"] and scene["001.jpg"] != scene["002.jpg"]
    assert scene["x.png"] == scene["y.png"] == "pics:duo" and sources["pics/y.png"].texture
    assert "pics/camera_copy.png" not in sources  # byte-identical to the skimage camera, kept once
    assert mb.list_source_photos([folder], include_skimage=False)[-1].name == "y.png"


@pytest.mark.shared_photos
def test_shared_photos_build(tmp_path: Path) -> None:
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"{SHARED_PHOTOS} is absent")
    out = mb.build_minilandmarks(tmp_path, [SHARED_PHOTOS], progress=False)
    check_formats(out, 256)
    with (out / "sources.tsv").open(newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert len(rows) >= 60  # 19 skimage photos + the shared ones that are not copies of them
    for a, b in (("graf1", "graf3"), ("leuvenA", "leuvenB"), ("aloeL", "aloeR"), ("left", "right"), ("aero1", "aero3")):
        ra = next(r for n, r in rows.items() if n.endswith(f"/{a}.png") or n.endswith(f"/{a}.jpg"))
        rb = next(r for n, r in rows.items() if n.endswith(f"/{b}.png") or n.endswith(f"/{b}.jpg"))
        assert ra["scene"] == rb["scene"] and ra["split"] == rb["split"]
    views = _views(out)
    second = [v for v in views if v["role"] == "db" and any(
        w["role"] == "query" and w["scene"] == v["scene"] and w["source"] != v["source"] for w in views)]
    assert second and all(label != "easy" for v in second for label in v["labels"].values())
    assert any(label == "hard" for v in second for label in v["labels"].values())


def test_large_photo_is_reduced_in_the_same_frame() -> None:
    """A photo over the working size is box-reduced, yet a warp in its own frame shows the same pixels."""
    path = mb.skimage_data_dir() / "astronaut.png"
    full = mb._Photo(mb.PhotoSource(path, "a", "a", ""))
    reduced = mb._Photo(mb.PhotoSource(path, "a", "a", ""), max_side=200)
    assert (full.base, reduced.base) == (1, 3) and (reduced.width, reduced.height) == (512, 512)
    quad = np.array([[40.0, 60.0], [400.0, 30.0], [450.0, 480.0], [20.0, 420.0]])
    view = np.array([[0.0, 0.0], [120.0, 0.0], [120.0, 100.0], [0.0, 100.0]])
    want, inside_full = mb._warp(full, mb._homography(quad, view), 120, 100)
    got, inside_reduced = mb._warp(reduced, mb._homography(quad, view), 120, 100)
    shifted, _ = mb._warp(reduced, mb._homography(quad + 4.0, view), 120, 100)
    assert inside_full.all() and inside_reduced.all()
    assert np.abs(got - want).mean() < 0.5 * np.abs(shifted - want).mean()


def test_concurrent_builders_agree(tmp_path: Path, small_photos: Path) -> None:
    """Two builders racing on one root (as DDP ranks would) both return the one complete directory."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(2)  # both enter the build together, so they race rather than run one after the other

    def build(_: int) -> Path:
        start.wait(timeout=60)
        return mb.build_minilandmarks(tmp_path / "out", [small_photos], **SMALL)

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(build, range(2)))
    assert outs[0] == outs[1] and (outs[0] / ".complete").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [outs[0].name]
    check_formats(outs[0], 64)


def test_validation_set_is_named_for_minilandmarks(cache_root: Path) -> None:
    """Validation runs GLDv2's hold-out protocol on the GLDv2-layout split, but its metrics are named for
    the data they measure (val/minilandmarks_holdout/...), not val/gldv2_holdout/..."""
    from datamodules.minilandmarks import MiniLandmarksDataModule

    dm = MiniLandmarksDataModule(root=str(cache_root), build_size=128, num_workers=0)
    dm.prepare_data()
    (val,) = dm.eval_sets("validate")
    assert val.name == "minilandmarks_holdout" and val.protocol == "gldv2_recognition" and val.n_queries > 0
    assert [s.name for s in dm.eval_sets("fit")] == ["minilandmarks_holdout"]
    assert [s.name for s in dm.eval_sets("test")] == ["minilandmarks"]


def test_more_queries_per_landmark_keep_the_training_split(tmp_path: Path, small_photos: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``queries_per_landmark`` adds test queries (for tighter intervals over them) and leaves every training
    file as it was, so models trained on the default build are compared on the larger query set."""
    import pickle

    from datamodules import minilandmarks

    default = mb.build_minilandmarks(tmp_path, [small_photos], **SMALL)
    # the datamodule's own build call (its option passed on), at the small build's settings
    monkeypatch.setattr(minilandmarks, "build_minilandmarks",
                        lambda *args, **kwargs: mb.build_minilandmarks(*args, **{**kwargs, **SMALL}))
    more = minilandmarks.MiniLandmarksDataModule(root=str(tmp_path), photo_dirs=[str(small_photos)],
                                                 queries_per_landmark=4).dataset_dir
    assert more.name != default.name
    assert _tree(more / mb.GLDV2_SUBDIR) == _tree(default / mb.GLDV2_SUBDIR)

    def gnd(root: Path) -> dict:
        (path,) = (root / mb.REVISITOP_SUBDIR).rglob("gnd_*.pkl")
        return pickle.loads(path.read_bytes())

    few, many = gnd(default), gnd(more)
    assert len(many["qimlist"]) == 2 * len(few["qimlist"]) > 0
    assert set(few["qimlist"]) < set(many["qimlist"])  # the default queries are among them, the same views
    assert all(g["easy"] and g["hard"] for g in many["gnd"])
