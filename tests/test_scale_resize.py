"""eval_resize: the multi-scale descriptor's resizing, checked against OpenCV (the official CVNet
tester's library, and for ``bilinear`` the same half-pixel sampling as DELG's tf.image.resize)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.layers.scale_resize import (
    area_matrix, linear_matrix, resize_to_scale, scaled_size, separable_resize,
)
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.registry import HEADS
from retrieval_lightning.retrieval.writer import ShardWriter, completed_indices
from retrieval_lightning.trainer import extraction_identity

SIZES = [(37, 53), (100, 77), (129, 96)]
SCALES = [0.7071, 0.5, 1.4142]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _cv2(img: np.ndarray, scale: float, dsize: tuple[int, int] | None = None) -> np.ndarray:
    inter = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    if dsize is not None:
        return cv2.resize(img, dsize, interpolation=inter)
    return cv2.resize(img, None, fx=scale, fy=scale, interpolation=inter)


def _batch(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / (255.0 if img.dtype == np.uint8 else 1.0)


@pytest.mark.parametrize("scale", SCALES)
def test_opencv_kernels_equal_cv2_resize_in_float(scale: float) -> None:
    """Area shrinking and bilinear enlarging with ``fx = fy = scale``: OpenCV maps pixels with the
    requested factor, not the ratio of the rounded sizes; float images show it exactly."""
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, i).astype(np.float32) / 255
        ref = _cv2(img, scale)
        size = scaled_size(h, w, scale)
        assert ref.shape[:2] == size
        matrix = area_matrix if scale < 1 else linear_matrix
        got = separable_resize(_batch(img), matrix(h, size[0], 1 / scale), matrix(w, size[1], 1 / scale))
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", SCALES)
def test_opencv_mode_equals_cv2_on_8bit_images_and_is_within_one_level_off_them(scale: float) -> None:
    """The tester resizes decoded 8-bit images: those go through cv2.resize itself (its fixed-point
    bilinear differs from exact weights by one level on some pixels). An image resized in float before
    takes the exact kernels, rounded to 8-bit levels: within one level of cv2 on its rounded copy."""
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, 10 + i)
        ref = _cv2(img, scale).astype(np.float64)
        got = resize_to_scale(_batch(img).float(), scale, "opencv")[0].permute(1, 2, 0).double().numpy() * 255
        np.testing.assert_array_equal(got.round(), ref)
        assert np.abs(got - got.round()).max() < 1e-3
        off_levels = _batch(img).float() * (254.6 / 255.0)  # no longer on 8-bit levels
        got = resize_to_scale(off_levels, scale, "opencv")[0].permute(1, 2, 0).double().numpy() * 255
        diff = np.abs(got - _cv2(np.round(img * (254.6 / 255.0)).astype(np.uint8), scale))
        assert diff.max() <= 1.0 + 1e-4  # rounding before (cv2's copy) or after (the mode) moves a level at most


def test_bilinear_mode_rounds_sizes_and_samples_at_half_pixel_centres() -> None:
    img = _image(37, 53, 3).astype(np.float32) / 255
    got = resize_to_scale(_batch(img), 1.4142, "bilinear")
    assert tuple(got.shape[-2:]) == (52, 75)  # round(52.33), round(74.95); floor gives 74
    ref = cv2.resize(img, (75, 52), interpolation=cv2.INTER_LINEAR)  # dsize: the ratio of sizes, as TF
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=1e-6, rtol=0)
    small = resize_to_scale(_batch(img), 0.7071, "bilinear")
    ref = cv2.resize(img, (37, 26), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(small[0].permute(1, 2, 0).numpy(), ref, atol=1e-6, rtol=0)


def test_default_mode_is_the_antialiased_resize_it_always_was() -> None:
    x = torch.rand(1, 3, 37, 53)
    for scale in SCALES:
        expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
        assert torch.equal(resize_to_scale(x, scale), expected)
    assert resize_to_scale(x, 1.0, "opencv") is x
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        resize_to_scale(x, 0.5, "lanczos")


def test_a_one_pixel_side_keeps_a_pixel_at_every_scale_and_the_image_is_described() -> None:
    """A 1 x 300 image at scale 0.7071 would be 0 px wide: the resize (and so `test`, `extract` and `search`)
    failed on it with an interpolate error naming no image. Each mode keeps one pixel."""
    x = torch.from_numpy(_image(1, 300, 9)).permute(2, 0, 1)[None].float() / 255
    for mode in ("antialias", "bilinear", "opencv"):
        for scale in (0.25, 0.5, 0.7071, 1.4142):
            out = resize_to_scale(x, scale, mode)
            assert out.shape[-2:] == scaled_size(1, 300, scale), (mode, scale)
            assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": HEADS.get("gem_arcface")()},
                             eval_scales=[0.7071, 1.0, 1.4142]).eval()
    for image in (x[0], x[0].transpose(1, 2), torch.rand(3, 1, 1)):
        assert torch.isfinite(module.embed_image(image)).all()


def test_module_records_eval_resize_and_the_descriptor_follows_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": HEADS.get("gem_arcface")()},
                             eval_resize="opencv").eval()
    path = tmp_path / "m.ckpt"
    module.save_checkpoint(path)
    loaded = RetrievalModule.load_from_checkpoint(path).eval()
    assert loaded.eval_resize == "opencv"
    image = torch.from_numpy(_image(75, 99, 5)).permute(2, 0, 1).float() / 255
    opencv = loaded.embed_image(image)
    loaded.eval_resize = "antialias"
    assert not torch.allclose(opencv, loaded.embed_image(image), atol=1e-6)
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": HEADS.get("gem_arcface")()},
                        eval_resize="cubic")


def test_extraction_identity_names_the_resize() -> None:
    """A store extracted with another resize is another store."""
    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": HEADS.get("gem_arcface")()})
    data = SimpleNamespace(hparams={"max_side": 96})
    default = extraction_identity(module, data)
    assert default["eval_resize"] == "antialias"
    module.eval_resize = "opencv"
    assert extraction_identity(module, data)["eval_resize"] == "opencv"
    assert extraction_identity(module, data) != default


def test_identities_follow_the_backbone_preprocessing() -> None:
    """The backbone's normalisation is a buffer outside the state dict and its input order an argument:
    either changes every descriptor, so each changes the identity of extracted features, of stored
    re-ranking entries, and what ``search`` accepts."""
    from retrieval_lightning.retrieval.store import identity_differences
    from retrieval_lightning.search_cli import check_store_matches

    def module(verifier: dict | None = None, **backbone: object) -> RetrievalModule:
        torch.manual_seed(0)
        heads = {"global": HEADS.get("gem_arcface")(),
                 "verifier": HEADS.get("cvnet_verifier")(width=8, **(verifier or {}))}
        return RetrievalModule(Backbone("resnet18", stages=("conv4", "conv5"), **backbone), heads)

    data = SimpleNamespace(hparams={"max_side": 96})
    plain = module()
    for other in (module(input_order="bgr"), module(mean=(0.5, 0.5, 0.5)), module(pre_activation=("conv4",))):
        assert extraction_identity(other, data) != extraction_identity(plain, data)
        assert other.entry_identity() != plain.entry_identity()
        store = SimpleNamespace(identity=extraction_identity(plain, data), path="features/store")
        with pytest.raises(ValueError, match="another model or settings.*backbone"):
            check_store_matches(other, store)
    check_store_matches(module(), SimpleNamespace(identity=extraction_identity(plain, data), path="s"))
    # scales are evaluation options, not weights: search describes its queries as the store was extracted
    from retrieval_lightning.search_cli import adopt_store_evaluation

    single, store = module(), SimpleNamespace(identity=extraction_identity(plain, data), path="s")
    single.eval_scales, single.eval_resize = (1.0,), "opencv"
    with pytest.raises(ValueError, match="eval_scales"):
        check_store_matches(single, store)
    adopt_store_evaluation(single, store)
    assert (single.eval_scales, single.eval_resize) == (plain.eval_scales, plain.eval_resize)
    check_store_matches(single, store)
    # how pairs are scored is not what is stored: another scoring batch or dtype keeps the store
    scored = module({"score_dtype": "float32", "batch_size": 16})
    assert scored.entry_identity() == plain.entry_identity()
    bordered = module({"border": 1}).entry_identity()
    assert bordered != plain.entry_identity()  # this one changes the entries, and the refusal names it
    assert identity_differences(plain.entry_identity(), bordered) == [
        "'heads.verifier.1.border': store has 0, expected 1"]


def test_extraction_identity_follows_head_options(tmp_path: Path) -> None:
    """A head's extraction options are arguments, not weights: another value is another store, so
    a rerun with another keypoint budget is refused instead of finding the old shards done."""
    def identity(max_keypoints: int) -> dict:
        torch.manual_seed(0)
        heads = {"global": HEADS.get("gem_arcface")(), "local": HEADS.get("delg_local")(max_keypoints=max_keypoints)}
        module = RetrievalModule(Backbone("resnet18", stages=("conv4", "conv5")), heads)
        return extraction_identity(module, SimpleNamespace(hparams={"max_side": 96}))

    assert identity(500) == identity(500)
    assert identity(400)["heads"]["local"][1]["max_keypoints"] == 400
    writer = ShardWriter(tmp_path, rank=0, shard_size=4, identity=identity(500))
    writer.add({"index": np.arange(3), "global": np.zeros((3, 2), dtype=np.float16)})
    writer.close()
    assert completed_indices(tmp_path, identity(500)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="different model or config.*heads"):
        completed_indices(tmp_path, identity(400))
