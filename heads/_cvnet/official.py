"""Import an official CVNet checkpoint (sungonce/CVNet ``CVPR2022_CVNet_R{50,101}.pyth``).

The official model is a pycls ResNet (``encoder_q.*``, stride on the 3x3 conv like timm), a GeM
(learnable p) + FC global head (``encoder_q.head.*``), the pyramid projections (``conv2ds.*``) and
the 4D network (``cv_learner.*``). Every tensor is renamed onto this framework's model:
timm ``resnet50``/``resnet101`` :class:`Backbone` (BGR input, ImageNet statistics in BGR order,
conv4 before the last ReLU), the ``gem_arcface`` global head (learnable p, FC whitening,
no classifier) and the ``cvnet_verifier`` head. Anything missing, left over or mis-shaped is an
error naming it. ``num_batches_tracked`` counters are not weights: taken from the file when
present, else left at the model's value; so is the CurricularFace running ``t`` (a training
buffer the official inference checkpoint does not have).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from heads.cvnet_verifier import CVNetVerifierHead
from heads.gem_arcface import GemArcFaceHead
from retrieval_lightning.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from retrieval_lightning.checkpoints import IncompatibleWeightsError, load_tensor_file, state_dict_of
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.retrieval.rerank import RerankConfig

DEPTH_BY_S3_BLOCKS = {6: 50, 23: 101}
_BLOCK = re.compile(r"^encoder_q\.s(\d)\.b(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2", "f.c": "conv3", "f.c_bn": "bn3",
    "proj": "downsample.0", "bn": "downsample.1",
}


class CheckpointImportError(IncompatibleWeightsError):
    """An official checkpoint that does not fit the model (lists the keys that differ); the CLI's one-line error."""


def official_to_framework_key(key: str) -> str | None:
    """Official key -> ``backbone.model.*`` / ``heads.global.*`` / ``heads.verifier.*`` (None: unknown)."""
    if key.startswith("encoder_q.stem."):
        rest = key[len("encoder_q.stem."):]
        module, _, leaf = rest.partition(".")
        return {"conv": f"backbone.model.conv1.{leaf}", "bn": f"backbone.model.bn1.{leaf}"}.get(module)
    match = _BLOCK.match(key)
    if match:
        stage, block, rest = int(match[1]), int(match[2]), match[3]
        module, _, leaf = rest.rpartition(".")
        part = _BLOCK_PARTS.get(module)
        return f"backbone.model.layer{stage}.{block - 1}.{part}.{leaf}" if part else None
    if key == "encoder_q.head.pool.p":
        return "heads.global.gem.p"
    if key.startswith("encoder_q.head.fc."):
        return "heads.global.whiten." + key[len("encoder_q.head.fc."):]
    if key.startswith("conv2ds."):
        return "heads.verifier.projections." + key[len("conv2ds."):]
    if key.startswith("cv_learner."):
        return "heads.verifier.learner." + key[len("cv_learner."):]
    return None


def build_cvnet_model(depth: int, width: int = 256) -> tuple[Backbone, dict[str, Any]]:
    """The framework's CVNet: backbone + ``{"global": gem_arcface, "verifier": cvnet_verifier}``."""
    backbone = Backbone(
        name=f"resnet{depth}", weights=None, stages=("conv4", "conv5"), input_order="bgr",
        mean=tuple(reversed(IMAGENET_MEAN)), std=tuple(reversed(IMAGENET_STD)), pre_activation=("conv4",),
    )
    heads = {
        "global": GemArcFaceHead(stage="conv5", dim=2048, p=3.0, learn_p=True, margin="curricularface",
                                 margin_m=0.15, whiten_init="random"),
        # fp32 as the official tester (the head's default, auto, scores in bf16 on a GPU)
        "verifier": CVNetVerifierHead(stage="conv4", width=width, score_dtype="float32"),
    }
    for head in heads.values():
        head.build(backbone.stage_channels, 0)
    return backbone, heads


def _target_state(backbone: Backbone, heads: dict[str, Any]) -> dict[str, Tensor]:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for role, head in heads.items():
        state.update({f"heads.{role}.{k}": v for k, v in head.state_dict().items()})
    return state


def convert_official_state(source: dict[str, Tensor]) -> tuple[Backbone, dict[str, Any]]:
    """Official state dict -> a loaded (backbone, heads) pair; every tensor must be accounted for.

    A ``module.`` prefix on every key (a state dict saved from a DataParallel/DDP wrapper) is dropped."""
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in source.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointImportError(f"not a state dict of tensors: {len(not_tensors)} entries are not tensors "
                                    f"(first: {', '.join(not_tensors[:3])})")
    if source and all(k.startswith("module.") for k in source):
        source = {k[len("module."):]: v for k, v in source.items()}
    if not any(k.startswith("encoder_q.") for k in source):
        shown = ", ".join(sorted(source)[:4])
        hint = (" (this looks like a retrieval-lightning checkpoint already: pass it to --ckpt_path)"
                if any(k.startswith("backbone.") for k in source) else "")
        raise CheckpointImportError(
            f"not an official CVNet checkpoint: no encoder_q.* keys among its {len(source)} tensors "
            f"(first: {shown}){hint}"
        )
    s3_blocks = {int(m[1]) for k in source if (m := re.match(r"^encoder_q\.s3\.b(\d+)\.", k))}
    depth = DEPTH_BY_S3_BLOCKS.get(len(s3_blocks))
    if depth is None:
        raise CheckpointImportError(
            f"cannot tell the ResNet depth: {len(s3_blocks)} blocks in encoder_q.s3 (R50 has 6, R101 has 23)"
        )
    projection = source.get("conv2ds.0.weight")
    width = projection.shape[0] if projection is not None and projection.ndim else 256  # else: named mis-shaped
    backbone, heads = build_cvnet_model(depth, width)
    target = _target_state(backbone, heads)
    mapped: dict[str, Tensor] = {}
    left_over, bad_shape = [], []
    for key, value in source.items():
        new = official_to_framework_key(key)
        if new is None or new not in target:
            left_over.append(key)
        elif tuple(value.shape) != tuple(target[new].shape):
            bad_shape.append(f"{key} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}")
        else:
            mapped[new] = value
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")
               and not k.startswith("heads.global.margin.")]
    if missing or left_over or bad_shape:
        raise CheckpointImportError(
            f"official CVNet R{depth} checkpoint does not fit: missing {missing}; left over {left_over}; "
            f"mis-shaped {bad_shape}"
        )
    full = {k: mapped.get(k, v) for k, v in target.items()}
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")})
    for role, head in heads.items():
        prefix = f"heads.{role}."
        head.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    return backbone.eval(), {role: head.eval() for role, head in heads.items()}


def import_cvnet_checkpoint(source: str, output: str) -> str:
    """``retrieval-lightning import-checkpoint cvnet <official .pyth> <out>``: convert and save."""
    state = state_dict_of(load_tensor_file(source))
    backbone, heads = convert_official_state(state)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    official_test = RerankConfig(k=100, shortlist="protocol", fusion="weighted", weight=0.5)
    module = RetrievalModule(backbone=backbone, heads=heads, num_classes=0, rerank=official_test,
                             eval_resize="opencv")
    module.save_checkpoint(output)
    n = sum(t.numel() for t in module.state_dict().values())
    return f"{source}: {len(state)} tensors -> {output} ({n / 1e6:.1f}M values; CVNet test settings: " \
           "BGR input, scales 0.7071/1/1.4142 resized as OpenCV, K=100 per protocol, global + 0.5 x verifier)"
