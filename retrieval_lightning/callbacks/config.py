"""Save the resolved LightningCLI config without the ``config.yaml`` clash with W&B.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` into ``trainer.log_dir`` (here a training run's; an
evaluation writes ``config_<subcommand>.yaml``, e.g. ``config_test.yaml``, beside it: see
:func:`config_file_name`); with a
``WandbLogger`` that directory is shared by every run and W&B writes its own ``config.yaml``,
so a second run fails. Here, when a W&B logger is attached, the config goes into the run's own
directory and into ``run.config`` (so it is searchable in the W&B UI), with the version of the code
(``code``: the package's version, git commit and whether its tree has changes); otherwise Lightning's
behaviour is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from retrieval_lightning.cli_args import command_sources
from retrieval_lightning.loggers import code_version
from retrieval_lightning.retrieval.workdirs import atomic_write_text


#: subcommands that train: theirs is the log directory's ``config.yaml``
TRAINING_SUBCOMMANDS = ("fit", "finetune")


def config_file_name(subcommand: str) -> str:
    """Where a subcommand saves its config without W&B: an evaluation in a training run's directory
    (``test --ckpt_path <run>/checkpoints/last.ckpt``, even one that fails loading) keeps that run's."""
    return "config.yaml" if subcommand in TRAINING_SUBCOMMANDS else f"config_{subcommand}.yaml"


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _disabled(logger: WandbLogger) -> bool:
    """Whether W&B is disabled for this logger (``WANDB_MODE=disabled`` or ``mode: disabled``): read from
    the settings, the same on every rank, so all ranks take the same branch (and collectives) below."""
    return "disabled" in (os.environ.get("WANDB_MODE"), logger._wandb_init.get("mode"))


KeyPath = tuple  # of str (a mapping's key) and int (a list's index)


def _without_init_args(path: KeyPath) -> KeyPath:
    """A key path as jsonargparse also accepts it, without ``init_args`` (``--trainer.logger.save_dir``)."""
    return tuple(key for key in path if key != "init_args")


def interpolation_templates(args: Sequence[str]) -> dict[KeyPath, tuple[str, dict]]:
    """The ``${...}`` values this command line set (its config files and overrides, in their order, the last one
    winning), by key path: ``(template, {list position: class_path})``. The parser resolves them, so a saved
    config would hold ``/runs/a/checkpoints`` where the recipe said ``${....default_root_dir}/checkpoints``, and a
    run of the saved config with another ``--trainer.default_root_dir`` wrote into (and resumed) the first run's
    directory."""
    found: dict[KeyPath, tuple[str, dict]] = {}

    def forget(prefix: KeyPath) -> None:  # a value set at ``prefix`` replaces whatever was under it
        short = _without_init_args(prefix)
        for key in [k for k in found if _without_init_args(k)[: len(short)] == short]:
            del found[key]

    def walk(node: Any, path: KeyPath, classes: dict) -> None:
        """A config file's values: mappings merge into what came before; a list or a value replaces it."""
        if isinstance(node, dict):
            if "class_path" in node:
                forget(path)  # a class given anew: its init_args are not the earlier ones
            for key, value in node.items():
                walk(value, (*path, str(key)), classes)
            return
        forget(path)
        if isinstance(node, str) and "${" in node:
            found[path] = (node, dict(classes))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                named = value.get("class_path") if isinstance(value, dict) else None
                walk(value, (*path, i), {**classes, len(path): named} if isinstance(named, str) else classes)

    for source, value in command_sources(args):
        if source != "file":
            path = tuple(source.split("."))
            forget(path)
            if value.lstrip().startswith(("{", "[")):  # an inline mapping or list: its values at their own keys
                try:
                    walk(yaml.safe_load(value), path, {})
                except yaml.YAMLError:
                    pass  # the parser says what is wrong with it
            elif "${" in value:
                found[path] = (value, {})
            continue
        try:
            with open(os.path.expanduser(value), encoding="utf-8") as stream:
                raw = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(raw, dict):
            walk(raw, (), {})
    return found


def _class_name(class_path: Any) -> str | None:
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None


def restore_interpolations(config_path: str, templates: Mapping[KeyPath, tuple[str, dict]]) -> None:
    """Put the command's ``${...}`` templates back into the saved config where its structure still holds them (a
    list entry only if it is of the same class), so a run of the saved config re-derives them."""
    if not templates:
        return
    with open(config_path, encoding="utf-8") as stream:
        saved = yaml.safe_load(stream)
    changed = False
    for path, (template, classes) in templates.items():
        node = saved
        for depth, key in enumerate(path[:-1]):
            if isinstance(key, int):
                if not isinstance(node, list) or key >= len(node):
                    break
                node = node[key]
                expected = classes.get(depth)
                actual = node.get("class_path") if isinstance(node, dict) else None
                if expected and _class_name(actual) != _class_name(expected):
                    break  # another list than the recipe's: its entries are not the templated ones
            elif isinstance(node, dict) and key in node:
                node = node[key]
            else:
                break
        else:
            last = path[-1]
            if isinstance(node, dict) and isinstance(last, str) and last in node:
                node[last], changed = template, True
            elif isinstance(node, list) and isinstance(last, int) and last < len(node):
                node[last], changed = template, True
    if changed:
        atomic_write_text(Path(config_path), yaml.safe_dump(saved, sort_keys=False))


class SaveConfigToLoggers(SaveConfigCallback):
    """Resolved config → W&B ``run.config`` and ``<run dir>/lightning_config.yaml``."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # a disabled W&B run (WANDB_MODE=disabled) has a run directory that is never created: log_dir as without W&B
        loggers = [lg for lg in _wandb_loggers(trainer) if not _disabled(lg)]
        templates = interpolation_templates(sys.argv[1:])  # the command line as run
        if not loggers:
            self.overwrite = True  # successive subcommands (finetune: test, fit, test) share a log_dir
            super().setup(trainer, pl_module, stage)
            path = os.path.join(trainer.log_dir or "", self.config_filename)
            if trainer.is_global_zero and os.path.isfile(path):
                restore_interpolations(path, templates)
            return
        if trainer.is_global_zero:
            for logger in loggers:
                run = logger.experiment
                path = os.path.join(run.dir, "lightning_config.yaml")
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
                restore_interpolations(path, templates)  # run.config keeps the resolved values: searchable
                run.config.update({**self.config.as_dict(), "code": code_version()}, allow_val_change=True)
        self.already_saved = True
        trainer.strategy.barrier()
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
