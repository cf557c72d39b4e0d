"""ArcFace / CurricularFace margins against direct formulas, fp32 under autocast, no NaN at |cos|=1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval_lightning.layers import ArcFaceMargin, CosineClassifier, CurricularFaceMargin, GeM


def test_arcface_adds_margin_to_target_angle_only() -> None:
    cos = torch.tensor([[0.5, 0.2, -0.3], [0.1, 0.9, 0.0]])
    labels = torch.tensor([0, 1])
    m, s = 0.1, 45.25
    out = ArcFaceMargin(scale=s, margin=m).train()(cos, labels)
    expected = cos.clone()
    expected[0, 0] = math.cos(math.acos(0.5) + m)
    expected[1, 1] = math.cos(math.acos(0.9) + m)
    torch.testing.assert_close(out, expected * s)


def test_arcface_skips_margin_when_theta_beyond_pi_minus_m() -> None:
    cos = torch.tensor([[-0.999, 0.3]])
    out = ArcFaceMargin(scale=1.0, margin=0.1).train()(cos, torch.tensor([0]))
    assert abs(float(out[0, 0]) - (-0.999)) < 1e-5  # theta > pi - m: left unchanged


def test_arcface_eval_has_no_margin() -> None:
    cos = torch.rand(3, 4)
    out = ArcFaceMargin(scale=2.0, margin=0.3).eval()(cos, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out, cos * 2.0)


def test_no_nan_gradient_at_unit_cosine() -> None:
    emb = torch.tensor([[1.0, 0.0]], requires_grad=True)
    clf = CosineClassifier(2, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    for margin in (ArcFaceMargin(10.0, 0.1), CurricularFaceMargin(10.0, 0.5)):
        logits = margin.train()(clf(emb), torch.tensor([0]))
        F.cross_entropy(logits, torch.tensor([0])).backward()
        assert torch.isfinite(emb.grad).all() and torch.isfinite(clf.weight.grad).all()
        emb.grad = None
        clf.weight.grad = None


def test_margin_math_stays_fp32_under_bf16_autocast() -> None:
    clf = CosineClassifier(8, 3)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ArcFaceMargin(8.0, 0.1).train()(clf(x), torch.tensor([0, 1, 2, 0]))
    assert logits.dtype == torch.float32


def test_curricularface_matches_formula_and_updates_t() -> None:
    cos = torch.tensor([[0.6, 0.7, 0.1], [0.2, 0.3, 0.9]])
    labels = torch.tensor([0, 2])
    m, s = 0.5, 4.0
    head = CurricularFaceMargin(scale=s, margin=m, momentum=0.01).train()
    out = head(cos, labels)
    target = cos.gather(1, labels[:, None])
    t = 0.01 * float(target.mean())
    torch.testing.assert_close(head.t, torch.tensor([t]))
    ctm = target * math.cos(m) - torch.sqrt(1 - target**2) * math.sin(m)
    expected = torch.where(cos > ctm, cos * (t + cos), cos)
    final = torch.where(target > math.cos(math.pi - m), ctm, target - math.sin(math.pi - m) * m)
    expected = expected.scatter(1, labels[:, None], final)
    torch.testing.assert_close(out, expected * s)


def test_gem_matches_definition_and_p1_is_average_pooling() -> None:
    x = torch.rand(2, 3, 5, 4) + 0.1
    torch.testing.assert_close(GeM(p=3.0)(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    learn = GeM(p=3.0, learn_p=True)
    learn(x).sum().backward()
    assert learn.p.grad is not None
    # a large p: x^p overflowed fp32 (NaN descriptors at p = 100, blamed on the model or the images)
    big = torch.rand(2, 3, 5, 4) * 20
    exact = big.double().clamp(min=1e-6).pow(100).mean(dim=(2, 3)).pow(1 / 100)
    torch.testing.assert_close(GeM(p=100.0)(big).double(), exact, rtol=1e-5, atol=0)
    learn = GeM(p=100.0, learn_p=True)
    learn(big).sum().backward()
    assert torch.isfinite(learn.p.grad).all()
    gradient = torch.autograd.functional.jacobian(lambda t: GeM(p=3.0)(t).sum(), x)
    reference = torch.autograd.functional.jacobian(lambda t: t.pow(3).mean(dim=(2, 3)).pow(1 / 3).sum(), x)
    torch.testing.assert_close(gradient, reference)  # the peak's own path cancels: the same gradient


def test_curricularface_statistic_is_identical_across_ddp_ranks(tmp_path) -> None:
    import json
    from pathlib import Path

    from helpers import ForkedRun, finished, free_port

    port = free_port()
    script = Path(__file__).parent / "scripts" / "curricularface_ddp.py"
    finished(ForkedRun([str(port), str(tmp_path)], tmp_path, script=script), timeout=120)
    t0, t1 = (json.loads((tmp_path / f"t{r}.json").read_text()) for r in (0, 1))
    expected = json.loads((tmp_path / "expected.json").read_text())
    assert t0 == t1
    assert abs(t0 - expected) < 1e-6 and abs(expected) > 1e-4


def test_curricularface_t_stays_fp32_under_bf16_true() -> None:
    """Lightning's bf16-true converts the module (every buffer) and makes bf16 the default dtype."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    precision = HalfPrecision("bf16-true")
    with precision.module_init_context():
        head = CurricularFaceMargin(scale=4.0, margin=0.5)
    reference = CurricularFaceMargin(scale=4.0, margin=0.5).train()
    head = precision.convert_module(head).train()
    assert head.t.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        cos = (torch.rand(300, 5, generator=gen) * 0.4 + 0.5).to(torch.bfloat16)
        labels = torch.randint(0, 5, (300,), generator=gen)
        with precision.forward_context():
            head(cos, labels)
        reference(cos.float(), labels)
    assert head.t.dtype == torch.float32
    torch.testing.assert_close(head.t, reference.t, rtol=1e-6, atol=1e-7)
    head.to(torch.float64)
    assert head.t.dtype == torch.float32  # conversions keep the statistic's value and precision


def test_a_margin_in_degrees_is_refused() -> None:
    """pytorch-metric-learning takes ArcFace's margin in degrees; here it is radians, and 28.6 would train."""
    from retrieval_lightning.layers.margins import build_margin

    assert build_margin("arcface", 45.25, 0.1).margin == 0.1
    for kind in ("arcface", "curricularface"):
        with pytest.raises(ValueError, match=r"margin must be in radians.*28.6 degrees would be 0.4992"):
            build_margin(kind, 45.25, 28.6)


def test_curricularface_target_beyond_pi_minus_m_falls_back_to_a_subtracted_margin() -> None:
    """theta_y > pi - m (target cosine below cos(pi - m)): cos(theta + m) would no longer fall with theta, so the
    target logit is cos(theta_y) - sin(pi - m) * m, lower than the plain cosine."""
    m, s = 0.5, 2.0
    head = CurricularFaceMargin(scale=s, margin=m).train()
    cos = torch.tensor([[-0.95, 0.1, -0.2]])
    out = head(cos, torch.tensor([0]))
    assert float(out[0, 0]) == pytest.approx(s * (-0.95 - math.sin(math.pi - m) * m), abs=1e-5)
    assert float(out[0, 0]) < s * -0.95


def test_the_default_logit_scale_is_the_square_root_of_the_descriptor_size() -> None:
    from heads.gem_arcface import GemArcFaceHead

    head = GemArcFaceHead(dim=16)
    head.build({"conv5": 32}, 5)
    assert head.margin.scale == pytest.approx(4.0)
    head = GemArcFaceHead(dim=16, scale=30.0)
    head.build({"conv5": 32}, 5)
    assert head.margin.scale == 30.0
