"""cvnet_verifier on real photos: fast scoring from stored entries == the straightforward CVNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _cvnet_reference import head_state_as_official, reference_logits
from conftest import SHARED_PHOTOS
from heads.cvnet_verifier import CVNetVerifierHead
from retrieval_lightning.backbone import Backbone

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
    backbone = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4",)).eval()
    torch.manual_seed(0)
    head = CVNetVerifierHead(width=32, entry_dtype="float32")
    head.build(backbone.stage_channels, 0)
    head.eval()
    images = [_photo(n, s) for n, s in zip(NAMES, [(160, 192), (160, 192), (144, 176), (176, 160)])]
    with torch.no_grad():
        entries = head.extract_entries(images, backbone)
        scores = head.score(entries[0], entries[1:], [1, 2, 3])
        conv4 = [backbone(image[None])["conv4"] for image in images]
        state = head_state_as_official(head.state_dict())
        ref = torch.cat([reference_logits(state, conv4[0], c) for c in conv4[1:]])
    torch.testing.assert_close(scores, ref.softmax(-1)[:, 1], atol=1e-4, rtol=0)
    assert ref[:, 1].std() > 0 or ref[:, 0].std() > 0
