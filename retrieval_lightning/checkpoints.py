"""Loading tensors from files without executing pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor


class CheckpointLoadError(RuntimeError):
    """A checkpoint that is missing, unreadable, or would need unsafe unpickling."""


def load_tensor_file(path: str | Path) -> dict:
    """Load a ``.safetensors`` file or a torch checkpoint with ``weights_only=True``.

    Lightning checkpoints (``{"state_dict": ...}``) are returned whole; callers pick what they need.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointLoadError(
            f"{path}: refused to unpickle arbitrary objects (weights_only=True). Re-save it as a plain "
            f"state dict or .safetensors. Cause: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointLoadError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointLoadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def state_dict_of(checkpoint: dict) -> dict[str, Tensor]:
    """The model state dict inside a Lightning checkpoint, an official ``model_state`` file or a bare dict."""
    for key in ("state_dict", "model_state"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint
