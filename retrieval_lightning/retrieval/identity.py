"""What a feature store's identity is made of: a model's weights and settings, the datamodule's preprocessing, the
eval set's items, the trainer's precision. A store is reused, resumed or merged only under the same identity
(:func:`~.store.identity_differences` names what differs).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .store import UNCOUNTED_KEY, normalize_identity


def module_identity(
    module: torch.nn.Module, exclude: Callable[[str], bool] | None = None, **extra: Any
) -> dict[str, Any]:
    """A store identity: sha256 of the module's state dict plus caller-given config entries.

    ``exclude(name)`` leaves tensors out (training-only ones such as a classifier do not shape
    the features, so a model with or without them extracts the same store).
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if exclude is not None and exclude(name):
            continue
        digest.update(name.encode())
        if isinstance(value, Tensor):
            digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return normalize_identity({"weights_sha256": digest.hexdigest(), **extra})


#: the usual loader arguments, which do not change what is extracted (``on_error``: a readable image's features
#: are the same either way, and an unreadable one's placeholder is marked, so a run after the first one's error
#: resumes); a datamodule names its own others in ``loader_only_arguments``
NOT_PREPROCESSING = {"num_workers", "batch_size", "eval_batch_size", "root", "pin_memory", "persistent_workers",
                     "download", "on_error"}


def datamodule_identity(datamodule: Any) -> dict[str, Any]:
    """What a datamodule contributes to a store identity: its class and every argument that changes the
    images a model sees (a ``max_side``, a query-box rounding), so features of other images are not reused.
    A datamodule names its arguments that only shape training (crops, sampling) in ``training_only_arguments``,
    so a store extracted under one training recipe is evaluated under another, and any loader argument of
    its own beyond :data:`NOT_PREPROCESSING` (a ``workers``, a ``cache_dir``) in ``loader_only_arguments``."""
    skip = (NOT_PREPROCESSING | set(getattr(datamodule, "training_only_arguments", ()))
            | set(getattr(datamodule, "loader_only_arguments", ())))
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    args = {k: v for k, v in hparams.items() if k not in skip}
    return {
        "datamodule": type(datamodule).__name__ if datamodule is not None else None,
        "preprocessing": json.loads(json.dumps(args, sort_keys=True, default=str)),
        # never compared: which of a store's stored arguments may be absent here (they count no longer)
        UNCOUNTED_KEY: sorted(k for k in hparams if k in skip),
    }


def items_identity(eval_set: Any) -> dict[str, Any]:
    """What an eval set contributes to a store identity: its items, in order. Shards are resumed and merged by
    dataset position, so a store must not be continued over another image list (an updated list, a larger
    partial download): each position would keep the features of the image that was there before."""
    digest = hashlib.sha256(f"{len(eval_set.dataset)} {eval_set.n_queries}\n".encode())
    for name in eval_set.image_ids:
        digest.update(f"{name}\n".encode())
    return {"items": f"{len(eval_set.dataset)} items ({eval_set.n_queries} queries), ids sha256 "
                     f"{digest.hexdigest()[:16]}"}


def model_identity(model: Any) -> dict[str, Any]:
    """Identity of what a model extracts from an image: its weights (training-only tensors excluded), its
    evaluation options, the backbone's arguments and normalisation, every head's class and arguments (a
    keep ratio or a keypoint budget lives there, not in the weights) and the stored kinds."""
    extra: dict[str, Any] = {
        "model_class": type(model).__name__,
        "eval_scales": list(getattr(model, "eval_scales", [])),
        "eval_resize": getattr(model, "eval_resize", "antialias"),
    }
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "feature_arguments"):
        extra["backbone"] = backbone.feature_arguments()
    if hasattr(model, "head_arguments"):
        extra["heads"] = model.head_arguments()
    if getattr(model, "rerank_head", None) is not None:
        extra["kinds"] = {k: [v.dtype, list(v.shape), v.ragged] for k, v in model.rerank_entry_kinds(True).items()}
    return module_identity(model, exclude=getattr(model, "is_training_only", None), **extra)


def precision_identity(precision: Any) -> dict[str, Any]:
    """The trainer's precision as part of a store's identity: features computed under autocast (``bf16-mixed``)
    differ from fp32 ones, so neither resumes nor reuses the other's. Absent for ``32-true``, so the identities of
    stores written before it was recorded are unchanged."""
    precision = str(precision)
    return {} if precision in ("32-true", "32") else {"precision": precision}


def identity_tag(identity: Mapping[str, Any]) -> str:
    """16 hex digits naming a store folder after its whole identity."""
    return hashlib.sha256(json.dumps(normalize_identity(identity), sort_keys=True).encode()).hexdigest()[:16]
