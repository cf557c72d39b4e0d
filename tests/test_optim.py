"""Optimiser construction: schedules need a step bound; `configure_optimizers` groups and lrs."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.optim import OptimConfig, UnboundedScheduleError, build_optimizer
from retrieval_lightning.registry import HEADS

GemArcFace = HEADS.get("gem_arcface")


def make(**kwargs) -> RetrievalModule:
    torch.manual_seed(0)
    return RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(**kwargs.pop("head", {}))},
                           num_classes=3, **kwargs)


def attach(module: RetrievalModule, steps: float) -> RetrievalModule:
    """What configure_optimizers reads from the trainer: the run's optimiser-step count."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)  # type: ignore[assignment]
    return module


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [float("inf"), -1, None])
def test_decaying_schedule_without_step_bound_is_an_error(schedule: str, steps) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(UnboundedScheduleError, match="no step bound.*max_steps"):
        build_optimizer(OptimConfig(schedule=schedule), [{"params": [param]}], total_steps=steps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_run_of_no_step_is_named_as_such(schedule: str) -> None:
    """``max_steps=0`` was reported as an unbounded run (``max_steps=-1 with max_epochs=-1``)."""
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(UnboundedScheduleError, match=r"trains no optimiser step .*max_steps=0") as caught:
        build_optimizer(OptimConfig(schedule=schedule), [{"params": [param]}], total_steps=0)
    assert "max_steps=-1" not in str(caught.value)


def test_constant_schedule_needs_no_step_bound() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = build_optimizer(OptimConfig(lr=0.5, schedule="constant"), [{"params": [param]}], total_steps=float("inf"))
    sched = cfg["lr_scheduler"]["scheduler"]
    for _ in range(3):
        cfg["optimizer"].step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5])


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield {"image": torch.rand(3, 32, 32), "label": 0, "index": 0}


@pytest.mark.parametrize("trainer_args", [{"max_steps": -1, "max_epochs": -1}, {"max_epochs": 2}])
def test_fit_without_step_bound_fails_before_training(trainer_args: dict) -> None:
    """Unbounded epochs, or an iterable dataset (Lightning then knows no step count)."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                         enable_model_summary=False, **trainer_args)
    loader = torch.utils.data.DataLoader(_Endless(), batch_size=2)
    with pytest.raises(UnboundedScheduleError, match="no step bound"):
        trainer.fit(make(), train_dataloaders=loader)
    assert trainer.global_step == 0


def test_configure_optimizers_backbone_lr_multiplier_and_schedule() -> None:
    module = attach(make(optim=OptimConfig(lr=0.1, backbone_lr_mult=0.25, weight_decay=1e-4)), 10)
    cfg = module.configure_optimizers()
    optim, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    backbone = {id(p) for p in module.backbone.parameters()}
    head = {id(p) for p in module.heads["global"].parameters()}
    grouped = [id(p) for g in optim.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == backbone | head
    for group in optim.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= backbone or ids <= head
        assert group["lr"] == pytest.approx(0.025 if ids <= backbone else 0.1)
        # matrices and kernels decay; biases, BatchNorm scales and GeM's p do not
        assert group["weight_decay"] == (1e-4 if all(p.ndim >= 2 for p in group["params"]) else 0.0)
        assert all(p.ndim >= 2 for p in group["params"]) or all(p.ndim < 2 for p in group["params"])
    for _ in range(10):
        optim.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.0] * len(optim.param_groups))


def test_head_lr_multiplier_scales_only_that_heads_groups() -> None:
    def lrs(module: RetrievalModule) -> tuple[list[float], list[float]]:
        backbone = {id(p) for p in module.backbone.parameters()}
        groups = attach(module, 10).configure_optimizers()["optimizer"].param_groups
        split = [[g["lr"] for g in groups if {id(p) for p in g["params"]} <= backbone],
                 [g["lr"] for g in groups if not {id(p) for p in g["params"]} & backbone]]
        return split[0], split[1]

    base = lrs(make(head={"learn_p": True}, optim=OptimConfig(lr=0.1)))
    scaled = lrs(make(head={"learn_p": True}, optim=OptimConfig(lr=0.1, head_lr_mult={"global": 0.25})))
    assert scaled[0] == base[0] == [0.1]  # the backbone keeps lr
    assert len(base[1]) > 1 and scaled[1] == pytest.approx([0.25 * lr for lr in base[1]])  # every group of the head
    with pytest.raises(ValueError, match=r"head_lr_mult names \['verifier'\].*configured heads \['global'\]"):
        make(optim=OptimConfig(head_lr_mult={"verifier": 0.1}))
    with pytest.raises(ValueError, match="optim.head_lr_mult.global must be a number >= 0"):
        OptimConfig(head_lr_mult={"global": -1})


def test_configure_optimizers_leaves_frozen_modules_out() -> None:
    module = attach(make(freeze=["backbone"]), 5)
    grouped = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert grouped == {id(p) for p in module.heads["global"].parameters()}
    assert not grouped & {id(p) for p in module.backbone.parameters()}
    with pytest.raises(ValueError, match="everything is frozen"):
        attach(make(freeze=["backbone", "global"]), 5).configure_optimizers()


def test_configure_optimizers_refuses_unbounded_run() -> None:
    with pytest.raises(UnboundedScheduleError):
        attach(make(), float("inf")).configure_optimizers()


@pytest.mark.parametrize("name", ["lr", "weight_decay", "warmup_steps"])
def test_negative_settings_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"optim.{name} must be >= 0"):
        OptimConfig(**{name: -1})


class _Labelled(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.rand(3, 32, 32), "label": i % 3, "index": i}


def test_a_global_batch_other_than_the_reference_warns_with_the_scaled_lr() -> None:
    """``reference_batch`` 2 with lr 0.01: a run of 2 per process x 2 accumulated (4) is told, once,
    at its first step, that linear scaling gives lr 0.02."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                         enable_model_summary=False, max_steps=2, accumulate_grad_batches=2)
    loader = torch.utils.data.DataLoader(_Labelled(), batch_size=2)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(make(optim=OptimConfig(lr=0.01, reference_batch=2)), train_dataloaders=loader)
    messages = [str(w.message) for w in caught if "reference_batch" in str(w.message)]
    assert len(messages) == 1 and "this run's is 4 (2 per process x 1 processes x 2 accumulated)" in messages[0]
    assert "--model.optim.lr 0.02" in messages[0]


def test_the_reference_batch_counts_processes_and_accumulation() -> None:
    optim = OptimConfig(lr=0.01, reference_batch=256)
    assert optim.batch_mismatch(32, 8, 1) is None and optim.batch_mismatch(32, 4, 2) is None
    assert "--model.optim.lr 0.005" in optim.batch_mismatch(32, 4, 1)
    assert OptimConfig().batch_mismatch(3, 5, 7) is None  # no reference: no check
    with pytest.raises(ValueError, match="reference_batch must be >= 1"):
        OptimConfig(reference_batch=0)
