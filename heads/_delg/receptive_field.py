"""Receptive-field centres of a CNN's feature cells, traced analytically from the ops it runs.

A DELG keypoint is the centre of the receptive field of a feature-map cell. Rather than hard-code
ResNet's "stride 16/32, offset 0", :func:`trace_centres` runs the backbone once under a
``TorchDispatchMode`` and propagates, op by op, the affine map ``pixel = stride * cell + offset``
(per axis, in input-pixel index coordinates: pixel ``(0, 0)``'s centre is ``(0, 0)``):

- convolution / max / avg pooling with kernel ``k``, stride ``s``, padding ``p``, dilation ``d``:
  ``offset += stride * ((k - 1) * d / 2 - p)``, ``stride *= s`` (the centre of the window);
- constant padding (timm's TF-"same" convs pad asymmetrically before a padding-0 conv):
  ``offset -= stride * pad_before``;
- strided slicing on a spatial axis (DELG's ``conv4[..., ::2, ::2]``): start and step applied;
- anything else whose output has the spatial size of a traced input (activations, BatchNorm,
  residual sums, SE gating by a pooled vector, casts): the map passes through. When a residual
  sum joins branches whose centres differ (ResNet-D's average-pooled shortcut), the offsets are
  averaged: the true effective centre lies between them.

Because it follows the real ops, input-size-dependent padding is exact for the size traced, so
:class:`CentreCache` keys its results by input size. An op that changes the spatial size in an
unknown way (interpolation) leaves its output untraced and the lookup fails loudly. The tests
check the result against an empirical measurement (centroid of the input gradient of one cell).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten


@dataclass(frozen=True)
class AxisMap:
    """``pixel = stride * cell + offset`` on one axis; ``rf`` is the receptive-field size (pixels)."""

    stride: float
    offset: float
    rf: float = 1.0

    def window(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> AxisMap:
        centre = (kernel - 1) * dilation / 2.0 - padding
        return AxisMap(self.stride * stride, self.offset + self.stride * centre,
                       self.rf + (kernel - 1) * dilation * self.stride)


@dataclass(frozen=True)
class CellCentres:
    """Centre mapping of a feature map's cells: ``(y, x) = (sy * i + oy, sx * j + ox)`` in pixels."""

    y: AxisMap
    x: AxisMap

    def subsampled(self, step: int) -> CellCentres:
        """The mapping of ``map[..., ::step, ::step]`` (DELG's stride-32 conv4)."""
        return CellCentres(AxisMap(self.y.stride * step, self.y.offset, self.y.rf),
                           AxisMap(self.x.stride * step, self.x.offset, self.x.rf))

    def centres(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(height,) y and (width,) x pixel centres of the cells of an (height, width) map."""
        ys = torch.arange(height, dtype=torch.float64) * self.y.stride + self.y.offset
        xs = torch.arange(width, dtype=torch.float64) * self.x.stride + self.x.offset
        return ys, xs


def _pair(value: Any, n: int = 2) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * n if len(values) == 1 else values


def _spatial(t: Any) -> tuple[int, int] | None:
    return tuple(t.shape[-2:]) if isinstance(t, Tensor) and t.dim() >= 3 else None  # type: ignore[return-value]


class _CentreTracer(TorchDispatchMode):
    """Attaches a :class:`CellCentres` to every tensor derived spatially from the input."""

    def __init__(self, image: Tensor) -> None:
        super().__init__()
        self.maps: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.maps[image] = CellCentres(AxisMap(1.0, 0.0), AxisMap(1.0, 0.0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        result = self._propagate(func, args, kwargs, out)
        if result is not None:
            for t in tree_flatten(out)[0][:1]:  # pooling's indices output is not a feature map
                if isinstance(t, Tensor):
                    self.maps[t] = result
        return out

    def _get(self, t: Any) -> CellCentres | None:
        return self.maps.get(t) if isinstance(t, Tensor) else None

    def _propagate(self, func, args, kwargs, out) -> CellCentres | None:
        packet = func.overloadpacket
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(first, Tensor):
            return None
        src = self._get(args[0]) if args else None
        if packet is aten.convolution and src is not None:
            weight, stride, padding, dilation, transposed = args[1], args[3], args[4], args[5], args[6]
            if transposed:
                return None
            k = weight.shape[-2:]
            s, p, d = _pair(stride), _pair(padding), _pair(dilation)
            return CellCentres(src.y.window(k[0], s[0], p[0], d[0]), src.x.window(k[1], s[1], p[1], d[1]))
        if packet in (aten.max_pool2d_with_indices, aten.max_pool2d, aten.avg_pool2d) and src is not None:
            k = _pair(args[1])
            s = _pair(args[2]) if len(args) > 2 and args[2] else k
            p = _pair(args[3]) if len(args) > 3 else [0, 0]
            d = _pair(args[4]) if packet is not aten.avg_pool2d and len(args) > 4 else [1, 1]
            return CellCentres(src.y.window(k[0], s[0], p[0], d[0]), src.x.window(k[1], s[1], p[1], d[1]))
        if packet is aten.constant_pad_nd and src is not None:
            pad = list(args[1]) + [0, 0, 0, 0]  # (left, right, top, bottom, ...): last dim first
            return CellCentres(
                AxisMap(src.y.stride, src.y.offset - src.y.stride * pad[2], src.y.rf),
                AxisMap(src.x.stride, src.x.offset - src.x.stride * pad[0], src.x.rf),
            )
        if packet is aten.slice and src is not None:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            dim = dim % args[0].dim()
            start = (args[2] if len(args) > 2 else kwargs.get("start")) or 0
            step = (args[4] if len(args) > 4 else kwargs.get("step")) or 1
            if dim not in (args[0].dim() - 2, args[0].dim() - 1):
                return src if _spatial(first) == _spatial(args[0]) else None
            start = start % args[0].shape[dim] if start < 0 else start
            axis = src.y if dim == args[0].dim() - 2 else src.x
            moved = AxisMap(axis.stride * step, axis.offset + axis.stride * start, axis.rf)
            return CellCentres(moved, src.x) if dim == args[0].dim() - 2 else CellCentres(src.y, moved)
        return self._pass_through(args, kwargs, first)

    def _pass_through(self, args, kwargs, out: Tensor) -> CellCentres | None:
        size = _spatial(out)
        if size is None:
            return None
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        found = [m for t in inputs if (m := self._get(t)) is not None and _spatial(t) == size]
        if not found:
            return None
        if len(found) == 1 or all(m == found[0] for m in found):
            return found[0]
        if len({(m.y.stride, m.x.stride) for m in found}) != 1:
            return found[0]
        mean = lambda axis: AxisMap(  # noqa: E731 - average the branches' centres
            getattr(found[0], axis).stride,
            sum(getattr(m, axis).offset for m in found) / len(found),
            max(getattr(m, axis).rf for m in found),
        )
        return CellCentres(mean("y"), mean("x"))


def trace_centres(
    features_at: Callable[[Tensor], Mapping[str, Tensor]], image: Tensor, stages: tuple[str, ...]
) -> tuple[dict[str, Tensor], dict[str, CellCentres]]:
    """Run ``features_at(image)`` once, returning its maps and the cell-centre mapping of ``stages``.

    Traced outside inference mode (``Trainer.test`` runs under it): there, composite ops such as
    ``aten.conv2d`` reach the tracer undecomposed instead of as the ``aten.convolution`` it models.
    """
    with torch.inference_mode(False), torch.no_grad():
        image = image.clone()  # a normal tensor (an inference tensor cannot enter a non-inference graph)
        with _CentreTracer(image) as tracer:
            maps = features_at(image)
    found = {}
    for stage in stages:
        mapping = tracer.maps.get(maps[stage])
        if mapping is None:
            raise RuntimeError(
                f"could not trace the receptive-field centres of stage {stage!r}: an op between the "
                "input and this map changes the spatial size in a way the tracer does not model"
            )
        found[stage] = mapping
    return dict(maps), found


class CentreCache:
    """Cell-centre mappings per feature function and input size, traced on the first forward.

    Keyed weakly by the object behind ``features_at`` (the module of a bound method such as
    ``RetrievalModule.features_at``, which is a new object at every attribute access; else the
    callable itself), then by the function, input size (TF-"same" padding makes the offset depend
    on it) and stage. A cache miss costs no extra forward: the traced forward's maps are returned.
    """

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(
        self, features_at: Callable[[Tensor], Mapping[str, Tensor]], image: Tensor, stage: str
    ) -> tuple[Tensor, CellCentres]:
        """``features_at(image)[stage]`` and its mapping (image: (1, 3, H, W))."""
        owner = getattr(features_at, "__self__", features_at)
        key = (getattr(features_at, "__func__", None), int(image.shape[-2]), int(image.shape[-1]), stage)
        try:
            per_owner = self._cache.setdefault(owner, {})
        except TypeError:  # not weak-referenceable: trace every time (correct, just slower)
            per_owner = {}
        if key in per_owner:
            return features_at(image)[stage], per_owner[key]
        maps, found = trace_centres(features_at, image, (stage,))
        per_owner[key] = found[stage]
        return maps[stage], found[stage]
