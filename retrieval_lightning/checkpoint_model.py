"""The model of an evaluation command taken from its ``--ckpt_path`` when no config defines one.

A checkpoint of this framework records its architecture (backbone, heads and module settings): what
``import-checkpoint`` writes for an official CVNet model is nothing else. ``test``, ``validate``, ``predict``,
``extract`` and ``evaluate`` then need a datamodule and the checkpoint, not a model config that repeats it: the
record is handed to the parser as the first config file, so any ``--config`` or ``--model.*`` given still
overrides it, and the config the run saves (``config_<subcommand>.yaml``) holds the model it ran.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from retrieval_lightning.checkpoints import ARCHITECTURE_KEY, open_checkpoint
from retrieval_lightning.model_record import resolve_head
from retrieval_lightning.retrieval.workdirs import atomic_write_text

#: subcommands that evaluate a model whose weights ``--ckpt_path`` gives
EVALUATING = ("test", "validate", "predict", "extract", "evaluate")
#: options that define a model's parts (a setting inside them, ``init_args.*``, only overrides one)
_MODEL_DEFINING = re.compile(r"^--model(\.backbone(\.class_path)?|\.heads(\.[^.]+(\.class_path)?)?)?$")
#: module settings the parser links from elsewhere (the datamodule's class count)
_LINKED = ("num_classes",)


def _subcommand_position(args: Sequence[str]) -> int | None:
    return next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)


def _configures_model(args: Sequence[str], config_files: Sequence[str]) -> bool:
    """Whether the command line or a config file names the model's backbone or heads (or a whole model)."""
    if any(_MODEL_DEFINING.match(arg.split("=", 1)[0]) for arg in args):
        return True
    for path in config_files:
        try:
            with open(path, encoding="utf-8") as stream:
                config = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError):
            return True  # the parser reports it; do not add a model on top of an unreadable config
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and ("backbone" in model or "heads" in model):
            return True
    return False


def model_config_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"model": ...}`` as a config file writes it, from a checkpoint's architecture record (``None``
    without a complete one)."""
    record = checkpoint.get(ARCHITECTURE_KEY)
    if not isinstance(record, Mapping) or not all(isinstance(record.get(k), Mapping)
                                                  for k in ("backbone", "heads", "module")):
        return None
    backbone = {"class_path": record["backbone"].get("class_path"),
                "init_args": {k: v for k, v in (record["backbone"].get("init_args") or {}).items()
                              if k != "weights"}}  # the checkpoint holds the weights
    module = {k: v for k, v in record["module"].items() if k not in _LINKED}
    return {"model": {**module, "backbone": backbone, "heads": dict(record["heads"])}}


def _names_a_lightning_checkpoint(ckpt_path: str) -> bool:
    """``--ckpt_path`` values Lightning resolves itself rather than as a file."""
    return ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry")


def with_checkpoint_model(args: Sequence[str], ckpt_path: str | None, config_files: Sequence[str],
                          counted: Sequence[str] | None = None) -> tuple[list[str], str | None]:
    """``args`` with the checkpoint's model as the first config file of an evaluating subcommand given
    ``--ckpt_path`` whose command line (``counted``: ``args`` less options that define no model, such as a
    dropped head) and configs define no model, and the note to print; unchanged otherwise."""
    args = list(args)
    position = _subcommand_position(args)
    if position is None or args[position] not in EVALUATING:
        return args, None
    if not ckpt_path or _configures_model(args if counted is None else counted, config_files):
        return args, None
    if not Path(ckpt_path).exists() and _names_a_lightning_checkpoint(ckpt_path):
        return args, None  # "last", "best", ...: Lightning finds (or refuses) it; it holds no model for the parser
    # a missing or unreadable file is named here: the parser would only say that no model is configured
    checkpoint = open_checkpoint(ckpt_path)
    config = model_config_of(checkpoint) if isinstance(checkpoint, dict) else None
    if config is None:
        return args, None
    for role in config["model"]["heads"]:  # a plugin not installed: its distribution, not the parser's temp file
        resolve_head(checkpoint, role, f"--ckpt_path {ckpt_path}")
    path = write_model_config(config)
    note = (f"--ckpt_path {ckpt_path}: no model configured, so the model is the checkpoint's own (backbone "
            f"{backbone_name(config)}, heads {sorted(config['model']['heads'])}); --model.* settings override it")
    return [*args[:position + 1], "--config", path, *args[position + 1:]], note


def write_model_config(config: Mapping[str, Any]) -> str:
    """The model config as a file the parser (and every DDP rank re-launched from the command line) reads: one file
    per distinct config under the temp dir, named by its content, so runs that are killed (no exit handler runs
    on SIGTERM) or repeated in a notebook reuse it instead of leaving one file each."""
    text = yaml.safe_dump(dict(config), sort_keys=False)
    uid = os.getuid() if hasattr(os, "getuid") else 0  # a shared /tmp: another user's file is not ours to replace
    folder = Path(tempfile.gettempdir()) / f"retrieval-lightning-models-{uid}"
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return str(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)  # a reader (another rank) sees the whole file or none
    return str(path)


def backbone_name(config: Mapping[str, Any]) -> str:
    return str(config["model"]["backbone"]["init_args"].get("name", config["model"]["backbone"]["class_path"]))
