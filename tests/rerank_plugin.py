"""A re-ranking head from a separate test distribution, unknown to the core.

``acme_cosine_rerank`` (role verifier) stores, per image, the GeM (p=3) descriptor of conv5 at
scale 1 and scores a pair by the cosine of the two: with ``eval_scales: [1.0]`` and an untrained
``gem_arcface`` head (identity whitening), that is exactly the global similarity, so under weighted
fusion the re-ranked metrics must equal the global-only ones. ``sign: -1`` reverses the shortlist.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_SOURCE = '''
import torch
import torch.nn.functional as F

from retrieval_lightning.head import EntryKind, VerifierHead
from retrieval_lightning.layers import GeM


class CosineRerankHead(VerifierHead):
    scoring_only = ("sign",)  # the stored descriptor does not depend on it

    def __init__(self, stage: str = "conv5", sign: float = 1.0) -> None:
        super().__init__()
        self.stages = (stage,)
        self.stage = stage
        self.sign = sign
        self.gem = GeM(p=3.0)

    def _build(self, stage_channels, num_classes):
        self.dim = stage_channels[self.stage]

    def losses(self, features, labels):
        return {}

    def entry_kinds(self):
        return {"descriptor": EntryKind("float32", (self.dim,)), "rows": EntryKind("float16", (2,), ragged=True)}

    def extract_entries(self, images, features_at):
        out = []
        for image in images:
            desc = F.normalize(self.gem(features_at(image[None])[self.stage]), dim=-1)[0]
            rows = torch.zeros(int(image.shape[1]) % 3 + 1, 2, dtype=torch.float16)  # ragged, size follows the image
            out.append({"descriptor": desc.float().cpu(), "rows": rows})
        return out

    def score(self, query, candidates, seeds):
        assert len(seeds) == len(candidates)
        db = torch.stack([c["descriptor"].float() for c in candidates])
        return self.sign * (db @ query["descriptor"].float())
'''


def make_rerank_distribution(root: Path) -> None:
    """Write the plugin module and a ``.dist-info`` declaring it into ``root`` (put it on PYTHONPATH)."""
    (root / "acme_rerank.py").write_text(PLUGIN_SOURCE)
    info = root / "acme_rerank-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rerank\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[retrieval_lightning.heads]\nacme_cosine_rerank = acme_rerank:CosineRerankHead\n")
