"""Fast CVNet scoring: only the correlation entries the first strided 4D convolution reads.

Block 1 is a centre-pivot convolution with kernel 5 and stride 2: its query-plane half reads the
correlation at *every* query position but only at database positions (0, 2, 4, ...) of each axis,
its database-plane half the transpose. So instead of the full ``(9, hq, wq, hk, wk)`` tensor we
build two pieces, 7/16 of it together, each directly in the layout its convolution consumes.

The correlation of levels ``i`` (query) and ``j`` (database) resized to the full 4D size is linear
in each side's L2-normalised features, so one side can be resized *before* the inner products and
the other after: a piece costs ``n_i x (hk/2 * wk/2) x P`` multiply-adds instead of the full
``n_i x n_j x P`` plus a 4D resize. The clamp at 0 comes after the resize, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from heads._cvnet.network import CorrelationLearner

#: pyramid area scales; each side is ``round(h * sqrt(s))`` (Python rounding, as the official code)
SCALES: tuple[float, ...] = (0.25, 0.5, 1.0)


def level_sizes(h: int, w: int, scales: tuple[float, ...] = SCALES) -> list[tuple[int, int]]:
    return [(round(h * math.sqrt(s)), round(w * math.sqrt(s))) for s in scales]


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True; identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@dataclass
class LevelSet:
    """One side's projected pyramid, L2-normalised per location, as rows.

    ``native[i]``: (B, h_i*w_i, P) at the level's own size; ``even[i]``: (B, ceil(h/2)*ceil(w/2), P)
    the level resized to the full size (h, w) and sampled at even rows and columns. B may be 1 for
    a query shared by a batch of candidates (broadcast in the matrix products).
    """

    native: list[Tensor]
    even: list[Tensor]
    sizes: list[tuple[int, int]]
    full: tuple[int, int]

    @property
    def batch(self) -> int:
        return self.native[0].shape[0]


def prepare_levels(levels: list[Tensor], normalized: bool = False) -> LevelSet:
    """Projected levels (B, P, h_i, w_i), the last at full size -> a :class:`LevelSet`.

    A location whose features are all zero (a sparsifier dropped it) stays zero, so it adds
    nothing to any correlation.
    """
    full = tuple(levels[-1].shape[-2:])
    native, even, sizes = [], [], []
    for level in levels:
        unit = level if normalized else F.normalize(level, dim=1, eps=1e-12)
        b, p, h, w = unit.shape
        sizes.append((h, w))
        native.append(unit.reshape(b, p, h * w).transpose(1, 2))
        sampled = resize(unit, full)[:, :, ::2, ::2]
        even.append(sampled.reshape(b, p, -1).transpose(1, 2))
    return LevelSet(native, even, sizes, full)  # type: ignore[arg-type]


def _stack_rows(rows: list[Tensor]) -> Tensor:
    """[(B, n, P)] * L -> (B, n*L, P) with row index ``r*L + l`` (level innermost)."""
    return torch.stack(rows, dim=2).flatten(1, 2)


def block1_pieces(query: LevelSet, db: LevelSet) -> tuple[Tensor, Tensor]:
    """The two correlation pieces block 1 reads, clamped at 0, channel index ``3*i + j``.

    Returns ``by_query`` (B, hk', wk', hq, wq, 9): all query positions x even database positions
    (input of the query-plane half) and ``by_db`` (B, hq', wq', hk, wk, 9): even query positions x
    all database positions.
    """
    batch = max(query.batch, db.batch)
    (hq, wq), (hk, wk) = query.full, db.full
    hq2, wq2, hk2, wk2 = (hq + 1) // 2, (wq + 1) // 2, (hk + 1) // 2, (wk + 1) // 2
    levels = len(query.native)
    db_even = _stack_rows(db.even)  # (B, K'*L, P), row = k'*L + j
    per_query_level = []
    for i, (h, w) in enumerate(query.sizes):
        corr = torch.matmul(db_even, query.native[i].transpose(1, 2))  # (B, K'*L, n_i)
        corr = resize(corr.reshape(batch * hk2 * wk2, levels, h, w), (hq, wq))  # (N, j, hq, wq)
        per_query_level.append(corr.permute(0, 2, 3, 1))
    by_query = torch.stack(per_query_level, dim=3).reshape(batch, hk2, wk2, hq, wq, levels * levels)
    query_even = _stack_rows(query.even)  # (Bq, Q'*L, P), row = q'*L + i
    per_db_level = []
    for j, (h, w) in enumerate(db.sizes):
        corr = torch.matmul(query_even, db.native[j].transpose(1, 2))  # (B, Q'*L, n_j)
        corr = resize(corr.reshape(batch * hq2 * wq2, levels, h, w), (hk, wk))  # (N, i, hk, wk)
        per_db_level.append(corr.permute(0, 2, 3, 1))
    by_db = torch.stack(per_db_level, dim=4).reshape(batch, hq2, wq2, hk, wk, levels * levels)
    return by_query.clamp(min=0), by_db.clamp(min=0)


def pair_logits_fast(learner: CorrelationLearner, query: LevelSet, db: LevelSet) -> Tensor:
    """(B, 2) logits of aligned pairs (or one query against B candidates) through the 4D network."""
    by_query, by_db = block1_pieces(query, db)
    first = learner.block1[0]
    out = first.db_plane(by_db).contiguous()
    out = out.add_(first.query_plane(by_query))
    return learner.run(out, start=1)
