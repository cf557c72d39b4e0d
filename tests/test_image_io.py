"""Image loading: agreement with PIL, mode conversion, EXIF orientation, max_side, errors, skipping."""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from retrieval_lightning.data.io import (
    ImageLoadError,
    LoadPolicy,
    SkipPolicy,
    apply_orientation,
    exif_orientation,
    image_size,
    load_image,
    load_image_or_skip,
    load_image_sized,
    to_float,
)


def _photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild noise and four distinct quadrants (so flips show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 7.0)], axis=-1)
    img[: height // 2, : width // 2, 0] = 230
    img[height // 2 :, width // 2 :, 2] = 20
    img += rng.normal(0, 4, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _pil_reference(path: Path) -> np.ndarray:
    """What PIL says the upright RGB pixels are, as (H, W, 3)."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).numpy()


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_jpeg_matches_pil(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_photo_like(48, 40)), tmp_path / "a.jpg", quality=92)
    out = load_image(path)
    ref = _pil_reference(path)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 40, 48)
    diff = np.abs(_hwc(out).astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5


def test_progressive_jpeg_matches_pil(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_photo_like(40, 32)), tmp_path / "p.jpg", progressive=True)
    diff = np.abs(_hwc(load_image(path)).astype(int) - _pil_reference(path).astype(int))
    assert diff.max() <= 2


def _skimage_jpegs() -> list[Path]:
    import skimage

    return sorted((Path(skimage.__file__).parent / "data").glob("*.jpg"))


@pytest.mark.parametrize("path", _skimage_jpegs(), ids=lambda p: p.name)
def test_real_jpeg_decodes_exactly_as_opencv_and_pil(path: Path) -> None:
    """The official CVNet tester reads images with ``cv2.imread`` and PIL-based code with PIL: at full size
    the torchvision path must give the same bytes, or features shift before any model sees them."""
    import cv2

    ours = _hwc(load_image(path))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None
    np.testing.assert_array_equal(ours, bgr[..., ::-1])
    np.testing.assert_array_equal(ours, _pil_reference(path))


def test_png_is_lossless(tmp_path: Path) -> None:
    pixels = _photo_like(33, 21)
    path = _save(Image.fromarray(pixels), tmp_path / "a.png")
    np.testing.assert_array_equal(_hwc(load_image(path)), pixels)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "JPEG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
    ],
)
def test_modes_become_rgb_like_pil(tmp_path: Path, mode: str, fmt: str) -> None:
    rgb = Image.fromarray(_photo_like(24, 18, seed=1))
    if mode == "RGBA":
        alpha = Image.fromarray(np.tile(np.arange(24, dtype=np.uint8) * 10, (18, 1)))
        img = rgb.copy()
        img.putalpha(alpha)
    elif mode == "LA":
        img = rgb.convert("LA")
    else:
        img = rgb.convert(mode)
    path = _save(img, tmp_path / f"img.{fmt.lower()}", format=fmt)
    with Image.open(path) as check:
        assert check.mode == mode, "the file must really store the mode under test"
    out = load_image(path)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 18, 24)
    tolerance = 2 if fmt == "JPEG" else 0
    assert np.abs(_hwc(out).astype(int) - _pil_reference(path).astype(int)).max() <= tolerance


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpeg_on_the_draft_path(tmp_path: Path, mode: str) -> None:
    path = _save(Image.fromarray(_photo_like(128, 96, seed=2)).convert(mode), tmp_path / "d.jpg", quality=95)
    out = load_image(path, max_side=32)
    assert tuple(out.shape) == (3, 24, 32)
    ref = np.asarray(Image.fromarray(_pil_reference(path)).resize((32, 24), Image.BILINEAR))
    assert np.abs(_hwc(out).astype(int) - ref.astype(int)).mean() < 4


def test_palette_with_transparency_converts_without_warning(tmp_path: Path) -> None:
    """PIL warns on every such file converted straight to RGB; a data loader must not spam that."""
    img = Image.fromarray(_photo_like(16, 12)).convert("P")
    path = _save(img, tmp_path / "t.png", transparency=bytes([0, 128, 255] * 20))
    with Image.open(path) as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)
        expected = np.asarray(check.convert("RGBA").convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(path)
    np.testing.assert_array_equal(_hwc(out), expected)


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path: Path) -> None:
    grey = (np.arange(20 * 10, dtype=np.uint32).reshape(10, 20) * 300).astype(np.uint16)
    path = _save(Image.fromarray(grey), tmp_path / "g16.png")
    out = load_image(path)
    expected = np.round(grey.astype(np.float64) / 257.0).astype(np.uint8)
    for channel in range(3):
        assert np.abs(out[channel].numpy().astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("max_side", [None, 30, 16])
def test_exif_orientation_matches_exif_transpose(tmp_path: Path, orientation: int, max_side: int | None) -> None:
    """None: torchvision path; 30: full decode then resize; 16: PIL draft path (64 // 16 >= 2)."""
    path = _save(Image.fromarray(_photo_like(64, 40)), tmp_path / "r.jpg", quality=95, exif=_exif(orientation))
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")
    out = load_image(path, max_side=max_side)
    if max_side is None:
        ref = np.asarray(upright)
        assert np.abs(_hwc(out).astype(int) - ref.astype(int)).max() <= 2
    else:
        w, h = upright.size
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        ref = np.asarray(upright.resize(size, Image.BILINEAR))
        assert tuple(out.shape) == (3, size[1], size[0])
        assert np.abs(_hwc(out).astype(int) - ref.astype(int)).mean() < 6
    swapped = orientation >= 5
    if max_side is None:
        assert tuple(out.shape[1:]) == ((64, 40) if swapped else (40, 64))
    assert image_size(path) == upright.size == ((40, 64) if swapped else (64, 40))


def test_orientation_on_png_path(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_photo_like(30, 20)), tmp_path / "r.png", exif=_exif(6))
    out = load_image(path)
    np.testing.assert_array_equal(_hwc(out), _pil_reference(path))
    assert image_size(path) == (20, 30)


@pytest.mark.parametrize(
    ("width", "height", "max_side"), [(200, 120, 50), (120, 200, 50), (200, 120, 150), (91, 37, 40)]
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_max_side_caps_long_side_and_keeps_aspect(
    tmp_path: Path, width: int, height: int, max_side: int, fmt: str
) -> None:
    path = _save(Image.fromarray(_photo_like(width, height)), tmp_path / f"m.{fmt.lower()}", format=fmt)
    out = load_image(path, max_side=max_side)
    out_h, out_w = out.shape[1:]
    assert max(out_h, out_w) == max_side
    assert abs(out_w / out_h - width / height) < 2.0 / min(out_h, out_w)
    with Image.open(path) as img:
        ref = np.asarray(img.convert("RGB").resize((out_w, out_h), Image.BILINEAR))
    assert np.abs(_hwc(out).astype(int) - ref.astype(int)).mean() < 4


def test_max_side_never_upscales(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_photo_like(40, 30)), tmp_path / "s.jpg")
    assert tuple(load_image(path, max_side=1000).shape) == (3, 30, 40)
    assert tuple(load_image(path, max_side=40).shape) == (3, 30, 40)


def test_large_jpeg_uses_reduced_dct_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.fromarray(_photo_like(256, 160)), tmp_path / "big.jpg")
    calls: list[tuple[int, int]] = []
    original = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        result = original(self, mode, size)
        calls.append(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    out = load_image(path, max_side=32)
    assert tuple(out.shape) == (3, 20, 32)
    assert calls == [(32, 20)]
    load_image(path, max_side=200)
    assert len(calls) == 1, "a shrink by less than 2x must not ask PIL for a draft"


@pytest.mark.parametrize("max_side", [0, -3, 2.5, True])
def test_bad_max_side_rejected(tmp_path: Path, max_side: object) -> None:
    path = _save(Image.fromarray(_photo_like(8, 8)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=max_side)  # type: ignore[arg-type]


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    Image.fromarray(_photo_like(64, 48)).save(good, quality=90)
    raw = good.read_bytes()
    rng = np.random.default_rng(3)
    files = {
        "truncated_jpeg": raw[: len(raw) // 2],
        "random_bytes": rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "jpeg_magic_then_garbage": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "empty": b"",
        "text_named_png": b"not an image at all\n",
    }
    paths = {}
    for name, payload in files.items():
        suffix = ".png" if name == "text_named_png" else ".jpg"
        paths[name] = tmp_path / f"{name}{suffix}"
        paths[name].write_bytes(payload)
    paths["missing"] = tmp_path / "does_not_exist.jpg"
    paths["directory"] = tmp_path / "a_directory.jpg"
    paths["directory"].mkdir()
    return paths


_BAD_FILES = [
    "truncated_jpeg",
    "random_bytes",
    "jpeg_magic_then_garbage",
    "empty",
    "text_named_png",
    "missing",
    "directory",
]


@pytest.mark.parametrize("name", _BAD_FILES)
@pytest.mark.parametrize("max_side", [None, 16])
def test_bad_files_raise_naming_the_path(tmp_path: Path, name: str, max_side: int | None) -> None:
    path = _corrupt_files(tmp_path)[name]
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_side=max_side)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert info.value.cause
    assert isinstance(info.value, RuntimeError)


def test_error_messages_say_why(tmp_path: Path) -> None:
    files = _corrupt_files(tmp_path)
    causes = {}
    for name in ["truncated_jpeg", "empty", "missing", "text_named_png"]:
        with pytest.raises(ImageLoadError) as info:
            load_image(files[name])
        causes[name] = info.value.cause
    assert "truncated" in causes["truncated_jpeg"]
    assert "empty" in causes["empty"]
    assert "not found" in causes["missing"]
    assert "unsupported" in causes["text_named_png"]


def test_image_size_errors_name_the_path(tmp_path: Path) -> None:
    files = _corrupt_files(tmp_path)
    for name in ["missing", "random_bytes", "empty"]:
        with pytest.raises(ImageLoadError) as info:
            image_size(files[name])
        assert str(files[name]) in str(info.value)


def test_image_load_error_survives_pickling_and_dataloader_reraise() -> None:
    err = ImageLoadError("/data/x.jpg", "file is empty")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.cause, str(back)) == (err.path, err.cause, str(err))
    rewrapped = ImageLoadError(f"Caught ImageLoadError in DataLoader worker process 0.\n{err}")
    assert "/data/x.jpg" in str(rewrapped) and rewrapped.path is None


def test_skip_policy_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _corrupt_files(tmp_path)
    good = tmp_path / "good.jpg"
    policy = SkipPolicy()
    assert policy.on_error == "skip"
    with caplog.at_level(logging.WARNING, logger="retrieval_lightning.data.io"):
        results = [load_image_or_skip(p, policy, max_side=16) for p in (files["empty"], good, files["missing"])]
    assert results[0] is None and results[2] is None
    assert results[1] is not None and max(results[1].shape[1:]) == 16
    assert policy.skipped == [str(files["empty"]), str(files["missing"])]
    assert policy.count == 2
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert str(files["empty"]) in warned[0].getMessage() and "empty" in warned[0].getMessage()
    assert str(files["missing"]) in warned[1].getMessage()


def test_raise_policy_raises_and_records_nothing(tmp_path: Path) -> None:
    policy = LoadPolicy()
    with pytest.raises(ImageLoadError, match="does_not_exist"):
        load_image_or_skip(tmp_path / "does_not_exist.jpg", policy)
    assert policy.count == 0 and policy.skipped == []
    assert LoadPolicy(on_error="skip").on_error == "skip"
    with pytest.raises(ValueError, match="on_error"):
        LoadPolicy(on_error="ignore")  # type: ignore[arg-type]


def test_to_float() -> None:
    img = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    out = to_float(img)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.2, 1.0]]]))
    with pytest.raises(TypeError, match="uint8"):
        to_float(out)


def test_cuda_request_falls_back_cleanly(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_photo_like(40, 30)), tmp_path / "c.jpg", exif=_exif(8))
    out = load_image(path, device="cuda")
    assert out.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    reference = load_image(path)
    assert tuple(out.shape) == tuple(reference.shape) == (3, 40, 30)
    assert (out.cpu().int() - reference.int()).abs().max() <= 3


# --------------------------------------------------------------------------- issue 12 item 21: bombs and huge files


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """120 MP: over the limit, yet under PIL's own hard error (179 MP), so only our check stops it."""
    bomb = _png_header_only(tmp_path / "bomb.png", 12_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageLoadError, match=r"bomb\.png.*120000000 pixels, more than the limit"):
            load_image(bomb)
    small = _save(Image.fromarray(_photo_like(40, 30)), tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match=r"small\.png.*1200 pixels, more than the limit of 1000"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=1200).shape == (3, 30, 40)
    # 200 MP is over PIL's own hard limit (179 MP): a larger max_pixels asked for here still applies
    huge = _png_header_only(tmp_path / "huge.png", 20_000, 10_000)
    with pytest.raises(ImageLoadError, match=r"huge\.png.*200000000 pixels, more than the limit of 100000000"):
        load_image(huge, max_pixels=10**8)
    with pytest.raises(ImageLoadError, match=r"huge\.png") as raised:  # allowed: the (absent) pixels fail
        load_image(huge, max_pixels=10**9)
    assert "more than the limit" not in str(raised.value) and Image.MAX_IMAGE_PIXELS == 89_478_485


def test_oversized_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval_lightning.data import io as image_io

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(image_io.MAX_FILE_BYTES + 1)  # sparse: costs no disk
    allocated: list[int] = []
    real = bytearray
    monkeypatch.setattr(image_io, "bytearray", lambda n=0: allocated.append(n) or real(n), raising=False)
    with pytest.raises(ImageLoadError, match=rf"huge\.jpg.*{image_io.MAX_FILE_BYTES + 1} bytes, more than the limit"):
        load_image(huge)
    assert allocated == []
    small = _save(Image.fromarray(_photo_like(40, 30)), tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match=r"small\.png': file is \d+ bytes, more than the limit of 100"):
        load_image(small, max_bytes=100)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
def test_every_lossless_format_is_turned_once_and_keeps_its_stored_frame(tmp_path: Path, fmt: str,
                                                                         orientation: int) -> None:
    """Pillow turns a TIFF upright itself (its header size already upright, its pixels upright when decoded):
    turned again here, a TIFF of orientation 2 - 8 came out wrong in every path (a review: 180 degrees off for 6),
    and ``orient=False`` (revisitop's ``box_frame: stored``) gave the upright frame."""
    pixels = _photo_like(40, 24)
    path = _save(Image.fromarray(pixels), tmp_path / f"o.{fmt.lower()}", exif=_exif(orientation),
                 **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    np.testing.assert_array_equal(_hwc(load_image(path)), upright)
    assert image_size(path) == (upright.shape[1], upright.shape[0])
    stored, size = load_image_sized(path, orient=False)
    np.testing.assert_array_equal(_hwc(stored), pixels)
    assert size == (24, 40) and load_image_sized(path)[1] == upright.shape[:2]
    np.testing.assert_array_equal(_hwc(apply_orientation(stored, exif_orientation(path))), upright)
    assert tuple(load_image(path, max_side=20).shape[1:]) == ((20, 12) if orientation >= 5 else (12, 20))


def test_orient_false_keeps_the_stored_frame(tmp_path: Path) -> None:
    pixels = _photo_like(40, 24)
    path = _save(Image.fromarray(pixels), tmp_path / "rot.png", exif=_exif(6))
    assert load_image(path).shape == (3, 40, 24)
    stored = load_image(path, orient=False)
    assert np.array_equal(_hwc(stored), pixels)


def test_the_torchvision_decoder_is_found_without_its_private_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchvision.io.image._has_image_ops`` is private and not in every torchvision setup.cfg allows: its
    absence made the import fail, so every JPEG went through PIL (nvjpeg never used) without a word."""
    from torchvision.io import image as torchvision_image

    from retrieval_lightning.data import io

    assert io._image_ops_available(torchvision_image)
    monkeypatch.delattr(torchvision_image, "_has_image_ops", raising=False)
    assert io._image_ops_available(torchvision_image)  # the registered op answers instead
    assert io._load_torchvision_decoder() is not None
