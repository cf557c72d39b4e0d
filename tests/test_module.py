"""RetrievalModule: loss weighting, gradient stop, freezing, BN freezing, param groups, init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.errors import UsageError
from retrieval_lightning.module import IncompatibleCheckpointError, RetrievalModule
from retrieval_lightning.optim import OptimConfig, build_optimizer
from retrieval_lightning.registry import HEADS

GemArcFace = HEADS.get("gem_arcface")


def make(num_classes: int = 4, **kwargs) -> RetrievalModule:
    torch.manual_seed(0)
    return RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(**kwargs.pop("head", {}))},
                           num_classes=num_classes, **kwargs)


def batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"image": torch.rand(n, 3, 64, 64), "label": torch.arange(n) % 4, "index": torch.arange(n)}


def test_untrained_head_is_plain_gem_of_the_backbone() -> None:
    module = make().eval()
    x = batch()["image"]
    gem = module.heads["global"].gem(module.backbone(x)["conv5"])
    torch.testing.assert_close(module.heads["global"].embed(module.backbone(x)), torch.nn.functional.normalize(gem))


def test_training_step_trains_backbone_and_head_and_logs_weighted_loss() -> None:
    module = make(loss_weights={"global": 2.0})
    module.train()
    loss = module.training_step(batch(), 0)
    raw = module.heads["global"].losses(module.backbone(batch()["image"]), batch()["label"])["arcface"]
    torch.testing.assert_close(loss, 2.0 * raw, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert module.backbone.model.conv1.weight.grad is not None
    assert module.heads["global"].classifier.weight.grad is not None


def test_training_step_logs_what_heads_watch_beside_their_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make()
    module.train()
    head = module.heads["global"]
    head.classifier.weight.data[:] = torch.nn.functional.normalize(torch.randn(4, head.dim), dim=1)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module.training_step(batch(), 0)
    with torch.no_grad():
        cosines = head.classifier(head.pool(module.backbone(batch()["image"])))
    want = (cosines.argmax(dim=1) == batch()["label"]).float().mean().item()  # the margin-free classification
    assert set(logged) == {"train/global/arcface", "train/global/accuracy", "train/loss"}
    assert logged["train/global/accuracy"] == pytest.approx(want)

    real_losses = head.losses

    def watching_a_loss(*args, **kwargs):
        out = real_losses(*args, **kwargs)
        head.watch(arcface=1.0)
        return out

    monkeypatch.setattr(head, "losses", watching_a_loss)
    with pytest.raises(ValueError, match="watches 'arcface', which is also one of its losses"):
        module.training_step(batch(), 0)


@pytest.mark.parametrize(("returned", "message"), [
    ({"ce": torch.ones(3)}, r"head 'global' \(.*\)\.losses returned 'ce' of shape \(3,\); each loss must be a scalar"),
    ({}, r"head 'global' \(.*\)\.losses returned no loss, but the head has parameters to train"),
])
def test_a_heads_malformed_losses_are_named_in_one_line(monkeypatch: pytest.MonkeyPatch, returned: dict,
                                                       message: str) -> None:
    """A plugin's per-sample losses or missing loss: named with the head, not Lightning's ``self.log`` error or
    autograd's "does not require grad" later."""
    module = make()
    module.train()
    module.log = lambda *args, **kwargs: None
    monkeypatch.setattr(module.heads["global"], "losses", lambda *args, **kwargs: returned)
    with pytest.raises(UsageError, match=message):
        module.training_step(batch(), 0)


def test_pairs_reach_a_head_whose_losses_take_keyword_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make()
    module.train()
    module.log = lambda *args, **kwargs: None
    head, seen = module.heads["global"], {}
    real = head.losses

    def losses(features, labels, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return real(features, labels)

    monkeypatch.setattr(head, "losses", losses)
    pairs = torch.tensor([[0, 1, 1]])
    module.training_step({**batch(), "pairs": pairs}, 0)
    assert torch.equal(seen["pairs"], pairs)


def test_detach_stops_gradients_into_the_backbone() -> None:
    module = make(detach=["global"])
    module.train()
    module.training_step(batch(), 0).backward()
    assert module.backbone.model.conv1.weight.grad is None
    assert module.heads["global"].whiten.weight.grad is not None


def test_frozen_backbone_keeps_weights_and_bn_statistics() -> None:
    module = make(freeze=["backbone"])
    module.train()
    bn = module.backbone.model.bn1
    before = bn.running_mean.clone()
    module.training_step(batch(), 0)
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert not any(p.requires_grad for p in module.backbone.parameters())


def test_freeze_bn_keeps_statistics_but_trains_weights() -> None:
    module = make(freeze_bn=True)
    module.train()
    bn = module.backbone.model.bn1
    before = bn.running_mean.clone()
    module.training_step(batch(), 0).backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None


def test_lightnings_eval_mode_warning_gives_way_only_to_what_the_config_froze(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen parts and freeze_bn's BatchNorm are in eval mode on purpose: Lightning's warning about them is
    replaced by a line naming them. Any other module in eval mode keeps the warning."""
    import warnings

    import retrieval_lightning.module as module_file

    said: list[str] = []
    monkeypatch.setattr(module_file, "rank_zero_info", said.append)

    def lightning_warns(module: RetrievalModule) -> list[str]:  # what fit_loop's check would print
        n = sum(not m.training for m in module.modules())
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(f"Found {n} module(s) in eval mode at the start of training. This may lead to ...")
        return [str(w.message) for w in caught]

    module = make(freeze_bn=True)
    module.train()
    module._quiet_intended_eval_modules()
    assert lightning_warns(module) == [] and said == ["in eval mode while training, as configured: "
                                                      "the backbone's BatchNorm (freeze_bn)"]
    stray = make(freeze_bn=True)
    stray.train()
    stray.heads["global"].eval()  # not frozen by the config
    stray._quiet_intended_eval_modules()
    assert len(lightning_warns(stray)) == 1 and len(said) == 1
    from retrieval_lightning.momentum_contrast import MomentumContrastConfig

    contrast = make(momentum_contrast=MomentumContrastConfig())  # its momentum copy embeds keys in eval mode
    contrast.train()
    contrast._quiet_intended_eval_modules()
    assert lightning_warns(contrast) == [] and said[-1].endswith("as configured: momentum_contrast's momentum copy")


def test_unknown_role_and_mismatched_role_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a role"):
        RetrievalModule(Backbone("resnet18"), {"globl": GemArcFace()}, num_classes=2)
    with pytest.raises(ValueError, match="configured under 'local'"):
        RetrievalModule(Backbone("resnet18"), {"local": GemArcFace()}, num_classes=2)
    with pytest.raises(ValueError, match="not configured heads"):
        make(freeze=["verifier"])
    with pytest.raises(ValueError, match=r"loss_weights name \['globl'\]"):  # not trained at 1.0 unseen
        make(loss_weights={"globl": 0.5})


def test_parameter_groups_give_learnable_p_ten_times_the_lr_without_decay() -> None:
    module = make(head={"learn_p": True}, optim=OptimConfig(lr=0.1, backbone_lr_mult=0.5, weight_decay=1e-4))
    groups = []
    groups.append({"params": list(module.backbone.parameters()), "lr": 0.05})
    groups.extend(module.heads["global"].parameter_groups(0.1))
    optim = build_optimizer(module.optim, groups, total_steps=10)["optimizer"]
    p_group = next(g for g in optim.param_groups if any(p is module.heads["global"].gem.p for p in g["params"]))
    assert p_group["lr"] == pytest.approx(1.0) and p_group["weight_decay"] == 0.0
    assert optim.param_groups[0]["weight_decay"] == 1e-4


def test_linear_schedule_decays_to_zero() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = build_optimizer(OptimConfig(lr=1.0), [{"params": [param], "lr": 1.0}], total_steps=4)
    sched = cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        cfg["optimizer"].step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25]) and sched.get_last_lr()[0] == pytest.approx(0.0)


def test_init_from_copies_fitting_tensors_and_rejects_shape_conflicts(tmp_path: Path) -> None:
    source = make()
    with torch.no_grad():
        source.heads["global"].whiten.weight.mul_(3.0)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = make(init_from=str(path))
    torch.testing.assert_close(target.heads["global"].whiten.weight, source.heads["global"].whiten.weight)
    # another training set's classes (fine-tuning on other landmarks): the classifier, training-only, keeps its
    # initialisation, said; every other tensor is copied
    with pytest.warns(UserWarning, match=r"classifier.weight: checkpoint \(4, \d+\) vs model \(7, \d+\)"):
        other = make(num_classes=7, init_from=str(path))
    torch.testing.assert_close(other.heads["global"].whiten.weight, source.heads["global"].whiten.weight)
    assert other.heads["global"].classifier.weight.shape[0] == 7
    with pytest.raises(IncompatibleCheckpointError, match="whiten.weight"):  # a tensor evaluation uses: refused
        make(init_from=str(path), head={"dim": 64})
    torch.save({"state_dict": {"unrelated.weight": torch.zeros(1)}}, path)
    with pytest.raises(IncompatibleCheckpointError, match="no tensor name matches"):
        make(init_from=str(path))


class _TinyData(__import__("lightning").pytorch.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.items = [{"image": torch.rand(3, 64, 64), "label": i % 3, "index": i} for i in range(9)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=4)


def test_imprinting_sets_class_weights_to_mean_training_descriptors() -> None:
    import lightning.pytorch as pl
    import torch.nn.functional as F

    module = make(num_classes=3, head={"imprint": True})
    data = _TinyData()
    snapshot = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot["w"] = pl_module.heads["global"].classifier.weight.detach().clone()

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", callbacks=[Snapshot()])
    trainer.fit(module, datamodule=data)
    reference = make(num_classes=3).eval()
    with torch.no_grad():
        pooled = torch.stack([F.normalize(reference.heads["global"].pool(reference.backbone(it["image"][None]))[0], dim=0)
                              for it in data.items])
    labels = torch.tensor([it["label"] for it in data.items])
    expected = F.normalize(torch.stack([pooled[labels == c].sum(0) for c in range(3)]), dim=-1)
    torch.testing.assert_close(snapshot["w"], expected, atol=1e-4, rtol=1e-4)


def _fit_one_step(module: RetrievalModule) -> None:
    import lightning.pytorch as pl

    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(module, datamodule=_TinyData())


def test_a_precision_that_casts_the_weights_is_refused_before_anything_runs() -> None:
    """``bf16-true`` casts every layer, and the heads' deliberate fp32 arithmetic would then meet bf16
    weights at the first step (or in imprinting): one line instead, naming what works; ``bf16-mixed`` runs."""
    import lightning.pytorch as pl

    from retrieval_lightning.errors import UsageError

    for precision in ("bf16-true", "64-true"):
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", precision=precision)
        with pytest.raises(UsageError, match=rf"precision '{precision}' is not supported.*'bf16-mixed'"):
            trainer.fit(make(num_classes=3, head={"imprint": True}), datamodule=_TinyData())
    module = make(num_classes=3, head={"imprint": True})
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", precision="bf16-mixed").fit(module,
                                                                                          datamodule=_TinyData())
    assert module.trainer.global_step == 1


def test_fit_refuses_a_frozen_head_whose_weights_nothing_trained_or_loaded(tmp_path: Path) -> None:
    """A later recipe stage run without ``init_from`` (or from the wrong stage) would train around noise."""
    from retrieval_lightning.untrained_checks import FrozenUntrainedError

    random_whitening = {"whiten_init": "random"}
    with pytest.raises(FrozenUntrainedError, match=r"'global': 2 tensors \(heads.global.whiten.weight, "
                                                   r"heads.global.whiten.bias\).*init_from is not set"):
        _fit_one_step(make(num_classes=3, head=random_whitening, freeze=["global"]))
    # a checkpoint without the head is named as such
    partial = tmp_path / "backbone_only.ckpt"
    torch.save({"state_dict": {k: v for k, v in make().state_dict().items() if k.startswith("backbone.")}}, partial)
    with pytest.raises(FrozenUntrainedError, match=r"backbone_only.ckpt\) does not hold them"):
        _fit_one_step(make(num_classes=3, head=random_whitening, freeze=["global"], init_from=str(partial)))
    # trained weights, from init_from or loaded by hand, pass the check; so does a deliberate start
    # (a model whose only head is frozen has nothing to fit, so these call the check fit runs first)
    stage1 = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": make(num_classes=3, head=random_whitening).state_dict()}, stage1)
    make(num_classes=3, head=random_whitening, freeze=["global"], init_from=str(stage1)).check_frozen_heads_are_trained()
    by_hand = make(num_classes=3, head=random_whitening, freeze=["global"])
    assert by_hand.untrained_frozen_tensors() == {"global": ["heads.global.whiten.weight", "heads.global.whiten.bias"]}
    by_hand.load_state_dict(torch.load(stage1, weights_only=True)["state_dict"])
    assert by_hand.untrained_frozen_tensors() == {}
    assert make(num_classes=3, freeze=["global"]).untrained_frozen_tensors() == {}  # identity: plain GeM


def test_evaluating_random_heads_warns_but_goes_on(tmp_path: Path) -> None:
    """``test`` without a checkpoint would report metrics of random weights: a warning names the head."""
    import warnings

    random_whitening = make(num_classes=3, head={"whiten_init": "random"})
    with pytest.warns(UserWarning, match=r"test: heads 'global' \(2 tensors, e.g. heads.global.whiten.weight\) "
                                         r"hold random weights"):
        random_whitening.on_test_start()
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": random_whitening.state_dict()}, path)
    loaded = make(num_classes=3, head={"whiten_init": "random"}, init_from=str(path))
    backbone_only = tmp_path / "backbone.ckpt"
    torch.save({"state_dict": {k: v for k, v in random_whitening.state_dict().items() if k.startswith("backbone.")}},
               backbone_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.on_test_start()  # loaded weights
        # identity whitening on loaded backbone weights: the untrained GeM baseline, on purpose
        make(num_classes=3, init_from=str(backbone_only)).on_test_start()
        random_whitening._fitted_here = True
        random_whitening.on_test_start()  # after fit (finetune's second test) the heads are trained


def test_a_frozen_random_backbone_is_warned_about_until_weights_are_loaded(tmp_path: Path) -> None:
    """``weights: null`` + ``freeze: [backbone]`` trains the heads on random features; testing such a
    backbone reports metrics of random weights. Both warn; loaded backbone weights silence them."""
    import warnings

    frozen = make(freeze=["backbone"])
    assert frozen.backbone_is_untrained()
    with pytest.warns(UserWarning, match="freeze keeps the backbone fixed, but its weights are random"):
        frozen.warn_if_frozen_backbone_is_random()
    with pytest.warns(UserWarning, match="test: the backbone holds random weights"):
        frozen.on_test_start()
    path = tmp_path / "backbone.ckpt"
    torch.save({"state_dict": {k: v for k, v in make().state_dict().items() if k.startswith("backbone.")}}, path)
    loaded = make(freeze=["backbone"], init_from=str(path))
    assert not loaded.backbone_is_untrained()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.warn_if_frozen_backbone_is_random()
        loaded.on_test_start()
        make().warn_if_frozen_backbone_is_random()  # trained along: nothing to say
