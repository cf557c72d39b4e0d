"""A straightforward CVNet written from the paper, on official-layout weights (test-side reference).

Everything is plain functional PyTorch on a state dict with the official key names, in NCHW 6D
tensors: the full-size 9-channel correlation is built for every pair and the centre-pivot
convolutions are run by folding the other plane into the batch, as the official scorer does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_SPECS = {1: [(5, 2)], 2: [(3, 1), (3, 2)], 3: [(3, 1), (3, 1), (3, 2)], 4: [(3, 1), (3, 1), (3, 1)]}
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_EPS = 1e-5


def _bn(state: dict, prefix: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, BN_EPS)


def pycls_resnet(state: dict, x: Tensor, depth: int, prefix: str = "encoder_q") -> tuple[Tensor, Tensor]:
    """The pycls ResNet (stride on the 3x3) -> (conv4 of the last s3 block before its ReLU, conv5)."""
    x = F.conv2d(x, state[f"{prefix}.stem.conv.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(_bn(state, f"{prefix}.stem.bn", x)), 3, stride=2, padding=1)
    conv4 = None
    for stage, blocks in enumerate(DEPTHS[depth], start=1):
        for b in range(1, blocks + 1):
            p = f"{prefix}.s{stage}.b{b}"
            stride = 2 if (b == 1 and stage > 1) else 1
            y = F.relu(_bn(state, f"{p}.f.a_bn", F.conv2d(x, state[f"{p}.f.a.weight"])))
            y = F.relu(_bn(state, f"{p}.f.b_bn", F.conv2d(y, state[f"{p}.f.b.weight"], stride=stride, padding=1)))
            y = _bn(state, f"{p}.f.c_bn", F.conv2d(y, state[f"{p}.f.c.weight"]))
            short = _bn(state, f"{p}.bn", F.conv2d(x, state[f"{p}.proj.weight"], stride=stride)) if b == 1 else x
            x = short + y
            if stage == 3 and b == blocks:
                conv4 = x.clone()
            x = F.relu(x)
    return conv4, x


def global_descriptor(state: dict, x: Tensor, depth: int) -> Tensor:
    """GeM (learnable p, clamp 1e-6) on conv5, FC, L2."""
    _, conv5 = pycls_resnet(state, x, depth)
    p = state["encoder_q.head.pool.p"]
    pooled = conv5.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return F.normalize(F.linear(pooled, state["encoder_q.head.fc.weight"], state["encoder_q.head.fc.bias"]), dim=-1)


def _interp4d(corr: Tensor, size: tuple[int, int, int, int]) -> Tensor:
    """(B, ha, wa, hb, wb) -> resized bilinearly (align_corners) in the query then the database plane."""
    b, ha, wa, hb, wb = corr.shape
    x = corr.reshape(b, ha, wa, hb * wb).permute(0, 3, 1, 2)
    x = F.interpolate(x, size[:2], mode="bilinear", align_corners=True)  # (b, hb*wb, Ha, Wa)
    x = x.reshape(b, hb, wb, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size[2:], mode="bilinear", align_corners=True)  # (b, Ha*Wa, Hb, Wb)
    return x.reshape(b, *size)


def pyramid(state: dict, conv4: Tensor) -> list[Tensor]:
    """Projected levels at area scales 0.25, 0.5, 1 (sides rounded as Python's round; a one-cell side,
    where the official code asks for a zero-sized level and fails, stays one cell)."""
    h, w = conv4.shape[-2:]
    out = []
    for i, s in enumerate((0.25, 0.5, 1.0)):
        size = (max(1, round(h * math.sqrt(s))), max(1, round(w * math.sqrt(s))))
        resized = F.interpolate(conv4, size, mode="bilinear", align_corners=True)
        out.append(F.conv2d(resized, state[f"conv2ds.{i}.weight"], padding=1))
    return out


def full_correlation(state: dict, conv4_q: Tensor, conv4_k: Tensor) -> Tensor:
    """(B, 9, hq, wq, hk, wk): cosine of every level pair, resized to full size, clamped at 0."""
    return correlation_of_levels(pyramid(state, conv4_q), pyramid(state, conv4_k))


def correlation_of_levels(qs: list[Tensor], ks: list[Tensor]) -> Tensor:
    hq, wq = qs[-1].shape[-2:]
    hk, wk = ks[-1].shape[-2:]
    maps = []
    for q in qs:
        for k in ks:
            b, c = q.shape[:2]
            qf, kf = q.reshape(b, c, -1), k.reshape(b, c, -1)
            dot = torch.bmm(qf.transpose(1, 2), kf)
            norms = torch.bmm(qf.norm(dim=1).unsqueeze(2), kf.norm(dim=1).unsqueeze(1)) + 1e-8
            corr = (dot / norms).reshape(b, *q.shape[-2:], *k.shape[-2:])
            maps.append(_interp4d(corr, (hq, wq, hk, wk)))
    return torch.stack(maps, dim=1).clamp(min=0)


def _cp_conv4d(state: dict, p: str, x: Tensor, kernel: int, stride: int) -> Tensor:
    b, c, ha, wa, hb, wb = x.shape
    pad = kernel // 2
    xk = x[..., ::stride, ::stride]  # query-plane conv at kept database positions
    _, _, _, _, hb2, wb2 = xk.shape
    y1 = F.conv2d(xk.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, ha, wa), state[f"{p}.conv1.weight"],
                  state[f"{p}.conv1.bias"], stride=stride, padding=pad)
    o, ha2, wa2 = y1.shape[1:]
    y1 = y1.reshape(b, hb2, wb2, o, ha2, wa2).permute(0, 3, 4, 5, 1, 2)
    xq = x[:, :, ::stride, ::stride]
    y2 = F.conv2d(xq.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hb, wb), state[f"{p}.conv2.weight"],
                  state[f"{p}.conv2.bias"], stride=stride, padding=pad)
    y2 = y2.reshape(b, ha2, wa2, o, hb2, wb2).permute(0, 3, 1, 2, 4, 5)
    return y1 + y2


def learner_logits(state: dict, corr: Tensor, prefix: str = "cv_learner") -> Tensor:
    x = corr
    for block, specs in BLOCK_SPECS.items():
        for n, (kernel, stride) in enumerate(specs):
            p = f"{prefix}.block{block}"
            x = _cp_conv4d(state, f"{p}.{3 * n}", x, kernel, stride)
            x = F.relu(F.group_norm(x, 4, state[f"{p}.{3 * n + 1}.weight"], state[f"{p}.{3 * n + 1}.bias"]))
    pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    hidden = F.relu(F.linear(pooled, state[f"{prefix}.mlp.0.weight"], state[f"{prefix}.mlp.0.bias"]))
    return F.linear(hidden, state[f"{prefix}.mlp.2.weight"], state[f"{prefix}.mlp.2.bias"])


def reference_logits(state: dict, conv4_q: Tensor, conv4_k: Tensor) -> Tensor:
    """Official-style scoring of one (or aligned batches of) conv4 pairs -> (B, 2) logits."""
    return learner_logits(state, full_correlation(state, conv4_q, conv4_k))


def head_state_as_official(head_state: dict) -> dict:
    """This framework's verifier keys -> the official names the reference reads."""
    out = {}
    for key, value in head_state.items():
        if key.startswith("projections."):
            out["conv2ds." + key[len("projections."):]] = value
        elif key.startswith("learner."):
            out["cv_learner." + key[len("learner."):]] = value
    return out
