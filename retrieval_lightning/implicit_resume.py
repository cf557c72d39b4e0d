"""``fit`` without ``--ckpt_path`` in a directory that holds a run: resume it only if it is the same run.

Why: with an on-exception checkpoint configured, Lightning's ``fit(ckpt_path=None)`` resumes the
newest of ``last.ckpt`` and ``on_exception.ckpt`` by itself. That is what a requeued job wants (it
re-runs its command), but a user who changed a setting and re-ran the same config would silently
get the old run back: a finished one trains nothing, and the "new" results are the old model's.
So the implicit resume goes ahead only when the checkpoint's architecture record (backbone, heads,
module settings such as the optimiser) equals the model's; otherwise ``fit`` stops with one line
naming the settings that differ. An explicit ``--ckpt_path`` is never second-guessed: its differences are
listed, not refused.
"""

from __future__ import annotations

from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from retrieval_lightning.checkpoints import ARCHITECTURE_KEY, open_checkpoint
from retrieval_lightning.errors import UsageError
from retrieval_lightning.model_record import architecture_of


class ResumeMismatchError(UsageError):
    """The run ``fit`` would resume by itself was made with other settings (names them)."""


def resumes_implicitly(trainer: pl.Trainer) -> bool:
    """Whether Lightning's ``fit(ckpt_path=None)`` resumes ``"last"`` (an on-exception checkpoint is configured)."""
    return any(isinstance(cb, OnExceptionCheckpoint) for cb in trainer.callbacks)


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


#: an architecture record's sections -> the command-line options that set them
_OPTION_OF_SECTION = {"module": "model", "heads": "model.heads", "backbone": "model.backbone"}


def _option(key: str) -> str:
    """A record leaf's name as the option that sets it (``module.optim.lr`` -> ``model.optim.lr``)."""
    section, _, rest = key.partition(".")
    return f"{_OPTION_OF_SECTION[section]}.{rest}" if section in _OPTION_OF_SECTION and rest else key


def settings_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"option: stored -> current"`` for every leaf of two architecture records that differs, named by the
    option that sets it, as ``--ckpt_path <file>``'s listing names it."""
    a, b = dict(_leaves(stored)), dict(_leaves(current))
    return [f"{_option(k)}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def resume_differences(model: pl.LightningModule, path: str) -> list[str]:
    """The settings of the run that wrote ``path`` that differ from ``model``'s (none without a record)."""
    stored = open_checkpoint(path).get(ARCHITECTURE_KEY)
    if stored is None:
        return []  # not this framework's record: Lightning's own loading decides
    return settings_differences(stored, architecture_of(model))


def _shown(differences: list[str]) -> str:
    return "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")


def note_explicit_resume(model: pl.LightningModule, path: str) -> None:
    """``--ckpt_path last`` is asked for, so it resumes whatever differs; but say what does, as ``--ckpt_path
    <file>`` does (the CLI lists a named file's differences while parsing; ``last`` is known only now)."""
    differences = resume_differences(model, path)
    if differences:
        rank_zero_info(f"--ckpt_path last resumes {path}, whose run had other settings; the config and command "
                       "line apply, except to what resuming restores (the optimiser's and scheduler's state, "
                       f"learning rates included, and the tensors): {_shown(differences)}")


def check_implicit_resume(model: pl.LightningModule, path: str) -> None:
    """Refuse to resume ``path`` implicitly when its run was made with settings other than ``model``'s."""
    differences = resume_differences(model, path)
    if differences:
        shown = _shown(differences)
        raise ResumeMismatchError(
            f"fit would resume {path} (Lightning resumes the last checkpoint of this directory when no --ckpt_path "
            f"is given), but that run had other settings: {shown}. Start the new run in another directory "
            f"(--trainer.default_root_dir), pass --ckpt_path {path} to resume it anyway (same optimiser and "
            f"trained parts), or --model.init_from {path} to start a new run from its weights"
        )
