"""Fast CVNet scoring: block 1 straight from the features, in cache-sized chunks.

Block 1 is a centre-pivot convolution with kernel 5 and stride 2: its query-plane half reads the
correlation at *every* query position but only at database positions (0, 2, 4, ...) of each axis,
its database-plane half the transpose. So only those entries (7/16 of the 4D correlation) are
built, and never all at once: a chunk of database (or query) positions is correlated with one
matrix product, clamped at 0 into the channels-last layout the 2D convolution reads, convolved,
and only the 16-channel block-1 output is kept. The large 9-channel correlation never leaves the
cache, which matters more than arithmetic on a CPU whose memory is shared.

The correlation of levels ``i`` (query) and ``j`` (database) resized to the full 4D size is
linear in each side's L2-normalised features, so both sides are resized *before* the inner
products (bilinear, align_corners); the clamp at 0 comes after, as in the paper. Resizing the
features costs a few more multiply-adds than resizing products but removes every pass over the
big tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from heads._cvnet.network import CenterPivotConv4d, CorrelationLearner

#: pyramid area scales; each side is ``round(h * sqrt(s))`` (Python rounding, as the official code), at least 1
SCALES: tuple[float, ...] = (0.25, 0.5, 1.0)
#: positions of the other plane correlated per matrix product. At R50 768x1024 a chunk's products are
#: 14 MB: past L2, within a server's L3. Measured on a 2-core AMD EPYC (benchmarks/cvnet_rerank.py,
#: alternating runs): 0.42 s per pair against 0.52 s with 32 (3.5 MB, the first machine's choice)
CHUNK = 128


def level_sizes(h: int, w: int, scales: tuple[float, ...] = SCALES) -> list[tuple[int, int]]:
    """Each level's (h, w). A side of one cell (an image of at most 16 px on that side at stride 16) stays
    one cell at every level: the official code asks for a zero-sized level there and fails, which would stop a
    whole database's extraction at one thumbnail. Every larger side is the official size."""
    return [(max(1, round(h * math.sqrt(s))), max(1, round(w * math.sqrt(s)))) for s in scales]


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True; identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@dataclass
class LevelSet:
    """One side's projected pyramid, L2-normalised per location, resized to the full size, as rows.

    ``rows``: (B, h*w*L, P), row ``r*L + l`` = level ``l`` at full-size position ``r``;
    ``even``: the same at even rows and columns only, (B, ceil(h/2)*ceil(w/2)*L, P). B may be 1
    for a query shared by a batch of candidates.
    """

    rows: Tensor
    even: Tensor
    full: tuple[int, int]
    levels: int

    @property
    def batch(self) -> int:
        return self.rows.shape[0]


def prepare_levels(levels: list[Tensor], normalized: bool = False) -> LevelSet:
    """Projected levels (B, P, h_i, w_i), the last at full size -> a :class:`LevelSet`.

    A location whose features are all zero (a sparsifier dropped it) stays zero, so it adds
    nothing to any correlation.
    """
    full = tuple(levels[-1].shape[-2:])
    ups = [resize(level if normalized else F.normalize(level, dim=1, eps=1e-12), full) for level in levels]
    stacked = torch.stack(ups, dim=-1)  # (B, P, h, w, L)
    rows = stacked.permute(0, 2, 3, 4, 1).flatten(1, 3).contiguous()
    even = stacked[:, :, ::2, ::2].permute(0, 2, 3, 4, 1).flatten(1, 3).contiguous()
    return LevelSet(rows, even, full, len(levels))  # type: ignore[arg-type]


def _pick(rows: Tensor, b: int) -> Tensor:
    return rows[b if rows.shape[0] > 1 else 0]


def _clamped(pieces: Tensor, buffer: list[Tensor] | None, size: int) -> Tensor:
    """(c, n, L, L) strided view of products -> contiguous, clamped at 0.

    Without autograd the result goes into ``buffer[0]`` (``size`` elements, allocated on first use
    in the products' dtype, which autocast may have made bf16); with autograd (``buffer`` None) a
    fresh tensor, since ``out=`` is not differentiable.
    """
    if buffer is None:
        return pieces.clamp(min=0).contiguous()
    if not buffer or buffer[0].dtype != pieces.dtype:
        buffer[:] = [pieces.new_empty(size)]
    out = buffer[0][: pieces.numel()].view(pieces.shape)
    return torch.clamp_min(pieces, 0, out=out)


def _conv(conv: torch.nn.Conv2d, x: Tensor, h: int, w: int) -> Tensor:
    """(c, h*w, C) channels-last rows -> conv2d -> (c, h'*w', O) contiguous."""
    c = x.shape[0]
    y = conv(x.view(c, h, w, -1).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(c, -1, y.shape[1])


def block1(first: CenterPivotConv4d, query: LevelSet, db: LevelSet, chunk: int = CHUNK) -> Tensor:
    """The first 4D convolution (kernel 5, stride 2) -> (B, hq', wq', hk', wk', O), channels innermost."""
    batch, levels = max(query.batch, db.batch), query.levels
    (hq, wq), (hk, wk) = query.full, db.full
    hq2, wq2, hk2, wk2 = (hq + 1) // 2, (wq + 1) // 2, (hk + 1) // 2, (wk + 1) // 2
    nq, nk, nq2, nk2 = hq * wq, hk * wk, hq2 * wq2, hk2 * wk2
    grad = torch.is_grad_enabled()
    buffer: list[Tensor] | None = None if grad else []
    size = chunk * max(nq, nk) * levels * levels
    by_db, by_query = [], []
    for b in range(batch):
        q_even, q_rows = _pick(query.even, b), _pick(query.rows, b)
        k_even, k_rows = _pick(db.even, b), _pick(db.rows, b)
        for start in range(0, nq2, chunk):  # database-plane half: even query positions x all db positions
            stop = min(start + chunk, nq2)
            prod = q_even[start * levels : stop * levels] @ k_rows.t()  # (c*L_i, nk*L_j)
            x = _clamped(prod.view(stop - start, levels, nk, levels).transpose(1, 2), buffer, size)
            by_db.append(_conv(first.conv2, x.view(stop - start, nk, -1), hk, wk))  # (c, nk2, O)
        for start in range(0, nk2, chunk):  # query-plane half: all query positions x even db positions
            stop = min(start + chunk, nk2)
            prod = k_even[start * levels : stop * levels] @ q_rows.t()  # (c*L_j, nq*L_i)
            x = _clamped(prod.view(stop - start, levels, nq * levels).transpose(1, 2), buffer, size)
            by_query.append(_conv(first.conv1, x.view(stop - start, nq, -1), hq, wq))  # (c, nq2, O)
    out = torch.cat(by_db).view(batch, nq2, nk2, -1)
    query_half = torch.cat(by_query).view(batch, nk2, nq2, -1).transpose(1, 2)
    out = out + query_half if grad else out.add_(query_half)
    return out.view(batch, hq2, wq2, hk2, wk2, -1)


def pair_logits_fast(learner: CorrelationLearner, query: LevelSet, db: LevelSet) -> Tensor:
    """(B, 2) logits of aligned pairs (or one query against B candidates) through the 4D network."""
    return learner.run(block1(learner.block1[0], query, db), start=1)
