"""Loading tensors from files without executing pickled code."""

from __future__ import annotations

import contextlib
import pickle
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor


class CheckpointLoadError(RuntimeError):
    """A checkpoint that is missing, unreadable, or would need unsafe unpickling."""


class UnsafePickleError(CheckpointLoadError):
    """A file that weights-only loading refuses: it pickles objects other than tensors and plain values."""


_TRUSTED_FILES: ContextVar[frozenset[Path]] = ContextVar("trusted_pickle_files", default=frozenset())


@contextlib.contextmanager
def trusting_pickles(*paths: str | Path) -> Iterator[None]:
    """Within the block, :func:`load_tensor_file` unpickles these files whole, running whatever code they
    name: only for files from a source the user trusts, at their explicit request (``--trust-pickle``)."""
    token = _TRUSTED_FILES.set(_TRUSTED_FILES.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _TRUSTED_FILES.reset(token)


def _checkpoint_globals() -> list:
    """Plain config types Lightning checkpoints of this project hold in ``hyper_parameters``.

    Allow-listed for ``weights_only=True`` loading: data classes of plain values, nothing callable.
    """
    from lightning.fabric.utilities.data import AttributeDict

    from retrieval_lightning.optim import OptimConfig
    from retrieval_lightning.retrieval.postprocess import PostProcessConfig
    from retrieval_lightning.retrieval.rerank import RerankConfig

    return [AttributeDict, OptimConfig, RerankConfig, PostProcessConfig]


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch's legacy format, or a plain pickle


#: how torch's weights-only refusal names what it refused (an unknown class; a blocked module's function)
_REFUSED = ("Unsupported", "WeightsUnpickler error: Unsupported", "Trying to load unsupported")


def _unpickler_cause(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused (not its advice paragraphs,
    which suggest ``weights_only=False``: arbitrary code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(_REFUSED)]
    # torch's zip reader appends a paragraph of advice; so does its allow-listing
    return (named or lines or [type(exc).__name__])[0].split(" Please use")[0].split(". This is an internal")[0]


def _unreadable(path: Path, exc: BaseException) -> CheckpointLoadError:
    return CheckpointLoadError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_unpickler_cause(exc)})")


def open_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict to read its records (architecture, hyper-parameters, callback states):
    memory-mapped when its format allows (torch's zip archive; its legacy format is read whole), so tensors
    are only read when touched, and weights-only like every load here. :class:`CheckpointLoadError` names a
    file that is missing, a directory, no checkpoint, corrupt or refused."""
    path = Path(path).expanduser()  # a config's ~/ckpts/x.ckpt: no shell expands it there
    archive = _check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", mmap=archive, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or refused
        raise _unreadable(path, exc) from exc


def _check_torch_file(path: Path) -> bool:
    """Refuse, naming ``path``, what cannot be a torch checkpoint: nothing there, a directory, other bytes.
    Returns whether it is torch's zip archive (a pickle otherwise: torch's legacy format)."""
    if path.is_dir():
        raise CheckpointLoadError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if not (magic.startswith(_ZIP_MAGIC) or magic.startswith(_PICKLE_MAGIC)):
        raise CheckpointLoadError(f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    return magic.startswith(_ZIP_MAGIC)


def open_lightning_checkpoint(path: str | Path) -> dict:
    """:func:`open_checkpoint` of a file that must be a Lightning checkpoint (``--ckpt_path`` of
    ``fit``/``test``/...), or :class:`CheckpointLoadError` naming it: Lightning itself would fail on a
    directory or a bare state dict with a bare ``KeyError``."""
    path = Path(path).expanduser()  # a config's ~/ckpts/x.ckpt: no shell expands it there
    checkpoint = open_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointLoadError(f"{path}: holds weights only, not a Lightning checkpoint (no 'state_dict' with "
                                  f"a training state): start from them with --model.init_from {path}")
    return checkpoint


def load_tensor_file(path: str | Path) -> dict:
    """Load a ``.safetensors`` file or a torch checkpoint with ``weights_only=True``.

    Lightning checkpoints (``{"state_dict": ...}``) are returned whole; callers pick what they need.
    """
    path = Path(path).expanduser()  # a config's ~/ckpts/x.ckpt: no shell expands it there
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - SafetensorError: truncated or corrupt header or data
            raise CheckpointLoadError(f"{path}: not a readable .safetensors file ({exc})") from exc
    _check_torch_file(path)
    trusted = path.resolve() in _TRUSTED_FILES.get()
    try:
        if trusted:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_checkpoint_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trusted:
            raise CheckpointLoadError(f"{path}: not a readable checkpoint (UnpicklingError: {exc})") from exc
        raise UnsafePickleError(
            f"{path}: refused to unpickle arbitrary objects (weights_only=True). Re-save it as a plain "
            f"state dict or .safetensors. Cause: {_unpickler_cause(exc)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise _unreadable(path, exc) from exc
    if not isinstance(obj, dict):
        raise CheckpointLoadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def state_dict_of(checkpoint: dict) -> dict[str, Tensor]:
    """The model state dict inside a Lightning checkpoint, an official ``model_state`` file or a bare dict.

    Every way this project loads weights (backbone weights, ``init_from``, ``extract``/``test``
    checkpoints, ``load_from_checkpoint``) unwraps files through this function.
    """
    for key in ("state_dict", "model_state"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


#: key of the architecture record in a self-contained checkpoint
ARCHITECTURE_KEY = "retrieval_lightning"
ARCHITECTURE_FORMAT = 1
#: key of the distributions that provided the checkpoint's heads (``{name: "dist version"}``), beside the record
#: (not in it: a plugin's upgrade is not another architecture), so a load without the plugin says what to install
PLUGINS_KEY = "retrieval_lightning_plugins"


class IncompatibleWeightsError(ValueError):
    """A state dict that does not fit the model it is loaded into (names what is missing, extra, mis-shaped)."""


def check_state_fits(
    own: dict[str, Tensor],
    state: dict[str, Tensor],
    optional: Callable[[str], bool],
    source: str,
    evaluating: bool = False,
) -> dict[str, Tensor]:
    """The one strictness policy of full-model loads (``test --ckpt_path``, ``extract``, ``load_from_checkpoint``).

    Every tensor of the model must be in ``state`` with the same shape, and every tensor of ``state``
    must be in the model, except tensors ``optional(name)`` declares training-only (a classifier
    over the training classes, absent from an evaluation-only model built with ``num_classes=0``):
    those are dropped when the model lacks them and keep their initialisation when the file lacks
    them. ``evaluating`` (no training follows the load): an optional tensor of another shape (a classifier
    over another data set's class count) is dropped too, as nothing evaluated reads it; a resumed fit
    still needs it to fit. Returns the filtered state dict; raises :class:`IncompatibleWeightsError` otherwise.
    ``init_from`` is the partial load of a recipe's earlier stage and has its own rule (see
    :meth:`RetrievalModule.initialise_from`).
    """
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own and not optional(k)]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape) and not (evaluating and optional(k))
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors missing from the file (first {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors in the file the model does not have (first {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:5])})")
        raise IncompatibleWeightsError(f"{source} does not fit this model: " + "; ".join(parts))
    return {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
