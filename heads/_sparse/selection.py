"""Which locations of a level to keep: the extraction top-k and its training relaxations.

Why two relaxations: ``topk`` keeps exactly the extraction budget in every training step (the
verifier sees as many locations as it will at test time; which ones is a Gumbel sample around the
extraction's top-k) and lets gradients reach the logits through a sigmoid around the k-th
perturbed logit; ``concrete`` (binary Gumbel / concrete, one coin per
location) lets the kept fraction float, held at the target by :func:`budget_loss`. Both are
straight-through: the forward mask is exactly 0/1, so a dropped location's own features never
reach the verifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

RELAXATIONS = ("topk", "concrete")


def keep_count(n: int, keep_ratio: float) -> int:
    """Locations kept out of ``n`` at ``keep_ratio``: ``round(keep_ratio * n)``, at least 1, at most n."""
    if n <= 0:
        return 0
    return int(min(n, max(1, round(keep_ratio * n))))


def budget_counts(sizes: Sequence[int], budget: int) -> list[int]:
    """A per-image ``budget`` of locations shared by levels of ``sizes`` locations in proportion to their size,
    rounded by largest remainder; each non-empty level keeps at least 1 and at most all of its locations. A
    level raised to 1 (or held at its size) is paid for by (or gives to) the levels furthest above (below) their
    share, so the counts add up to the budget whenever it lies between the non-empty levels and the locations."""
    total = sum(sizes)
    if total <= 0:
        return [0] * len(sizes)
    shares = [budget * n / total for n in sizes]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: budget - sum(counts)]:
        counts[i] += 1
    counts = [min(n, max(1, c)) if n > 0 else 0 for n, c in zip(sizes, counts)]
    while sum(counts) > budget and (over := [i for i, c in enumerate(counts) if c > 1]):
        counts[max(over, key=lambda i: (counts[i] - shares[i], -i))] -= 1
    while sum(counts) < budget and (room := [i for i, (c, n) in enumerate(zip(counts, sizes)) if c < n]):
        counts[min(room, key=lambda i: (counts[i] - shares[i], i))] += 1
    return counts


def spread_topk(scores: Tensor, k: int, hw: tuple[int, int], spread: float) -> tuple[Tensor, Tensor]:
    """Greedy top-k of (B, h*w) ``scores`` in which every kept location lowers its neighbours' scores.

    Why: neighbouring locations have similar features, hence similar scores, so a plain top-k keeps
    clusters and leaves whole regions to be filled from far away; the fill of dropped locations
    (:mod:`heads._sparse.fill`) reconstructs a level best from kept cells spread over it. Each pick
    subtracts ``spread`` x (the image's score standard deviation) x a Gaussian of the distance from
    every remaining score; the Gaussian's sigma is half the mean spacing of kept cells,
    ``0.5 / sqrt(k / (h*w))`` cells. ``spread`` 0 is the plain top-k.

    Returns the 0/1 mask (B, h*w) and each location's competing score: the score less the
    suppression it had when picked (kept) or at the end (dropped), a constant offset the
    straight-through relaxation puts its threshold in.
    """
    b, n = scores.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"{n} scores for a {h}x{w} level")
    scores = scores.float()
    if k >= n or k <= 0 or spread <= 0:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : min(max(k, 0), n)]  # ties: first
        return torch.zeros_like(scores).scatter_(1, order, 1.0), scores
    sigma = 0.5 / math.sqrt(k / n)
    ys = torch.arange(n, device=scores.device) // w
    xs = torch.arange(n, device=scores.device) % w
    scale = spread * scores.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-6)
    rows = torch.arange(b, device=scores.device)
    penalty = torch.zeros_like(scores)
    competing = scores.clone()
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for _ in range(k):
        pick = (scores - penalty).masked_fill(kept, float("-inf")).argmax(dim=1)
        competing[rows, pick] = scores[rows, pick] - penalty[rows, pick]
        kept[rows, pick] = True
        d2 = (ys[None] - ys[pick][:, None]) ** 2 + (xs[None] - xs[pick][:, None]) ** 2
        arg = (d2.float() / (2.0 * sigma * sigma)).clamp_max(30.0)
        penalty += scale * torch.exp(-arg) * (arg < 30.0)  # beyond 7.7 sigma: exactly 0
    competing = torch.where(kept, competing, scores - penalty)
    return kept.float(), competing


def gumbel_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).clamp_(1e-6, 1.0 - 1e-6)
    return -torch.log(-torch.log(u))


def topk_st_mask(logits: Tensor, k: int, tau: float, noise: bool = True,
                 generator: torch.Generator | None = None, hw: tuple[int, int] | None = None,
                 spread: float = 0.0) -> Tensor:
    """Straight-through Gumbel top-k over the last dim of ``logits`` (B, N) -> (B, N) mask.

    Forward: exactly ``k`` ones per row, the top-k of the perturbed logits (Gumbel-top-k samples k
    locations without replacement from softmax(logits)); with ``spread`` > 0 (and the level's
    ``hw``), the greedy :func:`spread_topk` of the perturbed logits. Backward: the gradient of
    ``sigmoid((g - t) / tau)``, ``t`` halfway between the k-th and (k+1)-th perturbed logits (with
    ``spread``: ``g`` less its suppression, ``t`` halfway between the lowest kept and the highest
    dropped of those).
    """
    n = logits.shape[-1]
    g = logits + gumbel_like(logits, generator) if noise else logits
    if k >= n:
        return torch.ones_like(logits)
    if spread > 0 and k > 0:
        if hw is None:
            raise ValueError("spread needs the level's (h, w)")
        hard, competing = spread_topk(g.detach(), k, hw, spread)
        low_kept = competing.masked_fill(hard == 0, float("inf")).min(dim=-1).values
        high_dropped = competing.masked_fill(hard == 1, float("-inf")).max(dim=-1).values
        threshold = 0.5 * (low_kept + high_dropped)
        soft = torch.sigmoid((g + (competing - g.detach()) - threshold.unsqueeze(-1)) / tau)
        return hard.to(logits.dtype) + (soft - soft.detach())  # exactly 0/1 forward
    top = torch.topk(g.detach(), k + 1, dim=-1).values
    threshold = 0.5 * (top[..., k - 1] + top[..., k]) if k > 0 else top[..., 0] + 1.0
    soft = torch.sigmoid((g - threshold.unsqueeze(-1)) / tau)
    # the k first by a stable sort, not ``g > threshold``: tied k-th and (k+1)-th logits (no noise, bf16) kept none
    order = torch.sort(g.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    hard = torch.zeros_like(logits).scatter_(-1, order, 1.0)
    return hard + (soft - soft.detach())  # exactly 0/1 forward


def concrete_st_mask(logits: Tensor, tau: float, noise: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """Straight-through binary concrete: keep where ``sigmoid((l + logistic noise) / tau) > 0.5``."""
    if noise:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logits / tau)
    hard = (soft.detach() > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward


def budget_loss(logits: Tensor, target: float) -> Tensor:
    """Squared gap between the expected kept fraction ``mean(sigmoid(logits))`` and ``target``."""
    return (torch.sigmoid(logits).mean() - target) ** 2


def temperature(step: int, start: float, end: float, steps: int) -> float:
    """Geometric annealing from ``start`` to ``end`` over ``steps`` training steps, then flat."""
    if steps <= 0 or start == end:
        return float(end)
    t = min(max(step, 0), steps) / steps
    return float(math.exp((1.0 - t) * math.log(start) + t * math.log(end)))
