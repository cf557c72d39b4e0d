"""A plugin author's mistakes that the core names in one line, found by writing outside plugins of every role
(a review): each surfaced before as an error deep inside another head, or as an attribute error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import GlobalHead
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.registry import HEADS


def sparse_module() -> RetrievalModule:
    torch.manual_seed(0)
    heads = {"global": HEADS.get("gem_arcface")(dim=8), "verifier": HEADS.get("cvnet_verifier")(width=8),
             "sparsifier": HEADS.get("gumbel_sparsifier")(width=8, keep_ratio=0.5)}
    return RetrievalModule(Backbone("resnet18", weights=None, stages=("conv4", "conv5")), heads).eval()


def test_a_densify_that_breaks_the_verifiers_form_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``sparsify`` returns was checked, what ``densify`` returns was not: an outside sparsifier's
    mistake surfaced as a reshape or key error inside cvnet_verifier, naming neither it nor the entry."""
    module = sparse_module()
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 80)]
    good = module.rerank_scores(images[0], images)
    sparsifier = module.heads["sparsifier"]
    real = sparsifier.densify
    monkeypatch.setattr(sparsifier, "densify", lambda entries: entries)  # the stored form handed on as it is
    with pytest.raises(UsageError, match=r"GumbelSparsifierHead\.densify returned entries \[.*'level0_pos'.*\] for "
                                         r"image 0, but its entry_kinds\(\) declares \['level0', 'level0_hw'"):
        module.rerank_scores(images[0], images)
    monkeypatch.setattr(sparsifier, "densify", lambda entries: [{**e, "level1": e["level1"][:, :4]}
                                                                for e in real(entries)])
    with pytest.raises(UsageError, match=r"GumbelSparsifierHead\.densify entry 'level1' of image 0 has shape "
                                         r"\(\d+, 4\), but entry_kinds\(\) declares \(n, 8\)"):
        module.rerank_scores(images[0], images)
    monkeypatch.setattr(sparsifier, "densify", lambda entries: real(entries)[:1])
    with pytest.raises(UsageError, match=r"GumbelSparsifierHead\.densify returned 1 entries for 2 images"):
        module.rerank_scores(images[0], images)
    monkeypatch.setattr(sparsifier, "densify", real)
    assert torch.equal(module.rerank_scores(images[0], images), good)


def test_a_head_that_skips_super_init_is_named() -> None:
    class NoSuper(GlobalHead):
        def __init__(self) -> None:  # forgets super().__init__()
            self.p = 3.0

    with pytest.raises(UsageError, match=r"head NoSuper \('global'\) was not initialised as a module: its __init__ "
                                         r"must call super\(\).__init__\(\) first"):
        RetrievalModule(Backbone("resnet18", weights=None, stages=("conv5",)), {"global": NoSuper()})
    assert isinstance(HEADS.get("gem_arcface")(), nn.Module)
