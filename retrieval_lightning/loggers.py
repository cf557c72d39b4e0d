"""W&B logging that works offline without an API key and continues its run when a checkpoint is resumed."""

from __future__ import annotations

import netrc
import os
import subprocess
from argparse import Namespace
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
from lightning.fabric.utilities.logger import _convert_params
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import WandbLogger

from retrieval_lightning.checkpoints import open_checkpoint


def wandb_credentials_available() -> bool:
    """True when a W&B API key is set in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class RetrievalWandbLogger(WandbLogger):
    """``WandbLogger`` that goes offline by itself when there are no credentials.

    ``offline=None`` (default) means: online if ``WANDB_MODE`` says so or a key is available,
    offline otherwise, so experiment configs run anywhere and sync later with ``wandb sync``.
    ``WANDB_MODE=disabled`` is left to W&B, which then logs nothing and writes no files (forcing
    offline would write a run anyway and set ``WANDB_MODE=dryrun`` for the rest of the process).
    """

    def __init__(self, offline: bool | None = None, save_dir: str = "outputs", **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            offline = mode in ("offline", "dryrun") or (
                mode not in ("online", "disabled") and not wandb_credentials_available())
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(offline=offline, save_dir=save_dir, **kwargs)
        if not self._wandb_init.get("anonymous"):  # W&B warns that the setting has no effect whenever it is passed
            self._wandb_init.pop("anonymous", None)

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Lightning's flat copy of the module's and datamodule's arguments, under ``hparams``: the run's config
        already holds the whole resolved config, nested (``model.optim.lr``, ``data.init_args.seed``); at the top
        level, a datamodule's ``seed`` would read as the run's ``seed_everything``."""
        flat = {k: v for k, v in _convert_params(params).items() if not str(k).startswith("_")}
        super().log_hyperparams({"hparams": flat})


def code_version(package: Path | None = None) -> dict[str, Any]:
    """The version of the code that runs, for a run's config: the package's version and, when the package is
    a tracked file of a git checkout (an editable install), its commit and whether the tree has changes.

    W&B records the git state of its own directory, the run's ``save_dir``, which is scratch space on a
    cluster and another checkout's at best; this is the commit of the code itself."""
    try:
        version = metadata.version("retrieval-lightning")
    except metadata.PackageNotFoundError:
        version = None
    package = package or Path(__file__).resolve().parent
    out: dict[str, Any] = {"package_version": version, "git_commit": None, "git_dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is not None:  # a copy in site-packages is not tracked
        out["git_commit"] = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
        out["git_dirty"] = None if status is None else bool(status)
    return out


def checkpoint_to_resume(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """The file ``fit(ckpt_path=...)`` will restore: a path, or the newest of ``"last"``'s candidates."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        return str(ckpt_path) if os.path.isfile(ckpt_path) else None
    candidates = {cb.ckpt_path for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:  # a logger-derived dir is unknown yet
            candidates |= cb._find_last_checkpoints(trainer)
    existing = [p for p in candidates if p and os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def continue_wandb_run(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """Make the W&B logger continue the run that wrote the checkpoint (same run id, ``resume="allow"``).

    Must run before the logger creates its run (Lightning does that in ``setup``); the id comes
    from :class:`~retrieval_lightning.callbacks.ResumeState`'s part of the checkpoint. A logger
    given an explicit ``id`` is left alone. Returns the id continued, if any.
    """
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    path = checkpoint_to_resume(trainer, ckpt_path) if loggers else None
    if path is None:
        return None
    run_id = checkpoint_wandb_run(open_checkpoint(path))
    if run_id is None:
        return None
    for logger in loggers:
        if logger._experiment is None and not logger._wandb_init.get("id"):
            logger._id = run_id
            logger._wandb_init.update(id=run_id, resume="allow")
    return run_id


def checkpoint_wandb_run(checkpoint: Mapping[str, Any]) -> str | None:
    """The id of the W&B run that wrote ``checkpoint`` (recorded by
    :class:`~retrieval_lightning.callbacks.ResumeState`), if any."""
    callbacks = checkpoint.get("callbacks")
    states = callbacks.values() if isinstance(callbacks, Mapping) else ()
    return next((state["wandb"].get("run_id") for state in states
                 if isinstance(state, Mapping) and isinstance(state.get("wandb"), Mapping)), None)


def weights_source(subcommand: str, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where a run's weights come from, for its W&B config: the checkpoint (``--ckpt_path``, or
    ``--model.init_from`` for an earlier stage of a recipe) and the id of the W&B run that trained it,
    so a test run or a verifier stage links to the run it evaluates or continues from. A resumed
    ``fit`` continues that very run, so its own ``--ckpt_path`` is not a source."""
    model = config.get("model")  # the module's own arguments (the CLI's model class is fixed)
    candidates = [] if subcommand in ("fit", "finetune") else [config.get("ckpt_path")]
    candidates.append(model.get("init_from") if isinstance(model, Mapping) else None)
    for path in candidates:
        path = os.path.expanduser(str(path)) if path else path  # a config's ~/ckpts/x.ckpt, as the readers take it
        if not path or not os.path.isfile(path):
            continue
        try:
            run_id = checkpoint_wandb_run(open_checkpoint(path))
        except Exception:  # noqa: BLE001 - a plain weights file or a foreign pickle: no run to link
            run_id = None
        return {"checkpoint": str(Path(path).resolve()), "wandb_run_id": run_id}
    return None


def label_wandb_runs(trainer: pl.Trainer, subcommand: str, config: Mapping[str, Any]) -> None:
    """Before the W&B runs of a subcommand are created: their ``job_type`` is the subcommand (fit, test,
    extract, ...; one set in the config is kept), so a project's runs group by what they did, and their
    config names the checkpoint the weights come from and its run (:func:`weights_source`)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg._experiment is None]
    source = weights_source(subcommand, config) if loggers and trainer.is_global_zero else None
    for logger in loggers:
        if not logger._wandb_init.get("job_type"):  # the CLI passes every argument: an unset one is None
            logger._wandb_init["job_type"] = subcommand
        if source is not None:
            logger._wandb_init["config"] = {**(logger._wandb_init.get("config") or {}), "weights_source": source}
