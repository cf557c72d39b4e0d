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


class Pictures(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 32, 32), i / self.n), "index": i}


def test_an_outside_datamodules_eval_sets_are_checked_before_anything_is_embedded() -> None:
    """A malformed ground truth or an unknown protocol was named only after the whole set had been embedded (and
    its entries extracted: hours at GLDv2 scale); one EvalSet instead of a list failed as a TypeError."""
    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.errors import DataFormatError
    from retrieval_lightning.evaluation import checked_eval_sets

    class FolderData:
        pass

    def revisitop(gt) -> EvalSet:
        return EvalSet("folder", Pictures(6), 2, "revisitop", gt)

    good = [{"easy": [0], "hard": [1], "junk": [3]}, {"easy": [2, 3], "hard": []}]
    assert checked_eval_sets([revisitop(good)], FolderData())[0].name == "folder"
    with pytest.raises(UsageError, match=r"FolderData.eval_sets\(stage\) must return a list of EvalSet, got EvalSet"):
        checked_eval_sets(revisitop(good), FolderData())
    with pytest.raises(UsageError, match=r"asks for protocol 'roxford'; known: \['gldv2_recognition'"):
        checked_eval_sets([EvalSet("folder", Pictures(6), 2, "roxford", good)], FolderData())
    for gt, message in [(good[:1], r"one entry per query \(2\), got 1"),
                        ([good[0], {"easy": [4]}], r"gnd\[1\] has no 'hard' key"),
                        ([good[0], {"easy": [4], "hard": []}], r"query 1 names database index 4, but the database "
                                                                r"holds 4 images")]:
        with pytest.raises(DataFormatError, match=r"eval set 'folder' of FolderData: its revisitop ground truth is "
                                                  r"malformed: .*" + message):
            checked_eval_sets([revisitop(gt)], FolderData())
    gldv2 = {"solution": {"q0": ["d0"]}, "query_ids": ["q0", "q1"], "db_ids": ["d0", "d1", "d2"]}
    with pytest.raises(DataFormatError, match=r"'db_ids' holds 3 entries for 4 items"):
        checked_eval_sets([EvalSet("g", Pictures(6), 2, "gldv2_retrieval", gldv2)], FolderData())


def test_a_loader_count_other_than_the_eval_sets_is_named(tmp_path) -> None:
    """Each evaluation loader is the eval set of its position: an extra loader was evaluated as nothing and a
    missing one left its set out, silently."""
    import lightning.pytorch as pl

    from retrieval_lightning.data.types import EvalSet

    class TwoLoaders(pl.LightningDataModule):
        def eval_sets(self, stage):
            return [EvalSet("folder", Pictures(6), 2, "revisitop", [{"easy": [0], "hard": []}] * 2)]

        def test_dataloader(self):
            loader = torch.utils.data.DataLoader(Pictures(6), batch_size=3)
            return [loader, loader]

    module = RetrievalModule(Backbone("resnet18", weights=None, stages=("conv5",)),
                             {"global": HEADS.get("gem_arcface")()}, eval_scales=[1.0])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(UsageError, match=r"TwoLoaders gives 2 test loaders for 1 eval sets \(\['folder'\]\): one "
                                         r"loader per eval set, in order"):
        trainer.test(module, datamodule=TwoLoaders())


def test_extract_names_a_predict_loader_count_other_than_the_eval_sets(tmp_path) -> None:
    from types import SimpleNamespace

    import retrieval_lightning.trainer as trainer_module

    spec = SimpleNamespace(name="folder", dataset=list(range(5)), n_queries=2, image_ids=[])
    inner = SimpleNamespace(setup=lambda stage: None, eval_sets=lambda stage: [spec],
                            predict_dataloader=lambda: [None, None], prepare_data_per_node=True)
    one = trainer_module._OneEvalSet(inner, 0, None, tmp_path, {}, SimpleNamespace(output_dir=None))
    with pytest.raises(UsageError, match=r"SimpleNamespace gives 2 predict loaders for 1 eval sets \(\['folder'\]\)"):
        one.setup("predict")
