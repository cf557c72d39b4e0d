"""The ``match`` command: SIFT features, correspondence drawing, errors naming the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from retrieval_lightning.data.io import ImageLoadError
from retrieval_lightning.match import draw_matches, model_features, run_match, sift_features
from retrieval_lightning.retrieval.geometry import match_and_verify


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A photo and an affine-warped copy of it (known db -> query model), as PNG files."""
    root = tmp_path_factory.mktemp("match")
    img = cv2.resize(skdata.astronaut(), (240, 200), interpolation=cv2.INTER_AREA)
    warp = np.array([[0.95, 0.08, 6.0], [-0.06, 1.02, -4.0]])  # query (a) px -> db (b) px
    warped = cv2.warpAffine(img, warp, (260, 210), borderMode=cv2.BORDER_REFLECT)
    Image.fromarray(img).save(root / "a.png")
    Image.fromarray(warped).save(root / "b.png")
    return root / "a.png", root / "b.png", warp


def test_run_match_prints_inliers_and_draws(pair: tuple[Path, Path, np.ndarray], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, b, warp = pair
    out = tmp_path / "sub" / "m.png"
    assert run_match([str(a), str(b), "--out", str(out), "--num-features", "300"]) == 0
    printed = capsys.readouterr().out
    inliers = int(printed.split("inliers: ")[1].split()[0])
    assert inliers >= 40
    with Image.open(out) as im:  # both drawn 210 px high (240 x 200 -> 252 x 210) under the count's band
        assert im.width == 252 + 260 and 210 + 14 < im.height < 210 + 40 and im.format == "PNG"
    assert run_match([str(a), str(b), "--out", str(out), "--num-features", "300", "--max-side", "130"]) == 0
    with Image.open(out) as im:  # both shrunk to a long side of 130 before matching (130 x 108, 130 x 105)
        assert im.width == 130 + round(130 * 108 / 105) and 108 + 14 < im.height < 108 + 40


def test_sift_pair_recovers_the_warp(pair: tuple[Path, Path, np.ndarray]) -> None:
    a, b, warp = pair
    fa = sift_features(np.asarray(Image.open(a)), 300)
    fb = sift_features(np.asarray(Image.open(b)), 300)
    assert fa[0].shape == (300, 2) and fa[0].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fa[1], axis=1), 1.0, atol=1e-5)  # RootSIFT rows are unit L2
    res = match_and_verify(*fa, *fb, threshold=3.0)
    forward = np.vstack([warp, [0, 0, 1]])
    mapped = cv2.perspectiveTransform(res.query_points.reshape(-1, 1, 2).astype(np.float64), forward)
    assert np.median(np.linalg.norm(mapped.reshape(-1, 2) - res.db_points, axis=1)) < 1.5


def test_draw_matches_size_and_lines(tmp_path: Path) -> None:
    a = np.zeros((30, 40, 3), np.uint8)
    b = np.zeros((50, 20), np.uint8)  # grayscale is accepted
    q_kp = np.array([[5, 5], [30, 20], [10, 25], [35, 5], [20, 15]], np.float32)
    desc = np.eye(5, 8, dtype=np.float32)
    res = match_and_verify(q_kp, desc, q_kp * 0.5, desc, threshold=1.0)
    assert res.inliers == 5
    path = draw_matches(a, b, res, tmp_path / "m.png")
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    # both images at the taller one's height (a: 30 -> 50 px high, 67 wide), the count in a band above them
    band = pixels.shape[0] - 50
    assert pixels.shape[1] == 67 + 20 and band > 14
    label = pixels[:band]
    assert (label == (200, 0, 0)).all(axis=2).any() and (label == 255).all(axis=2).mean() > 0.7
    shown = pixels[band:]
    assert shown[:, :67].any()  # lines drawn over the black query
    assert shown[30:, 67:].sum() == 0  # the lower part of b: black, no line reaches it (its points are 0.5x a's)
    assert shown[:, 67:].any()


def test_a_large_photo_beside_a_small_one_is_drawn_at_one_height_and_a_panorama_lower(tmp_path: Path) -> None:
    """Pasted at their own sizes, a 6000-px photo made the query a thumbnail under a label sized by the whole
    canvas, which covered it; a very wide image made a strip thousands of px long (a review of the pictures)."""
    from retrieval_lightning.match import MATCH_HEIGHT
    from retrieval_lightning.pair_picture import MAX_PANEL_ASPECT

    small, large = np.zeros((56, 75, 3), np.uint8), np.zeros((3000, 4000, 3), np.uint8)
    res = match_and_verify(np.float32([[10, 10], [60, 40], [30, 50], [5, 45]]), np.eye(4, 8, dtype=np.float32),
                           np.float32([[400, 400], [3600, 2400], [2000, 2800], [300, 2600]]),
                           np.eye(4, 8, dtype=np.float32), threshold=50.0)
    with Image.open(draw_matches(small, large, res, tmp_path / "big.png")) as im:
        band = im.height - MATCH_HEIGHT
        assert im.width == 1286 + 1280 and 0 < band < 100  # both 960 px high: 75 x 56 -> 1286 x 960
    with Image.open(draw_matches(np.zeros((21, 320, 3), np.uint8), np.zeros((320, 21, 3), np.uint8), res,
                                 tmp_path / "wide.png")) as im:
        assert im.width <= MAX_PANEL_ASPECT * 320 + 21 + 1


def test_unreadable_image_names_the_file(pair: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        run_match([str(pair[0]), str(bad), "--out", str(tmp_path / "x.png")])
    with pytest.raises(ImageLoadError, match="missing.png"):
        run_match([str(tmp_path / "missing.png"), str(pair[1])])
    with pytest.raises(ValueError, match="--checkpoint"):
        run_match([str(pair[0]), str(pair[1]), "--features", "model"])
    for option, value in (("--max-side", "-5"), ("--num-features", "0")):  # argparse: usage line, status 2
        with pytest.raises(SystemExit) as usage:
            run_match([str(pair[0]), str(pair[1]), option, value])
        assert usage.value.code == 2


def test_model_features_reads_rerank_entries() -> None:
    """The adapter reads the entry keys the integrator's ``rerank_entries`` returns."""

    class Module:
        def rerank_entries(self, images: list[torch.Tensor], resize_factors=None) -> list[dict[str, torch.Tensor]]:
            (img,) = images
            assert img.shape == (3, 10, 12) and img.dtype == torch.float32 and float(img.max()) <= 1.0
            assert resize_factors == [(1.0, 1.0)]
            return [{"keypoints": torch.ones(4, 2), "descriptor_bits": torch.zeros(4, 16, dtype=torch.uint8),
                     "attention": torch.ones(4)}]

    kp, desc = model_features(Module(), np.full((10, 12, 3), 255, np.uint8))
    assert kp.shape == (4, 2) and kp.dtype == np.float32 and desc.dtype == np.uint8 and desc.shape == (4, 16)


def test_a_model_matches_at_1024_px_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """DELG caps inference images at 1024 px; a phone photo at full size ran a machine out of memory."""
    import retrieval_lightning.match as match

    sizes = []

    def record(path, max_side=None):
        sizes.append(max_side)
        raise KeyboardInterrupt  # stop before anything is loaded

    monkeypatch.setattr(match, "read_rgb", record)
    monkeypatch.setattr(match, "model_image", record)
    for args in (["--checkpoint", "m.ckpt"], ["--checkpoint", "m.ckpt", "--max-side", "0"],
                 ["--checkpoint", "m.ckpt", "--max-side", "640"], [], ["--max-side", "800"]):
        with pytest.raises(KeyboardInterrupt):
            run_match(["a.jpg", "b.jpg", *args])
    assert sizes == [match.MODEL_MAX_SIDE, None, 640, match.SIFT_MAX_SIDE, 800]


def test_a_model_pair_is_verified_with_the_heads_matching_settings(pair: tuple[Path, Path, np.ndarray],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The inliers `match --checkpoint` prints are the score the model's re-ranking gives the pair:
    the head's matching, threshold and trial budget, not the defaults."""
    import retrieval_lightning.match as match
    from heads.delg_local import DelgLocalHead
    from retrieval_lightning.module import RetrievalModule

    class Loaded:
        rerank_head = DelgLocalHead(matching="one_way", threshold=12.0, max_iters=77)
        heads = {"local": rerank_head}

        def eval(self) -> None:
            pass

        def rerank_entries(self, images: list[torch.Tensor], resize_factors=None) -> list[dict[str, torch.Tensor]]:
            factors.append(resize_factors)
            # the same 12 places in both images, given in the original's pixels (as DELG's keypoints are)
            grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="xy"), -1)
            return [{"keypoints": grid.reshape(-1, 2) * 50 + 10, "descriptors": torch.eye(12, 128).half()}]

        def rerank_entry_kinds(self, database: bool = True) -> dict:
            return self.rerank_head.entry_kinds()

    monkeypatch.setattr(RetrievalModule, "load_from_checkpoint", staticmethod(lambda path: Loaded()))
    seen, factors, drawn = {}, [], []

    def verify(*features, **options):
        seen.update(options)
        return match_and_verify(*features, **options)

    monkeypatch.setattr(match, "match_and_verify", verify)
    monkeypatch.setattr(match, "draw_matches", lambda a, b, result, out: drawn.append(result) or Path(out))
    a, b, _ = pair  # 240 x 200 and 260 x 210
    assert run_match([str(a), str(b), "--checkpoint", "m.ckpt", "--out", str(tmp_path / "m.png")]) == 0
    assert (seen["matching"], seen["threshold"], seen["max_iters"]) == ("one_way", 12.0, 77)
    assert factors == [[(1.0, 1.0)], [(1.0, 1.0)]] and drawn[-1].inliers == 12
    # shrunk as `search` shrinks a query: the head is told by how much (RANSAC's pixels are the original's),
    # and the inliers are drawn on the shrunk images
    shrunk = [str(a), str(b), "--checkpoint", "m.ckpt", "--max-side", "130", "--out", str(tmp_path / "s.png")]
    assert run_match(shrunk) == 0
    (fa,), (fb,) = factors[-2:]
    assert fa == (108 / 200, 130 / 240) and fb == (105 / 210, 130 / 260)
    np.testing.assert_allclose(drawn[-1].query_points, drawn[0].query_points * np.float32([fa[1], fa[0]]), rtol=1e-6)
    np.testing.assert_allclose(drawn[-1].db_points, drawn[0].db_points * np.float32([fb[1], fb[0]]), rtol=1e-6)
    assert seen["reference"] is False and seen["distinct_px"] == 1.0
    # --reference on top of a head's settings (which name `reference` too) is the reference path, not a clash
    seen.clear()
    assert run_match([str(a), str(b), "--checkpoint", "m.ckpt", "--reference", "--out", str(tmp_path / "r.png")]) == 0
    assert seen["reference"] is True and seen["threshold"] == 12.0 and "max_iters" not in seen  # USAC's budget


def test_a_local_head_that_explains_itself_is_asked_by_match(pair: tuple[Path, Path, np.ndarray], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A local head whose score is not an inlier count explains itself, as ``explain_pair`` asks it: ``match``
    decided by the entries' names alone and drew inliers captioned as if they were the score."""
    import retrieval_lightning.match as match
    from heads.delg_local import DelgLocalHead
    from retrieval_lightning.head import PairExplanation
    from retrieval_lightning.module import RetrievalModule

    class OwnScore(DelgLocalHead):
        def explain(self, query, candidate):
            return PairExplanation(score=0.25, matches=np.zeros((0, 4)), strengths=np.zeros(0), caption="own")

    class Loaded:
        rerank_head = OwnScore()
        heads = {"local": rerank_head}

        def eval(self) -> None:
            pass

        def rerank_entry_kinds(self, database: bool = True) -> dict:
            return self.rerank_head.entry_kinds()

        def explain_pair(self, a, b) -> PairExplanation:
            return self.rerank_head.explain({}, {})

    monkeypatch.setattr(RetrievalModule, "load_from_checkpoint", staticmethod(lambda path: Loaded()))
    monkeypatch.setattr(match, "match_and_verify", lambda *a, **k: pytest.fail("inliers matched for the picture"))
    a, b, _ = pair
    assert run_match([str(a), str(b), "--checkpoint", "m.ckpt", "--out", str(tmp_path / "m.png")]) == 0
    assert "score: 0.2500" in capsys.readouterr().out and (tmp_path / "m.png").is_file()


def test_a_verifier_that_does_not_explain_still_gives_its_score(pair: tuple[Path, Path, np.ndarray], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A plugin verifier without ``explain``: match printed only an error, not the score it was asked for."""
    from test_rerank import tiny_module

    module = tiny_module()
    checkpoint = tmp_path / "cosine.ckpt"
    module.save_checkpoint(checkpoint)
    a, b, _ = pair
    assert run_match([str(a), str(b), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.png")]) == 0
    printed = capsys.readouterr()
    image_a, image_b = (torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                        for p in (a, b))
    expected = module.rerank_scores(image_a, [image_b])
    assert printed.out == f"score: {float(expected[0]):.4f}\n"
    assert printed.err.startswith("no picture: CosineRerankHead does not explain its scores")
    assert not (tmp_path / "m.png").exists()


def test_out_naming_a_directory_puts_the_picture_inside_it(tmp_path: Path) -> None:
    from retrieval_lightning.outputs import picture_path

    assert picture_path(tmp_path, "search.png") == tmp_path / "search.png"
    assert picture_path(tmp_path / "res.xyz", "search.png") == tmp_path / "res.xyz"  # written as PNG anyway
    assert picture_path(tmp_path / "results", "search.png") == tmp_path / "results.png"


def test_an_output_path_through_a_file_is_refused_before_the_work(tmp_path: Path) -> None:
    """search --out, match --out, extract --output_dir, import-checkpoint's output, a download folder: a file in
    the way was a traceback at the end of the work (mkdir), after a whole search or conversion."""
    from retrieval_lightning.errors import UsageError
    from retrieval_lightning.importers import run_import
    from retrieval_lightning.outputs import check_folder_can_be_made, file_path, picture_path

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match=r"--out .*afile/sub/x\.png: its folder .*afile/sub: is inside .*afile, "
                                         r"a file"):
        picture_path(tmp_path / "afile" / "sub" / "x.png", "search.png")
    with pytest.raises(UsageError, match=r"--output_dir .*afile: is a file, not a folder"):
        check_folder_can_be_made(tmp_path / "afile", "--output_dir")
    assert check_folder_can_be_made(tmp_path / "new" / "deeper", "--output_dir") == tmp_path / "new" / "deeper"
    with pytest.raises(UsageError, match="output .* is a folder; name the file to write"):
        file_path(tmp_path, "output")
    with pytest.raises(UsageError, match="import-checkpoint's output .*afile/m.ckpt: its folder"):
        run_import(["cvnet", str(tmp_path / "missing.pyth"), str(tmp_path / "afile" / "m.ckpt")])


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch) -> None:
    """A read-only place (permissions, a read-only mount, /sys) was a traceback with status 1 at the end of
    the work: `search` printed its results, then lost its picture."""
    import errno
    import tempfile

    from retrieval_lightning.errors import UsageError
    from retrieval_lightning.outputs import check_folder_can_be_made, picture_path

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # as root, chmod would not stop the write
    with pytest.raises(UsageError, match=r"--out .*results/x\.png: its folder .*results: cannot write there "
                                         r"\(Permission denied\)"):
        picture_path(tmp_path / "results" / "x.png", "search.png")
    with pytest.raises(UsageError, match=r"--output_dir .*feat: cannot write there"):
        check_folder_can_be_made(tmp_path / "feat", "--output_dir")


def test_a_pair_picture_explains_only_the_marks_it_draws(tmp_path: Path) -> None:
    """The caption's legend names heat maps and lines only when the head gave them."""
    from retrieval_lightning.head import PairExplanation
    from retrieval_lightning.pair_picture import MIN_PANEL_HEIGHT, draw_explanation, legend

    lines_only = PairExplanation(score=0.5, matches=np.array([[0.1, 0.2, 0.3, 0.4]]), strengths=np.ones(1))
    heat_only = PairExplanation(score=0.5, matches=np.zeros((0, 4)), strengths=np.zeros(0),
                                query_heat=np.ones((2, 2)), candidate_heat=np.zeros((2, 2)))
    assert "Line colours" in legend(lines_only) and "Heat" not in legend(lines_only)
    assert "Heat colours" in legend(heat_only) and "Line" not in legend(heat_only)
    path = draw_explanation(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 3), np.uint8), heat_only,
                            tmp_path / "p.png")
    panel = max(MIN_PANEL_HEIGHT, 20)
    with Image.open(path) as picture:  # no lines to draw: two square panels over the caption
        assert picture.width == 2 * panel and picture.height > panel
    # a panorama beside a portrait: the panorama lower (3 heights wide at most), the portrait at full height, the
    # lines' ends on each panel's own height; the caption in type sized with the picture (was PIL's 11 px)
    from retrieval_lightning.pair_picture import MAX_PANEL_ASPECT

    wide = PairExplanation(score=0.5, matches=np.array([[0.5, 1.0, 0.5, 1.0]]), strengths=np.ones(1),
                           caption="x " * 400)
    path = draw_explanation(np.zeros((21, 320, 3), np.uint8), np.zeros((320, 21, 3), np.uint8), wide,
                            tmp_path / "wide.png")
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    high = max(MIN_PANEL_HEIGHT, 320)
    panorama, portrait = round(MAX_PANEL_ASPECT * high), round(21 * high / 320)
    assert picture.width == panorama + portrait  # was 5876 px: the 320 x 21 image blown up to 384 px high
    assert pixels[round(21 * panorama / 320) + 2:high, :panorama // 3].min() == 255  # white below the panorama
    assert pixels[high - 6:high, panorama:].max() > 200  # the line ends at the portrait's foot, on the black
    caption = pixels[high + 5:]
    ink_rows = np.flatnonzero((caption < 128).any(axis=(1, 2)))
    assert ink_rows.size and np.diff(ink_rows).max() >= 5  # several lines, with gaps between them
