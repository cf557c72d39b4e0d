"""The verifier's pair logits with the database side masked, and how gradients reach the mask.

Why this is not ``pair_logits(q, d * mask)``: the verifier correlates L2-normalised features, so
scaling a database row by a soft mask value changes nothing and the gradient of the loss along the
row (hence to its mask) is exactly zero; only a hard 0 matters, where the normalisation's eps makes
the gradient explode. Two estimators therefore:

- ``straight_through``: the verifier takes ``db_masks`` (weights on the database side's
  *normalised* rows, i.e. on the correlation), so a soft mask has a real gradient;
- ``score_function``: works with any verifier; the loss of a sampled hard mask weights the
  gradient of its log-probability (REINFORCE), with the deterministic top-k's loss as baseline.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _accepts(verifier: Any, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(verifier.pair_logits).parameters
    except (TypeError, ValueError):
        return False


def accepts_db_masks(verifier: Any) -> bool:
    return _accepts(verifier, "db_masks")


Fill = Callable[[Tensor, Tensor], Tensor]


def masked_pair_logits(verifier: Any, query_levels: Sequence[Tensor], db_levels: Sequence[Tensor],
                       masks: Sequence[Tensor] | None, fill: Fill | None = None) -> Tensor:
    """(B, 2) logits; ``masks[i]`` (B, h_i, w_i) weights database level ``i`` (0 = dropped).

    ``fill(units, mask)`` (:func:`heads._sparse.fill.fill_dropped`) says what a dropped row holds;
    without it a dropped row is zero and contributes nothing.
    """
    if masks is None:
        return verifier.pair_logits(list(query_levels), list(db_levels))
    if accepts_db_masks(verifier) and (fill is None or _accepts(verifier, "db_fill")):
        extra = {"db_fill": fill} if fill is not None else {}
        return verifier.pair_logits(list(query_levels), list(db_levels), db_masks=list(masks), **extra)
    # exact in the forward pass for 0/1 masks: a zero row correlates to 0 with every query row, and
    # the verifier's own normalisation leaves the (unit) filled rows as they are
    if fill is not None:
        db = [fill(F.normalize(lv, dim=1, eps=1e-12), m) for lv, m in zip(db_levels, masks)]
    else:
        db = [lv * m.unsqueeze(1).to(lv.dtype) for lv, m in zip(db_levels, masks)]
    return verifier.pair_logits(list(query_levels), db)


def plackett_luce_logprob(logits: Tensor, perturbed: Tensor, k: int) -> Tensor:
    """log P of the first ``k`` of the order of ``perturbed`` under Plackett-Luce(``logits``), per row.

    Gumbel-top-k draws exactly this ordered sample; its score function is an unbiased gradient
    estimator for any loss of the kept set.
    """
    order = torch.sort(perturbed.detach(), dim=-1, descending=True).indices
    ordered = torch.gather(logits, -1, order)
    tail_lse = torch.logcumsumexp(ordered.flip(-1), dim=-1).flip(-1)  # logsumexp of the remaining items
    return (ordered[..., :k] - tail_lse[..., :k]).sum(-1)


def bernoulli_logprob(logits: Tensor, hard: Tensor) -> Tensor:
    """log P of independent keep coins ``hard`` (0/1) with P(keep) = sigmoid(logits), per row."""
    hard = hard.detach()
    return (hard * F.logsigmoid(logits) + (1 - hard) * F.logsigmoid(-logits)).sum(-1)
