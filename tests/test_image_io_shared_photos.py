"""Decoding of the real photos of ../shared/data: bit-identical to OpenCV (the official CVNet tester's
reader) and to PIL, EXIF orientation included."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import SHARED_PHOTOS as PHOTOS
from retrieval_lightning.data.io import load_image

pytestmark = [
    pytest.mark.shared_photos,
    pytest.mark.skipif(not PHOTOS.is_dir(), reason="needs ../shared/data/photos"),
]


def test_shared_photos_jpegs_decode_exactly_as_opencv_and_pil() -> None:
    paths = sorted(PHOTOS.rglob("*.jpg"))
    assert len(paths) >= 20
    for path in paths:
        ours = load_image(path).permute(1, 2, 0).numpy()
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        with Image.open(path) as img:
            pil = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        np.testing.assert_array_equal(ours, bgr[..., ::-1], err_msg=str(path))
        np.testing.assert_array_equal(ours, pil, err_msg=str(path))
