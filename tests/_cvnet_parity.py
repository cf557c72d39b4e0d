"""#9's real-photo parity, shared by the core test (scikit-image photos) and the shared-photos test."""

from __future__ import annotations

import torch

from _cvnet_reference import head_state_as_official, reference_logits
from heads.cvnet_verifier import CVNetVerifierHead
from retrieval_lightning.backbone import Backbone


def fast_and_reference_probabilities(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first image against the others through the ImageNet EfficientNet-Lite0 and a random
    32-wide verifier: the fast path's scores from stored fp32 entries, and the straightforward
    CVNet's probabilities from the conv4 maps."""
    backbone = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4",)).eval()
    torch.manual_seed(0)
    head = CVNetVerifierHead(width=32, entry_dtype="float32")
    head.build(backbone.stage_channels, 0)
    head.eval()
    with torch.no_grad():
        entries = head.extract_entries(images, backbone)
        scores = head.score(entries[0], entries[1:], list(range(1, len(images))))
        conv4 = [backbone(image[None])["conv4"] for image in images]
        state = head_state_as_official(head.state_dict())
        ref = torch.cat([reference_logits(state, conv4[0], c) for c in conv4[1:]])
    return scores, ref.softmax(-1)[:, 1]
