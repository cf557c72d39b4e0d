"""cvnet_verifier on real photos: fast scoring from stored entries == the straightforward CVNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _cvnet_parity import fast_and_reference_probabilities
from conftest import SHARED_PHOTOS

pytestmark = [
    pytest.mark.shared_photos,
    pytest.mark.skipif(not SHARED_PHOTOS.is_dir(), reason="../shared/data/photos not available"),
]
NAMES = ["aloeL.jpg", "aloeR.jpg", "baboon.jpg", "home.jpg"]


def _photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    path = next(SHARED_PHOTOS.rglob(name))
    image = Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def test_shared_photos_fast_scores_match_the_straightforward_cvnet() -> None:
    images = [_photo(n, s) for n, s in zip(NAMES, [(160, 192), (160, 192), (144, 176), (176, 160)])]
    scores, reference = fast_and_reference_probabilities(images)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=0)
    assert reference.std() > 0
