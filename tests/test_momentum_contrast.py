"""CVNet-Global's momentum-contrastive loss: the loss against a per-pair reference written from the
formula, the momentum copy's EMA, the queue, a fit that resumes bitwise, and 2 gloo ranks sharing one queue."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import REPO, TINY_DATA, fork_context, free_port, run_main
from retrieval_lightning.backbone import Backbone
from retrieval_lightning.layers.margins import CurricularFaceMargin
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.momentum_contrast import (
    CHECKPOINT_KEY,
    MomentumContrast,
    MomentumContrastConfig,
    contrastive_loss,
    rank_share,
)
from heads.gem_arcface import GemArcFaceHead


def reference_loss(queries, labels, keys, key_labels, own, scale, m, t_before, momentum=0.01):
    """Loop over (query, positive) pairs: CurricularFace logits written out, softmax over the positive and
    the query's negatives; mean over a query's positives, then over queries with one. Returns (loss, new t)."""
    pairs = [(b, j) for b in range(len(labels)) for j in range(len(key_labels))
             if key_labels[j] == labels[b] and j != own[b]]
    if not pairs:
        return 0.0, t_before
    cos = (queries.double() @ keys.double().T).clamp(-1 + 1e-7, 1 - 1e-7)
    t = (1 - momentum) * t_before + momentum * sum(float(cos[b, j]) for b, j in pairs) / len(pairs)
    per_query: dict[int, list[float]] = {}
    for b, j in pairs:
        c = float(cos[b, j])
        theta_m = math.cos(math.acos(c) + m)
        target = theta_m if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
        negatives = [float(cos[b, n]) for n in range(len(key_labels)) if key_labels[n] != labels[b] and n != own[b]]
        logits = [scale * target] + [scale * (x * (t + x) if x > theta_m else x) for x in negatives]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        per_query.setdefault(b, []).append(log_z - logits[0])
    return sum(sum(v) / len(v) for v in per_query.values()) / len(per_query), t


def test_contrastive_loss_matches_a_per_pair_reference() -> None:
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    keys = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    keys[:6] = F.normalize(queries + 0.3 * torch.randn(6, 16, generator=g), dim=-1)  # own keys: near their queries
    labels = torch.tensor([0, 1, 2, 3, 4, 9])  # 9: no other image of its class
    key_labels = torch.tensor([0, 1, 2, 3, 4, 9, 0, 0, 1, 2, 5, 6, 7, 2, 8, 3, 5, 6, 7, 8])
    own = torch.tensor([0, 1, 2, 3, 4, 5])
    margin = CurricularFaceMargin(scale=30.0, margin=0.15).train()
    margin.t.fill_(0.2)
    loss, with_positive = contrastive_loss(margin, queries, labels, keys, key_labels, own)
    expected, t = reference_loss(queries, labels.tolist(), keys, key_labels.tolist(), own.tolist(), 30.0, 0.15, 0.2)
    assert with_positive == 4  # queries 0, 1, 2, 3 (4 and 9 have only their own key)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(margin.t) == pytest.approx(t, rel=1e-5)


def test_under_ddp_each_ranks_loss_is_weighted_by_its_share_of_the_queries_with_a_positive() -> None:
    """DDP averages the ranks' gradients: each rank's mean over its own queries with a positive gave a query on a
    rank with 1 such query 1/2 of the step instead of 1/5 (a review of DDP training). Weighted by
    ``rank_share``, the two ranks' average is the loss one process takes over the whole batch."""
    g = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    keys = F.normalize(torch.cat([queries + 0.3 * torch.randn(8, 16, generator=g), torch.randn(6, 16, generator=g)]),
                       dim=-1)
    labels = torch.tensor([0, 7, 8, 9, 1, 1, 2, 2])  # rank 0: one query with a positive (0); rank 1: all four
    key_labels = torch.cat([labels, torch.tensor([0, 3, 4, 5, 6, 2])])

    def loss(rows: slice) -> tuple[float, int]:
        margin = CurricularFaceMargin(scale=30.0, margin=0.15).eval()
        value, count = contrastive_loss(margin, queries[rows], labels[rows], keys, key_labels,
                                        torch.arange(8)[rows])
        return float(value), count

    (whole, all_count), (first, n0), (second, n1) = loss(slice(0, 8)), loss(slice(0, 4)), loss(slice(4, 8))
    assert (all_count, n0, n1) == (5, 1, 4)
    shares = [rank_share(n, labels, key_labels, 2) for n in (n0, n1)]
    assert shares == [2 / 5, 8 / 5]
    assert (shares[0] * first + shares[1] * second) / 2 == pytest.approx(whole, rel=1e-4)  # fp32 sums
    assert (first + second) / 2 != pytest.approx(whole, rel=1e-3)  # unweighted, the ranks' mean is another loss
    assert rank_share(n0, labels[:4], key_labels, 1) == 1.0


def test_a_batch_without_positives_adds_nothing_and_keeps_t() -> None:
    queries = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(3, 8), dim=-1)
    margin = CurricularFaceMargin(scale=30.0, margin=0.15).train()
    margin.t.fill_(0.3)
    loss, with_positive = contrastive_loss(margin, queries, torch.tensor([0, 1, 2]), keys, torch.tensor([0, 1, 2]),
                                           torch.tensor([0, 1, 2]))
    loss.backward()
    assert with_positive == 0 and float(loss) == 0.0 and float(margin.t) == pytest.approx(0.3)
    assert torch.equal(queries.grad, torch.zeros_like(queries))


def small_network() -> tuple[Backbone, GemArcFaceHead]:
    backbone = Backbone("resnet18", stages=("conv5",))
    head = GemArcFaceHead(learn_p=True, margin="curricularface", margin_m=0.15)
    head.build(backbone.stage_channels, 5)
    return backbone, head


def test_momentum_copy_starts_as_the_network_then_follows_it_by_ema() -> None:
    backbone, head = small_network()
    contrast = MomentumContrast(MomentumContrastConfig(momentum=0.9), backbone, head)
    assert not any(p.requires_grad for p in contrast.parameters())
    assert not hasattr(contrast.head, "classifier") or contrast.head.classifier is None  # no training classes
    contrast.reset(backbone, head)
    before = contrast.backbone.model.conv1.weight.clone()
    assert torch.equal(before, backbone.model.conv1.weight)
    with torch.no_grad():
        backbone.model.conv1.weight.add_(1.0)
        head.gem.p.add_(1.0)
        backbone.model.bn1.running_mean.add_(2.0)
    contrast.update(backbone, head)
    torch.testing.assert_close(contrast.backbone.model.conv1.weight, 0.9 * before + 0.1 * backbone.model.conv1.weight)
    torch.testing.assert_close(contrast.head.gem.p, torch.tensor([3.1]))
    assert torch.equal(contrast.backbone.model.bn1.running_mean, backbone.model.bn1.running_mean)  # copied
    contrast.train()
    assert not contrast.backbone.training and contrast.margin.training  # keys from running statistics


def test_queue_is_first_in_first_out_and_survives_a_checkpoint() -> None:
    backbone, head = small_network()
    contrast = MomentumContrast(MomentumContrastConfig(queue_size=5), backbone, head)
    for start in (0, 3, 6):
        contrast._enqueue(torch.arange(start, start + 3).float()[:, None].repeat(1, 4), torch.arange(start, start + 3))
    keys, labels = contrast.queued()
    assert labels.tolist() == [4, 5, 6, 7, 8] and keys[:, 0].tolist() == [4, 5, 6, 7, 8]
    restored = MomentumContrast(MomentumContrastConfig(queue_size=5), backbone, head)
    restored.load_checkpoint_state(contrast.state_for_checkpoint())
    restored._enqueue(torch.full((1, 4), 9.0), torch.tensor([9]))
    contrast._enqueue(torch.full((1, 4), 9.0), torch.tensor([9]))
    assert torch.equal(restored.queued()[1], contrast.queued()[1]) and restored.queued()[1].tolist() == [5, 6, 7, 8, 9]


def test_both_stages_frozen_is_refused() -> None:
    backbone, _ = small_network()
    with pytest.raises(ValueError, match="momentum_contrast trains the global descriptor"):
        RetrievalModule(backbone, {"global": GemArcFaceHead()}, num_classes=3, freeze=["backbone", "global"],
                        momentum_contrast=MomentumContrastConfig())


@pytest.fixture(scope="module")
def contrast_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments/demo.yaml with the momentum contrast, a checkpoint every 3 steps (all kept), no gallery."""
    cfg = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("Gallery")]
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith(".ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=3, save_top_k=-1)
    cfg["model"]["momentum_contrast"] = {"queue_size": 12, "weight": 0.5}
    path = tmp_path_factory.mktemp("contrast_cfg") / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_with_momentum_contrast_resumes_bitwise(contrast_config: Path, cache_root: Path, tmp_path: Path) -> None:
    def fit(out: Path, steps: int, *extra: str) -> None:
        run_main(["fit", "--config", str(contrast_config), f"--data.init_args.root={cache_root}", *TINY_DATA,
                  f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false", *extra], cwd=REPO)

    fit(tmp_path / "whole", 6)
    fit(tmp_path / "resumed", 6, f"--ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'step=0000003.ckpt'}")
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a[CHECKPOINT_KEY]["keys"], b[CHECKPOINT_KEY]["keys"])
    assert len(a[CHECKPOINT_KEY]["labels"]) == 12  # 6 steps of 8 images through a queue of 12
    state = a["state_dict"]
    assert float(state["momentum_contrast.margin.t"]) != 0.0  # moved by the positives the queue held
    assert not torch.equal(state["momentum_contrast.backbone.model.conv_stem.weight"],
                           state["backbone.model.conv_stem.weight"])  # the copy lags the trained backbone
    model = RetrievalModule.load_from_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert model.momentum_contrast is None  # an evaluation model: the copy is training-only


def _rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    backbone, head = small_network()
    contrast = MomentumContrast(MomentumContrastConfig(queue_size=8), backbone, head).train()
    contrast.reset(backbone, head)
    labels = torch.tensor([0, 7]) if rank == 0 else torch.tensor([0, 7, 5])  # the ranks' batches differ in size
    images = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    queries = contrast.keys(images).requires_grad_()
    loss, with_positive = contrast.loss(queries, labels, images)
    out[rank] = (contrast.queued()[1].tolist(), with_positive, float(contrast.margin.t))
    dist.destroy_process_group()


def test_two_ranks_share_one_queue_and_each_leaves_out_only_its_own_keys() -> None:
    port = free_port()
    context = fork_context()  # forked from the import server: no interpreter start-up per rank
    out = context.Manager().dict()
    ranks = [context.Process(target=_rank, args=(rank, port, out)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        for process in ranks:
            process.join(120)
        assert [process.exitcode for process in ranks] == [0, 0]
    finally:
        for process in ranks:
            if process.exitcode is None:
                process.kill()
                process.join()
    # rank 0: labels [0, 7]; rank 1: [0, 7, 5] (3 images): the queue holds them in rank order on both
    assert out[0][0] == out[1][0] == [0, 7, 0, 7, 5]
    # each image of labels 0 and 7 has the other rank's key as a positive; 5 has none
    assert out[0][1] == 2 and out[1][1] == 2
    assert out[0][2] == out[1][2]  # one running t over the gathered pairs


def test_the_setting_is_recorded_so_an_implicit_resume_with_another_is_refused() -> None:
    from retrieval_lightning.implicit_resume import settings_differences
    from retrieval_lightning.model_record import architecture_of

    def model(contrast: MomentumContrastConfig | None) -> RetrievalModule:
        return RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFaceHead()}, num_classes=3,
                               momentum_contrast=contrast)

    plain, small, large = model(None), model(MomentumContrastConfig(queue_size=8)), model(MomentumContrastConfig())
    assert "momentum_contrast" not in architecture_of(plain)["module"]  # records from before the option still match
    assert settings_differences(architecture_of(small), architecture_of(large)) == [
        "model.momentum_contrast.queue_size: 8 -> 16384"]  # named by the option that sets it


def test_pairs_in_chunks_give_the_same_loss_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few classes and a long queue make thousands of pairs: they are taken in recomputed chunks."""
    import retrieval_lightning.momentum_contrast as mc

    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    key_labels, labels = torch.arange(40) % 3, torch.tensor([0, 1, 2, 0])
    base = torch.randn(4, 8, generator=g)
    results = []
    for elements in (1 << 22, 45):  # one chunk; chunks of one pair
        monkeypatch.setattr(mc, "CHUNK_ELEMENTS", elements)
        queries = F.normalize(base, dim=-1).requires_grad_()
        margin = CurricularFaceMargin(scale=30.0, margin=0.15).train()
        loss, _ = contrastive_loss(margin, queries, labels, keys, key_labels, torch.full((4,), -1))
        loss.backward()
        results.append((loss.detach(), queries.grad, margin.t.clone()))
    (a, grad_a, t_a), (b, grad_b, t_b) = results
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_a, grad_b)
    assert torch.equal(t_a, t_b)  # t moves once per batch, not once per chunk


def test_the_contrast_trains_the_backbone_once_per_optimiser_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFaceHead()}, num_classes=3,
                             momentum_contrast=MomentumContrastConfig(queue_size=8)).train()
    module.log = lambda *args, **kwargs: None
    module.momentum_contrast.reset(module.backbone, module.global_head)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    loss = module._momentum_contrast_loss(images, labels, module.backbone(images))
    loss.backward()
    assert float(loss) > 0 and module.backbone.model.conv1.weight.grad.abs().sum() > 0  # not a detached term
    updates = []
    monkeypatch.setattr(module.momentum_contrast, "update", lambda *args: updates.append(1))
    module._trainer = SimpleNamespace(accumulate_grad_batches=4)
    for batch_idx in range(8):
        module.training_step({"image": images, "label": labels}, batch_idx)
    assert len(updates) == 2  # the EMA follows optimiser steps, not micro-batches


def test_a_key_does_not_depend_on_the_images_beside_it_in_the_batch() -> None:
    """The copy describes images from running statistics; copied from the network after the batch's forward in
    training mode, they held that batch's statistics: the same image, beside another one, got another key (and
    every DDP rank copied other statistics, so the ranks' copies differed)."""
    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFaceHead()}, num_classes=3,
                             momentum_contrast=MomentumContrastConfig(queue_size=8)).train()
    module.log = lambda *args, **kwargs: None
    module.momentum_contrast.reset(module.backbone, module.global_head)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    image, keys = torch.rand(1, 3, 32, 32), []
    for partner in (torch.zeros(1, 3, 32, 32), torch.rand(1, 3, 32, 32) * 4):
        module.load_state_dict(start)
        module.momentum_contrast._clear_queue()
        module.training_step({"image": torch.cat([image, partner]), "label": torch.tensor([0, 1])}, 0)
        keys.append(module.momentum_contrast.queued()[0][0])
    torch.testing.assert_close(keys[0], keys[1], rtol=0, atol=1e-6)


def test_a_bf16_model_keeps_an_fp32_copy_that_still_moves() -> None:
    backbone, head = small_network()
    contrast = MomentumContrast(MomentumContrastConfig(momentum=0.999), backbone, head)
    contrast.reset(backbone, head)
    backbone, head, contrast = backbone.bfloat16(), head.bfloat16(), contrast.bfloat16()
    assert contrast.backbone.model.conv1.weight.dtype == torch.float32
    before = contrast.backbone.model.conv1.weight.clone()
    with torch.no_grad():
        backbone.model.conv1.weight.add_(1.0)
    contrast.update(backbone, head)
    torch.testing.assert_close(contrast.backbone.model.conv1.weight - before, torch.full_like(before, 1e-3),
                               atol=1e-5, rtol=0)  # a bf16 copy would not have moved at all
    assert contrast.keys(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.float32


def test_a_checkpoint_without_the_copy_is_noted_for_a_fresh_start() -> None:
    def model(contrast: MomentumContrastConfig | None) -> RetrievalModule:
        return RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFaceHead()}, num_classes=3,
                               momentum_contrast=contrast)

    with_copy = model(MomentumContrastConfig(queue_size=4))
    with_copy.on_load_checkpoint({"state_dict": model(None).state_dict()})
    assert with_copy._momentum_restored is False  # fit resets the copy instead of keeping random weights
    checkpoint = {"state_dict": with_copy.state_dict()}
    with_copy.on_save_checkpoint(checkpoint)
    with_copy.on_load_checkpoint(checkpoint)
    assert with_copy._momentum_restored is True
