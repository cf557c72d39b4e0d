"""The CVNet 4D network on channels-last 4D tensors ``(B, hq, wq, hk, wk, C)``.

Parameter names follow the official layout (``block{1..4}.{0,3,6}.conv{1,2}``, GroupNorm at
``.{1,4,7}``, ``mlp.{0,2}``) so an official checkpoint maps by prefix. The computation keeps the
channels innermost: each centre-pivot half is then a channels-last ``conv2d`` over one plane with
the other plane as the batch, and only the query-plane half needs a transpose (the official code
permutes the whole tensor four times per convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: (out channels, kernel, stride) per convolution of each block (REFERENCE §2)
BLOCKS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((16, 5, 2),),
    ((16, 3, 1), (32, 3, 2)),
    ((32, 3, 1), (32, 3, 1), (64, 3, 2)),
    ((64, 3, 1), (64, 3, 1), (128, 3, 1)),
)


def _as_nchw_cl(rows: Tensor, h: int, w: int) -> Tensor:
    """(N, h*w or h, w, C) contiguous -> an NCHW view with channels-last strides (no copy)."""
    return rows.reshape(rows.shape[0], h, w, rows.shape[-1]).permute(0, 3, 1, 2)


class CenterPivotConv4d(nn.Module):
    """Centre-pivot 4D convolution: a 2D conv over the query plane plus one over the database plane.

    ``conv1`` slides over the query plane at every kept database position, ``conv2`` over the
    database plane at every kept query position; a strided layer keeps every ``stride``-th
    position of the *other* plane (positions 0, s, 2s, ...) before convolving, so both halves land
    on the same output grid.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        self.stride = stride

    def query_plane(self, x: Tensor) -> Tensor:
        """``conv1`` over (hq, wq) for a (B, hk', wk', hq, wq, C) tensor -> (B, hq', wq', hk', wk', O)."""
        b, hk, wk, hq, wq, c = x.shape
        out = self.conv1(_as_nchw_cl(x.reshape(b * hk * wk, hq, wq, c), hq, wq))
        o, hq2, wq2 = out.shape[1:]
        return out.permute(0, 2, 3, 1).reshape(b, hk, wk, hq2, wq2, o).permute(0, 3, 4, 1, 2, 5)

    def db_plane(self, x: Tensor) -> Tensor:
        """``conv2`` over (hk, wk) for a (B, hq', wq', hk, wk, C) tensor -> (B, hq', wq', hk', wk', O)."""
        b, hq, wq, hk, wk, c = x.shape
        out = self.conv2(_as_nchw_cl(x.reshape(b * hq * wq, hk, wk, c), hk, wk))
        o, hk2, wk2 = out.shape[1:]
        return out.permute(0, 2, 3, 1).reshape(b, hq, wq, hk2, wk2, o)

    def forward(self, x: Tensor) -> Tensor:
        """(B, hq, wq, hk, wk, C) -> (B, hq', wq', hk', wk', O), channels innermost."""
        s = self.stride
        by_db = self.db_plane(x[:, ::s, ::s] if s > 1 else x)
        kept = x[:, :, :, ::s, ::s] if s > 1 else x
        by_query = self.query_plane(kept.permute(0, 3, 4, 1, 2, 5))
        return by_db.contiguous().add_(by_query)


def group_norm_relu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm + ReLU on a channels-last tensor (statistics per sample and group, in fp32).

    Without autograd it works in place: each channel is centred on its own mean first, so the sums
    of squares (the Gram diagonal, a matrix product: fast on this layout) do not cancel when a
    channel's mean is large next to its spread; the group variance adds the spread of the channel
    means. A single multiply-add and ReLU then finish (``var_mean`` over the strided group view
    costs several times more).
    """
    b, c, g = x.shape[0], x.shape[-1], norm.num_groups
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        xv = x.float().reshape(b, -1, g, c // g)
        var, mean = torch.var_mean(xv, dim=(1, 3), keepdim=True, unbiased=False)
        y = ((xv - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
        return F.relu(torch.addcmul(norm.bias, y, norm.weight)).to(x.dtype)
    flat = x.view(b, -1, c)
    n = flat.shape[1]
    channel_mean = flat.mean(1, keepdim=True)  # (b, 1, c)
    flat.sub_(channel_mean)
    squares = torch.diagonal(flat.transpose(1, 2) @ flat, dim1=1, dim2=2).double().view(b, g, -1)
    means = channel_mean.double().view(b, g, -1)
    offset = means - means.mean(-1, keepdim=True)  # each channel's mean less its group's
    var = (squares.sum(-1, keepdim=True) / n + offset.square().sum(-1, keepdim=True)) / (c // g)
    scale = norm.weight.view(g, -1).double() * torch.rsqrt(var + norm.eps)  # (b, g, c/g)
    shift = (norm.bias.view(g, -1).double() + offset * scale).float()
    return torch.addcmul(shift.view(b, 1, c), flat, scale.float().view(b, 1, c), out=flat).relu_().view(x.shape)


class CorrelationLearner(nn.Module):
    """Four centre-pivot blocks (each conv followed by GroupNorm(4) and ReLU), mean pooling, MLP -> 2 logits."""

    def __init__(self, in_channels: int = 9, groups: int = 4) -> None:
        super().__init__()
        channels = in_channels
        for index, spec in enumerate(BLOCKS, start=1):
            layers: list[nn.Module] = []
            for out, kernel, stride in spec:
                layers += [CenterPivotConv4d(channels, out, kernel, stride), nn.GroupNorm(groups, out), nn.ReLU()]
                channels = out
            setattr(self, f"block{index}", nn.Sequential(*layers))
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, 2))

    def blocks(self) -> list[nn.Sequential]:
        return [self.block1, self.block2, self.block3, self.block4]

    def run(self, x: Tensor, start: int = 0) -> Tensor:
        """Apply the layers of every block from flat layer index ``start`` on; mean-pool; MLP logits."""
        layers = [layer for block in self.blocks() for layer in block][start:]
        for layer in layers:
            if isinstance(layer, CenterPivotConv4d):
                x = layer(x)
            elif isinstance(layer, nn.GroupNorm):
                x = group_norm_relu(x, layer)
        pooled = x.float().reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        return self.mlp(pooled)

    def forward(self, corr: Tensor) -> Tensor:
        """Dense (B, hq, wq, hk, wk, 9) correlation -> (B, 2) logits."""
        return self.run(corr)
