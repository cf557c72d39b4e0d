"""Training on several processes: each rank its own random stream, and DDP told about backbone stages no trained
head reads (both found by a review of DDP training; the 2-process run that crashed is in the README's note)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from retrieval_lightning.ddp_training import allow_unreached_parameters, decorrelate_ranks, unreached_stages


def test_rank_zero_keeps_its_stream_and_other_ranks_draw_their_own() -> None:
    """Lightning seeds every rank alike: the sparsifier's Gumbel noise was the same on every rank."""
    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(7)
        torch.rand(3)  # what the model's construction drew before fit
        decorrelate_ranks(rank)
        return torch.rand(4)

    torch.manual_seed(7)
    torch.rand(3)
    untouched = torch.rand(4)
    first, second, third = draws(0), draws(1), draws(2)
    assert torch.equal(first, untouched)  # one process, and rank 0: the stream they had
    assert not torch.equal(second, first) and not torch.equal(third, second)
    assert torch.equal(draws(1), second)  # reproducible


def test_stages_no_trained_head_reads_are_named() -> None:
    stages = {"global": ("conv5",), "verifier": ("conv4",)}
    assert unreached_stages(stages, frozen={"global"}, detached=set()) == ["conv5"]
    assert unreached_stages(stages, frozen=set(), detached=set()) == []
    assert unreached_stages(stages, frozen={"backbone", "global"}, detached=set()) == []
    assert unreached_stages({"global": ("conv5",), "local": ("conv4",)}, set(), {"global"}) == ["conv5"]
    assert unreached_stages(stages, frozen={"global", "verifier"}, detached=set()) == [
        "conv1", "conv2", "conv3", "conv4", "conv5"]


def test_ddp_is_told_to_look_for_unused_parameters_only_when_some_are() -> None:
    def trainer(world_size: int, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(_ddp_kwargs=dict(kwargs)))

    ddp = trainer(2)
    allow_unreached_parameters(ddp, ["conv5"])
    assert ddp.strategy._ddp_kwargs == {"find_unused_parameters": True}
    for untouched, stages in ((trainer(2), []), (trainer(1), ["conv5"])):
        allow_unreached_parameters(untouched, stages)
        assert untouched.strategy._ddp_kwargs == {}
    allow_unreached_parameters(SimpleNamespace(world_size=2, strategy=SimpleNamespace()), ["conv5"])  # not DDP
