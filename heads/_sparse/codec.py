"""Sparse stored form of one projected verifier level: kept positions plus their feature rows.

A dense level is ``(h*w, P)`` rows (row ``y*w + x``) with its ``(h, w)``. The sparse form keeps
only selected rows: ``<level>_pos`` (row numbers, int16 or int32), ``<level>_val`` (the rows: fp16
(fp32 for exact checks against a verifier storing fp32); int8; or int4, two values per byte), with
integer values a scale per row (``<level>_scale`` fp16, one per kept row) or per image (one fp32),
and the unchanged ``<level>_hw``. :func:`decode_level`
scatters the rows back into zeros, so the verifier scores a sparse entry through its dense code path.

Why int4: in the same bytes it keeps about twice the locations of int8. On random unit rows of 256
channels (per-row scale) the error of an inner product with another unit vector has a standard
deviation of 0.0076 (int8: 0.00045), small next to what a dropped location loses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from retrieval_lightning.head import EntryKind

VALUE_DTYPES = ("float16", "float32", "int8", "int4")
INT_LEVELS = {"int8": 127, "int4": 7}  # largest magnitude of a symmetric code
SCALE_MODES = ("row", "image")
INDEX_DTYPES = ("int16", "int32")


def check_options(value_dtype: str, scale: str, index_dtype: str) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
    if scale not in SCALE_MODES:
        raise ValueError(f"the integer values' scale must be one of {SCALE_MODES}, got {scale!r}")
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")


def sparse_kinds(level: str, channels: int, value_dtype: str, scale: str, index_dtype: str) -> dict[str, EntryKind]:
    """The stored kinds replacing the dense kind ``level`` (its ``<level>_hw`` is kept as is)."""
    if value_dtype == "int4" and channels % 2:
        raise ValueError(f"{level}: int4 packs two channels per byte; {channels} channels is odd")
    value = EntryKind("uint8", (channels // 2,), ragged=True) if value_dtype == "int4" else \
        EntryKind(value_dtype, (channels,), ragged=True)
    kinds = {f"{level}_pos": EntryKind(index_dtype, (), ragged=True), f"{level}_val": value}
    if value_dtype in INT_LEVELS:
        kinds[f"{level}_scale"] = (EntryKind("float16", (), ragged=True) if scale == "row"
                                   else EntryKind("float32", (1,), ragged=False))
    return kinds


def quantize(rows: Tensor, scale: str, levels: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric integer codes in ``[-levels, levels]`` of ``rows`` (k, P), as int8, and the scale
    (per row fp16 (k,), per image fp32 (1,))."""
    rows = rows.float()
    if scale == "row":
        s = (rows.abs().amax(dim=1) / levels).half()
        s_used = s.float().unsqueeze(1)
    else:
        s = (rows.abs().amax() / levels).reshape(1)
        s_used = s.reshape(1, 1)
    q = torch.where(s_used > 0, rows / s_used.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(rows))
    return q.round().clamp_(-levels, levels).to(torch.int8), s


def pack_int4(codes: Tensor) -> Tensor:
    """(k, P) int8 codes in [-7, 7] -> (k, P/2) uint8: channel 2j in the low nibble, 2j+1 in the
    high one, each stored as code + 8."""
    biased = (codes.to(torch.int16) + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (k, P/2) uint8 -> (k, P) int8 codes."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], 2 * packed.shape[1])  # 0 rows too


def encode_level(level: str, rows: Tensor, positions: Tensor, value_dtype: str, scale: str,
                 index_dtype: str) -> dict[str, Tensor]:
    """Keep ``rows[positions]`` of a dense level (n, P); ``positions`` sorted, 1-D."""
    n = rows.shape[0]
    if index_dtype == "int16" and n > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{level}: {n} locations do not fit int16 positions; use index_dtype='int32'")
    kept = rows[positions]
    out = {f"{level}_pos": positions.to(getattr(torch, index_dtype)).cpu()}
    if value_dtype in ("float16", "float32"):
        out[f"{level}_val"] = kept.to(getattr(torch, value_dtype)).cpu()
    else:
        q, s = quantize(kept, scale, INT_LEVELS[value_dtype])
        out[f"{level}_val"] = (pack_int4(q) if value_dtype == "int4" else q).cpu()
        out[f"{level}_scale"] = s.cpu()
    return out


def decode_level(level: str, parts: dict[str, Tensor], hw: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Dense ``(h*w, P)`` rows of ``level``: stored rows at their positions, zeros elsewhere; in ``dtype``
    (default: fp32 for rows stored in fp32, fp16 otherwise, the dense entries' default)."""
    h, w = (int(v) for v in hw.reshape(-1)[:2])
    pos = parts[f"{level}_pos"].long().reshape(-1)
    val = parts[f"{level}_val"]
    if dtype is None:
        dtype = torch.float32 if val.dtype == torch.float32 else torch.float16
    if val.dtype == torch.uint8:  # int4, packed
        val = unpack_int4(val)
    if val.dtype == torch.int8:
        s = parts[f"{level}_scale"].float()
        values = val.float() * (s.reshape(-1, 1) if s.numel() == val.shape[0] and s.ndim == 1 else s.reshape(1, 1))
    else:
        values = val.float()
    dense = torch.zeros(h * w, val.shape[1], dtype=torch.float32)
    dense[pos] = values
    return dense.to(dtype)


def bytes_per_image(kinds: dict[str, EntryKind], rows: dict[str, float], offset_bytes: int = 8) -> float:
    """Stored bytes of one image's re-ranking entry: ragged kinds' ``rows * row bytes``, fixed kinds'
    bytes, and the store's int64 offset for every kind (``retrieval_lightning.retrieval.store``
    layout): an entry reaches the store one tensor per image, so a fixed kind (``level0_hw``) is
    kept with an offset too, as the store's own ``bytes_per_image`` counts it."""
    total = 0.0
    for name, kind in kinds.items():
        row = np.dtype(kind.dtype).itemsize * int(np.prod(kind.shape, dtype=np.int64))
        total += (row * rows[name] if kind.ragged else row) + offset_bytes
    return total
