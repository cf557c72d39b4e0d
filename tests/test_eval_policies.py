"""Evaluation policies of the core (issue 12 items 2, 6, 7): one-batch smoke runs skip metrics,
non-finite descriptors are refused by name, search stays on the module's device."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.evaluation import ALL, AP_PER_QUERY, NonFiniteDescriptorError, evaluate_eval_set
from retrieval_lightning.head_plugins import gem_arcface
from retrieval_lightning.module import RetrievalModule


def eval_set(n_q: int = 2, n_db: int = 6) -> EvalSet:
    gt = [{"easy": [q], "hard": [], "junk": []} for q in range(n_q)]
    return EvalSet("toy", TensorDataset(torch.zeros(n_q + n_db)), n_q, "revisitop", gt,
                   [f"photo_{i}.jpg" for i in range(n_q + n_db)])


@pytest.mark.parametrize("limit, partial", [(1, True), (5, True), (0.5, True), (1.0, False)])
def test_batch_limits_that_cut_the_set_count_as_partial(limit, partial) -> None:
    module = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=8)})
    module._trainer = SimpleNamespace(limit_val_batches=limit, limit_test_batches=limit, fast_dev_run=False)
    assert module._eval_is_partial("val") is partial
    assert module._eval_is_partial("test") is partial


def test_non_finite_descriptors_are_an_error_naming_the_images() -> None:
    desc = F.normalize(torch.randn(8, 4), dim=1)
    desc[5, 2] = float("nan")
    desc[7, 0] = float("inf")
    with pytest.raises(NonFiniteDescriptorError, match=r"2 descriptor\(s\).*photo_5\.jpg.*photo_7\.jpg"):
        evaluate_eval_set(eval_set(), desc)
    with pytest.raises(NonFiniteDescriptorError, match=r"2 descriptor\(s\).*photo_5\.jpg.*photo_7\.jpg"):
        evaluate_eval_set(eval_set(), desc.half(), chunk=3)  # checked in row chunks (a memory-mapped store)


def test_search_runs_on_the_given_device_even_when_cuda_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine running a CPU job
    desc = F.normalize(torch.randn(8, 4), dim=1)
    result = evaluate_eval_set(eval_set(), desc, device=torch.device("cpu"))
    assert 0.0 <= result.metrics["mAP_M"] <= 100.0


def test_unreadable_placeholders_are_counted_beside_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``on_error: skip`` an unreadable image is evaluated as a blank placeholder: the evaluation
    says how many, since the metrics count them as images that match nothing."""
    module = RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=8)}).eval()
    toy = eval_set()
    module._trainer = SimpleNamespace(sanity_checking=False, limit_test_batches=1.0, fast_dev_run=False,
                                      datamodule=SimpleNamespace(eval_sets=lambda stage: [toy]))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    flags = torch.tensor([False] * 5 + [True, False, True])
    with torch.no_grad():
        module._eval_step({"image": images[:4], "index": torch.arange(4), "unreadable": flags[:4]}, 0)
        module._eval_step({"image": images[4:], "index": torch.arange(4, 8), "unreadable": flags[4:]}, 0)
        with pytest.warns(UserWarning, match=r"test: eval set 'toy': 2 of 8 images were unreadable"):
            module._finish_eval("test", "test")
    assert "toy" in module.last_eval


def test_unreadable_database_placeholders_match_nothing_in_every_protocol() -> None:
    """Placeholders were ranked like images: all alike, so one could stand first for a query (a perfect AP from
    a missing positive). A database placeholder is now ranked last for every query, with or without re-ranking
    (the reranked rankings never take it), and GLDv2 neither predicts nor transfers its label."""
    toy = eval_set()
    desc = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    desc[2] = desc[0]  # query 0's only positive (database 0) is its exact copy: rank 1, AP 100
    flags = torch.zeros(8, dtype=torch.bool)
    assert evaluate_eval_set(toy, desc).extra[AP_PER_QUERY]["E"][0] == 100.0
    flags[2] = True  # that positive was unreadable: missed, ranked 6th of 6
    result = evaluate_eval_set(toy, desc, unreadable=flags)
    assert result.extra[AP_PER_QUERY]["E"][0] == pytest.approx(100 * (0 / 5 + 1 / 6) / 2)  # revisitop's AP, rank 6
    assert result.topk[0].tolist()[-1] == 0 and result.topk[1].tolist()[-1] == 0
    reranked = evaluate_eval_set(toy, desc, reranked={ALL: [np.array([3]), np.array([4])]}, unreadable=flags)
    assert reranked.topk[0].tolist()[0] == 3 and reranked.topk[0].tolist()[-1] == 0  # shortlists skip it: test_rerank

    ids = [f"q{i}" for i in range(2)] + [f"d{i}" for i in range(6)]
    gt = {"query_ids": ids[:2], "db_ids": ids[2:], "solution": {"q0": ["d0"], "q1": ["d1"]},
          "db_labels": ["a", "b", "c", "d", "e", "f"]}
    for protocol, key in (("gldv2_retrieval", "mAP@100"), ("gldv2_recognition", "GAP")):
        gld = EvalSet("gld", TensorDataset(torch.zeros(8)), 2, protocol,
                      {**gt, "solution": {"q0": ["a"], "q1": ["b"]}} if protocol.endswith("recognition") else gt, ids)
        full = evaluate_eval_set(gld, desc).metrics[key]
        missing = evaluate_eval_set(gld, desc, unreadable=flags).metrics[key]
        assert missing < full, (protocol, full, missing)


def test_an_unreadable_query_retrieves_nothing_in_every_protocol() -> None:
    """A query placeholder was evaluated from its blank image, whose ranking credited it with whatever it
    happened to find (here its one positive, first: AP 100). It now scores AP and P@k 0, with or without
    re-ranking, and predicts nothing for GLDv2; a query without positives stays out of the means."""
    gt = [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [2], "junk": []}, {"easy": [], "hard": [],
                                                                                            "junk": []}]
    toy = EvalSet("toy", TensorDataset(torch.zeros(9)), 3, "revisitop", gt, [f"photo_{i}.jpg" for i in range(9)])
    desc = F.normalize(torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    desc[3], desc[4], desc[5] = desc[0], desc[1], desc[1]  # every query's positives are its exact copies: AP 100
    flags = torch.zeros(9, dtype=torch.bool)
    full = evaluate_eval_set(toy, desc)
    assert full.metrics["mAP_M"] == 100.0 and full.metrics["mP@1_M"] == 100.0
    flags[0] = flags[2] = True  # query 0 (a positive) and query 2 (no positives: not counted anyway) unreadable
    for reranked in (None, {ALL: [np.array([0]), np.array([1, 2]), np.array([3])]}):
        result = evaluate_eval_set(toy, desc, reranked=reranked, unreadable=flags)
        assert result.extra[AP_PER_QUERY]["M"][0] == 0.0 and result.extra[AP_PER_QUERY]["M"][1] == 100.0
        assert np.isnan(result.extra[AP_PER_QUERY]["M"][2])
        assert result.metrics["mAP_M"] == 50.0 and result.metrics["mP@1_M"] == 50.0  # (0 + 100) / 2 queries
        assert result.metrics["mAP_H"] == 100.0  # query 0 has no Hard positive: out of Hard's mean, failed or not
    ids = [f"q{i}" for i in range(3)] + [f"d{i}" for i in range(6)]
    desc[8] = desc[2]  # GLDv2: query 2 has ground truth too (database 5, its copy)
    gld = {"query_ids": ids[:3], "db_ids": ids[3:], "solution": {"q0": ["d0"], "q1": ["d1", "d2"], "q2": ["d5"]}}
    labels = {"query_ids": ids[:3], "db_labels": ["a", "b", "b", "c", "d", "e"],
              "solution": {"q0": ["a"], "q1": ["b"], "q2": ["e"]}}
    flags[2] = False
    for protocol, truth, key in (("gldv2_retrieval", gld, "mAP@100"), ("gldv2_recognition", labels, "top1_accuracy")):
        gld_set = EvalSet("gld", TensorDataset(torch.zeros(9)), 3, protocol, truth, ids)
        assert evaluate_eval_set(gld_set, desc).metrics[key] == 100.0
        assert evaluate_eval_set(gld_set, desc, unreadable=flags).metrics[key] == pytest.approx(200 / 3), protocol


@pytest.mark.parametrize("config", [dict(query_expansion=True, qe_n=1, qe_alpha=0.0),
                                    dict(dba=True, dba_k=2, dba_alpha=0.0)])
def test_placeholders_are_no_neighbour_in_query_expansion_or_dba(config: dict) -> None:
    """Ranked last, a placeholder still moved a query (αQE) or its neighbours (DBA) towards what it resembled."""
    from retrieval_lightning.retrieval.postprocess import PostProcessConfig, postprocess_descriptors

    toy = EvalSet("toy", TensorDataset(torch.zeros(5)), 1, "revisitop", [{"easy": [0], "hard": [], "junk": []}],
                  [f"photo_{i}.jpg" for i in range(5)])
    base = torch.tensor([[1, 0, 0, 0], [.5, 0, 1, 0], [.45, 1, 0, 0], [0, 0, 0, 0], [.3, 0, 0, 1]])
    flags = torch.tensor([False, False, False, True, False])  # database 2 is a placeholder
    cfg = PostProcessConfig(**config)
    results = []
    for placeholder in ([.6, 0, 1, 0], [.6, 1, 0, 0]):  # near the positive, then near the negative
        desc = base.clone()
        desc[3] = torch.tensor(placeholder)
        desc = F.normalize(desc, dim=1)
        queries, database = postprocess_descriptors(desc[:1], desc[1:], cfg,
                                                    excluded=np.flatnonzero(flags[1:].numpy()))
        results.append(evaluate_eval_set(toy, torch.cat([queries, database.float()]), unreadable=flags))
    assert results[0].metrics["mAP_M"] == results[1].metrics["mAP_M"]  # (H has no positive: NaN)
    assert torch.equal(results[0].topk, results[1].topk)


def test_the_eval_collate_marks_placeholders(tmp_path) -> None:
    from PIL import Image

    from datamodules._transforms import EvalImageDataset, EvalTransform
    from retrieval_lightning.data.loaders import collate_eval
    from retrieval_lightning.data.io import LoadPolicy

    good = tmp_path / "good.png"
    Image.new("RGB", (20, 16), (200, 10, 10)).save(good)
    dataset = EvalImageDataset([str(good), str(tmp_path / "missing.jpg")], EvalTransform(16), LoadPolicy("skip"))
    batch = collate_eval([dataset[0], dataset[1]])
    assert batch["unreadable"].tolist() == [False, True] and batch["index"].tolist() == [0, 1]


def test_lightnings_sync_dist_advice_is_silenced_only_for_the_evaluation_metrics() -> None:
    """Evaluation metrics are computed on every rank from the same gathered data; Lightning's advice to
    average them over ranks is silenced for the names the module logs, and only for those."""
    import warnings

    from lightning.fabric.utilities.warnings import PossibleUserWarning

    from retrieval_lightning.eval_loop import quiet_sync_dist_advice

    def advice(name: str) -> str:  # Lightning's wording (trainer/connectors/logger_connector/result.py)
        return (f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when logging on epoch level in "
                "distributed setting to accumulate the metric across devices.")

    quiet_sync_dist_advice("val/roxford5k/mAP_M")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(advice("val/roxford5k/mAP_M"), PossibleUserWarning)
        warnings.warn(advice("val/my_own_metric"), PossibleUserWarning)
    assert [str(w.message) for w in caught] == [advice("val/my_own_metric")]


def _fan(n: int) -> torch.Tensor:
    """Unit vectors at angles 0, then n database rows at strictly growing angles below pi: row i ranks i + 1."""
    angles = torch.cat([torch.zeros(1), torch.linspace(0.01, 3.0, n)]).double()
    return torch.stack([angles.cos(), angles.sin()], dim=1).float()


def test_gldv2_retrieval_scores_the_first_hundred_predictions() -> None:
    """mAP@100 reads 100 predictions deep: a positive ranked 12th adds 1/12, one ranked 103rd nothing (AP over
    min(#truth, 100) = 2)."""
    ids = ["q0"] + [f"d{i}" for i in range(105)]
    gt = {"query_ids": ids[:1], "db_ids": ids[1:], "solution": {"q0": ["d11", "d102"]}}
    gld = EvalSet("gld", TensorDataset(torch.zeros(106)), 1, "gldv2_retrieval", gt, ids)
    result = evaluate_eval_set(gld, _fan(105))
    assert result.metrics["mAP@100"] == pytest.approx(100.0 * (1 / 12) / 2)


def test_a_gldv2_positive_that_is_a_placeholder_is_never_predicted() -> None:
    """A database placeholder comes back from a small database's search (score -inf) but is no prediction: the
    query's one positive was unreadable, so its AP is 0, not that of the positive found last."""
    ids = ["q0"] + [f"d{i}" for i in range(4)]
    gt = {"query_ids": ids[:1], "db_ids": ids[1:], "solution": {"q0": ["d0"]}}
    gld = EvalSet("gld", TensorDataset(torch.zeros(5)), 1, "gldv2_retrieval", gt, ids)
    assert evaluate_eval_set(gld, _fan(4)).metrics["mAP@100"] == 100.0
    flags = torch.tensor([False, True, False, False, False])
    assert evaluate_eval_set(gld, _fan(4), unreadable=flags).metrics["mAP@100"] == 0.0
