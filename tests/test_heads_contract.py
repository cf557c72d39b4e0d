"""The head contract, checked for every registered head (a new plugin is tested without new tests)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from retrieval_lightning.head import ROLES, GlobalHead, Head, PairExplanation, RerankHead, SparsifierHead
from retrieval_lightning.entry_checks import check_entries, check_entry_kinds
from retrieval_lightning.registry import HEADS

STAGE_CHANNELS = {"conv1": 8, "conv2": 12, "conv3": 16, "conv4": 24, "conv5": 32}
STRIDES = {"conv1": 2, "conv2": 4, "conv3": 8, "conv4": 16, "conv5": 32}
NUM_CLASSES = 5


def tiny_features(batch: int = 4, size: int = 128) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {s: torch.randn(batch, c, size // STRIDES[s], size // STRIDES[s]).abs() for s, c in STAGE_CHANNELS.items()}


@pytest.fixture(params=HEADS.names())
def head(request: pytest.FixtureRequest) -> Head:
    cls = HEADS.get(request.param)
    instance = cls()
    instance.build(STAGE_CHANNELS, NUM_CLASSES)
    if instance.role == "sparsifier":  # a sparsifier serves a verifier: attach the first registered one it accepts
        refusals = []
        for name in HEADS.names():
            try:  # another plugin's verifier that fails to import or build fails its own tests, not these
                if HEADS.get(name).role != "verifier":
                    continue
                verifier = HEADS.get(name)()
                verifier.build(STAGE_CHANNELS, NUM_CLASSES)
            except Exception:  # noqa: BLE001
                continue
            try:  # the sparsifier's own attach: only its refusal of a verifier is not a failure
                instance.attach(verifier)
                return instance
            except ValueError as err:  # UsageError included: this verifier lacks what the sparsifier reads
                refusals.append(f"{name}: {err}")
        if cls.__module__.split(".")[0] == "heads":  # this repository's sparsifier serves its verifier
            pytest.fail(f"built-in sparsifier {request.param!r} refused every registered verifier: {refusals}")
        pytest.skip("no registered verifier head that this sparsifier can serve")
    return instance


def test_role_and_stages(head: Head) -> None:
    assert head.role in ROLES
    # a sparsifier may read no stage: its input is the verifier's entries (an outside one keeping rows by a rule)
    assert (head.stages or head.role == "sparsifier") and all(s in STAGE_CHANNELS for s in head.stages)


def test_losses_are_finite_scalars_and_reach_every_parameter(head: Head) -> None:
    if type(head).losses is Head.losses:  # it can only be frozen (its weights loaded, or a deliberate start):
        return                            # fit refuses to train it (test_rerank.py), nothing here to compute
    head.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off zero initialisations (a last layer at zero stops the gradient of the ones before)
        for p in head.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=generator))
    feats = {k: v.requires_grad_(True) for k, v in tiny_features().items()}
    labels = torch.tensor([0, 1, 2, 3])
    losses = head.losses(feats, labels)
    assert losses
    total = sum(losses.values())
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    total.backward()
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    cut_off = [n for n, p in trainable if not p.grad.abs().sum() > 0]  # a zero gradient trains nothing
    assert cut_off == []


def test_watched_values_are_detached_scalars_apart_from_the_losses(head: Head) -> None:
    """``training_metrics`` (logged beside the losses, never optimised): finite detached scalars whose
    names are not losses', forgotten once read; every built-in head watches something."""
    if type(head).losses is Head.losses:  # a frozen-only head: nothing is trained, nothing to watch
        return
    head.train()
    feats = {k: v.requires_grad_(True) for k, v in tiny_features().items()}
    losses = head.losses(feats, torch.tensor([0, 1, 2, 3]))
    watched = head.training_metrics()
    assert watched or not type(head).__module__.startswith("heads.")
    assert not watched.keys() & losses.keys()
    for name, value in watched.items():
        assert value.ndim == 0 and torch.isfinite(value) and not value.requires_grad, name
    assert head.training_metrics() == {}


def test_inference_output_by_role(head: Head) -> None:
    head.eval()
    if head.role == "global":
        assert isinstance(head, GlobalHead)
        out = head.embed(tiny_features())
        assert out.shape == (4, head.dim) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    elif isinstance(head, RerankHead):
        check_rerank_head(head)
    elif isinstance(head, SparsifierHead):
        check_sparsifier_head(head)
    else:  # pragma: no cover - other roles arrive with their heads
        pytest.fail(f"no contract check written for role {head.role}")


def tiny_features_at(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stand-in backbone made of real ops: average pooling at each stage's stride, fixed 1x1 convs."""
    gen = torch.Generator().manual_seed(0)
    return {s: F.conv2d(F.avg_pool2d(images, STRIDES[s], ceil_mode=True), torch.randn(c, 3, 1, 1, generator=gen))
            for s, c in STAGE_CHANNELS.items()}


def check_rerank_head(head: RerankHead) -> None:
    """Entries match their declared kinds; ``score`` gives one finite float per candidate."""
    kinds = head.entry_kinds()
    check_entry_kinds(kinds, f"{type(head).__name__}.entry_kinds()", f"{head.role}-")
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 80, 80, generator=gen)]
    with torch.no_grad():
        entries = head.extract_entries(images, tiny_features_at)
    assert len(entries) == 2
    # the store's rule: the declared names and shapes; floats narrowed to a float kind's type (what the
    # declaration asks for), nothing a store of an integer or bool kind would truncate or wrap
    check_entries(entries, kinds, type(head).__name__)
    scores = head.score(entries[0], entries, [0, 1])
    assert scores.shape == (2,) and scores.dtype.is_floating_point and torch.isfinite(scores).all()
    if type(head).explain is not RerankHead.explain:  # optional: a head that explains keeps the contract
        check_explanation(head.explain(entries[0], entries[1]), float(head.score(entries[0], [entries[1]], [0])[0]))


def check_explanation(explanation: PairExplanation, score: float) -> None:
    """The explained score is the score; positions are fractions of the image; heat maps are 2-D in [0, 1]."""
    assert explanation.score == pytest.approx(score, abs=1e-6)
    matches = np.asarray(explanation.matches)
    assert matches.ndim == 2 and matches.shape[1] == 4 and ((matches >= 0) & (matches <= 1)).all()
    assert np.asarray(explanation.strengths).shape == (len(matches),)
    for heat in (explanation.query_heat, explanation.candidate_heat):
        if heat is not None:
            assert heat.ndim == 2 and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1 + 1e-6


def check_sparsifier_head(head: SparsifierHead) -> None:
    """Sparse entries match the declared kinds; densified ones are the verifier's form and score."""
    verifier = head.verifier[0]
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 80, 80, generator=gen)]
    with torch.no_grad():
        dense = verifier.extract_entries(images, tiny_features_at)
    kinds = head.entry_kinds(verifier.entry_kinds())
    sparse = head.sparsify(dense)
    for entry in sparse:
        assert set(entry) == set(kinds)
        for name, kind in kinds.items():
            assert str(entry[name].dtype).removeprefix("torch.") == kind.dtype, name
            assert tuple(entry[name].shape[1:] if kind.ragged else entry[name].shape) == tuple(kind.shape), name
    back = head.densify(sparse)
    consumed = head.consumed_kinds(verifier.entry_kinds())
    assert not consumed & set(kinds)
    for original, entry in zip(dense, back):
        assert set(entry) == set(original) - consumed
        assert all(entry[k].shape == original[k].shape and entry[k].dtype == original[k].dtype for k in entry)
    scores = verifier.score(dense[0], back, [0, 1])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    for entry in sparse:  # optional: stored cells for pictures, a 2-D bool map or None
        kept = head.kept_cells(entry)
        assert kept is None or (kept.ndim == 2 and kept.dtype == bool and 0 < kept.sum() <= kept.size)


def _perturb(head: Head) -> None:
    """Move every parameter and floating buffer off its initial value (identity, zeros, ones)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * (0.05 * p.abs().mean().item() + 1e-2))
        for b in head.buffers():
            if b.is_floating_point():
                b.mul_(1.1).add_(0.01)  # keeps variances positive


def _role_outputs(head: Head) -> list[torch.Tensor]:
    """What the head computes at inference, by role (global: embed; re-ranking: entries and scores)."""
    head.eval()
    with torch.no_grad():
        if isinstance(head, GlobalHead):
            return [head.embed(tiny_features())]
        if isinstance(head, RerankHead):
            gen = torch.Generator().manual_seed(1)
            entries = head.extract_entries([torch.rand(3, 64, 80, generator=gen)], tiny_features_at)
            return [v for e in entries for _, v in sorted(e.items())] + [head.score(entries[0], entries, [0])]
        if isinstance(head, SparsifierHead):  # what it keeps of its verifier's entries
            gen = torch.Generator().manual_seed(1)
            verifier = head.verifier[0].eval()
            entries = verifier.extract_entries([torch.rand(3, 64, 80, generator=gen)], tiny_features_at)
            return [v for e in head.sparsify(entries) for _, v in sorted(e.items())]
    return []


def test_state_dict_round_trip(head: Head) -> None:
    _perturb(head)
    fresh = type(head)()
    fresh.build(STAGE_CHANNELS, NUM_CLASSES)
    if isinstance(head, SparsifierHead):
        fresh.attach(head.verifier[0])  # both keep locations of the same verifier's entries
    saved = head.state_dict()
    unchanged = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and torch.equal(v, saved[k])]
    assert unchanged == []  # so a load that silently does nothing cannot pass below
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    loaded = fresh.state_dict()
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    outputs = _role_outputs(head)
    assert outputs or not type(head).__module__.startswith("heads.")  # every built-in head is compared
    for mine, theirs in zip(outputs, _role_outputs(fresh), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_build_rejects_missing_stage() -> None:
    cls = HEADS.get("gem_arcface")
    with pytest.raises(ValueError, match="conv5"):
        cls().build({"conv4": 8}, 3)


def test_untrained_tensors_name_parameters_that_are_not_training_only(head: Head) -> None:
    """What ``fit`` checks before it trains around a frozen head: real parameter names, never a
    training-only one (a model built for evaluation does not have those)."""
    names = head.untrained_tensors()
    parameters = dict(head.named_parameters())
    assert set(names) <= set(parameters)
    assert not [n for n in names if n.startswith(head.training_only)]
    if type(head).untrained_tensors is Head.untrained_tensors:  # no deliberate starting point declared
        # every parameter but the training-only ones (a head whose only weights are its classifier names none)
        assert names == [n for n in parameters if not n.startswith(head.training_only)]
