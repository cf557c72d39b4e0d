"""``retrieval-lightning``: LightningCLI for fit/validate/test/predict/finetune/extract/evaluate, plus
``plugins``, ``download``, ``search``, ``match`` and ``import-checkpoint``.

Plugins are loaded before the parser is built, so configs name heads and datamodules by their
entry-point names (``class_path: gem_arcface``, ``class_path: minilandmarks``). The parser runs in
``omegaconf+`` mode: interpolations are resolved after command-line overrides are applied.
What is read of the command line before the parser is in :mod:`retrieval_lightning.cli_args`, how
its errors become one line in :mod:`retrieval_lightning.cli_errors`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from retrieval_lightning.callbacks import SaveConfigToLoggers
from retrieval_lightning.callbacks.config import TRAINING_SUBCOMMANDS, config_file_name
from retrieval_lightning.checkpoint_model import with_checkpoint_model
from retrieval_lightning.checkpoints import ARCHITECTURE_KEY, open_checkpoint, open_lightning_checkpoint
from retrieval_lightning.cli_args import (
    PRINT_CONFIG_FLAGS,
    check_plugin_names,
    config_files,
    overrides,
    register_plugin_aliases,
    split_dropped_heads,
    without_print_config,
)
from retrieval_lightning.cli_errors import (
    ConciseArgumentParser,
    accelerator_refusal,
    innermost,
    interpolation_refusal,
    peer_stopped,
    this_rank,
    user_error_in,
    worker_message,
)
from retrieval_lightning.errors import UsageError
from retrieval_lightning.launched_ranks import stop_launched_ranks
from retrieval_lightning.loggers import label_wandb_runs
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.rank_errors import report_once
from retrieval_lightning.registry import DATAMODULES, PluginError, describe_plugins
from retrieval_lightning.trainer import RetrievalTrainer


def model_setting_changes(recorded: Mapping[str, Any], configured: Any) -> list[str]:
    """``model.<key>: recorded -> configured`` for every leaf setting both hold that differs (the
    checkpoint's hyper-parameters against this run's parsed model config)."""
    def leaves(node: Any, prefix: str) -> dict[str, Any]:
        node = node.as_dict() if hasattr(node, "as_dict") else node
        if isinstance(node, Mapping):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if not str(key).startswith("_"):
                    out.update(leaves(value, f"{prefix}.{key}"))
            return out
        return {prefix: list(node) if isinstance(node, tuple) else node}

    def same_class(key: str) -> bool:  # a plugin's short name and its alias's import path name one class
        a, b = old[key], new[key]
        return key.endswith(".class_path") and isinstance(a, str) and isinstance(b, str) \
            and a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]

    def shown(value: Any) -> str:  # a head by its registry name, as configs write it, not its alias's import path
        alias = "retrieval_lightning.head_plugins."
        return repr(value[len(alias):] if isinstance(value, str) and value.startswith(alias) else value)

    old, new = leaves(recorded, "model"), leaves(configured, "model")
    skip = {"model.num_classes"}  # linked from the datamodule
    return [f"{key}: {shown(old[key])} -> {shown(new[key])}" for key in sorted(set(old) & set(new))
            if old[key] != new[key] and key not in skip and not same_class(key)]


#: ``--ckpt_path`` values Lightning resolves itself (this directory's last or best checkpoint, ...)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
#: subcommands whose ``--ckpt_path`` Lightning loads (needs a full checkpoint; extract/evaluate take weights too)
_LIGHTNING_LOADS = ("fit", "validate", "test", "predict", "finetune")
#: module settings only training reads
_TRAINING_SETTINGS = tuple(f"model.{key}" for key in ("optim", "loss_weights", "detach", "freeze", "init_from"))


#: jsonargparse's earlier names of ``dump``'s options (up to 4.49; setup.cfg allows 4.42 and later)
_EARLIER_DUMP_NAMES = {"skip_unset": "skip_none", "skip_validation": "skip_check", "with_comments": "yaml_comments"}


def dump_options(dump: Any, **options: bool) -> dict[str, bool]:
    """``options`` under the names this jsonargparse's ``dump`` takes (it renamed them; an older one refused the
    new names)."""
    accepted = inspect.signature(dump).parameters
    return {name if name in accepted else _EARLIER_DUMP_NAMES.get(name, name): value
            for name, value in options.items() if name in accepted or _EARLIER_DUMP_NAMES.get(name) in accepted}


def datamodule_num_classes(datamodule: Any) -> int:
    """``model.num_classes`` from the datamodule (0 for one that only evaluates). A module-level function, not a
    lambda: the parser it is linked into is pickled with the trainer under ``strategy=ddp_spawn``."""
    return int(getattr(datamodule, "num_classes", 0))


def gloo_without_gpus(trainer: Any) -> None:
    """A DDP strategy set to NCCL on a machine without GPUs (a GPU config run on a CPU machine) falls back to gloo,
    said once, instead of every rank's ``ProcessGroupNCCL is only supported with GPUs`` traceback."""
    import torch

    strategy = getattr(trainer, "strategy", None)
    if getattr(strategy, "_process_group_backend", None) == "nccl" and not torch.cuda.is_available():
        rank_zero_warn("trainer.strategy: process_group_backend nccl needs GPUs and this machine has none; using gloo")
        strategy._process_group_backend = "gloo"  # read when the process group starts, after this


class RetrievalCLI(LightningCLI):
    """LightningCLI wired to the registry: the datamodule's ``num_classes`` flows into the model."""

    #: roles given as ``--model.heads.<role>=null``, left out of the parsed arguments and the model
    dropped_heads: list[str] = []

    def __init__(self, *args: Any, command_line: Sequence[str] | None = None, **kwargs: Any) -> None:
        """``command_line``: what the user ran, when the parser was given more (the checkpoint's model config)."""
        self.command_line = list(command_line) if command_line is not None else None
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """The command line less ``--model.heads.<role>=null`` (sys.argv keeps them: DDP re-launches it)."""
        try:
            self._parse_arguments(parser, args)
        except Exception as exc:
            refusal = interpolation_refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc

    def _parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is not None:
            super().parse_arguments(parser, args)
            return
        full = sys.argv
        kept, self.dropped_heads = split_dropped_heads(full[1:])
        sys.argv = [*full[:1], *kept]
        try:
            if self.dropped_heads and any(arg.split("=")[0] == "--print_config" for arg in kept):
                self._print_config_without_dropped_heads(parser)
            super().parse_arguments(parser, None)
        finally:
            sys.argv = full

    def _print_config_without_dropped_heads(self, parser: LightningArgumentParser) -> NoReturn:
        """``--print_config`` with ``--model.heads.<role>=null``: jsonargparse prints while parsing, before the
        heads are dropped, so the config is parsed without it, the heads dropped, then printed as it would be."""
        args, flags = without_print_config(sys.argv[1:])
        unknown = sorted(flags - set(PRINT_CONFIG_FLAGS))
        if unknown:
            needs = "; 'comments' needs ruamel.yaml installed" if "comments" in unknown else ""
            raise UsageError(f"--print_config: unknown flag {unknown[0]!r} (flags: {', '.join(PRINT_CONFIG_FLAGS)}"
                             f"{needs})")
        saved = sys.argv
        sys.argv = [*saved[:1], *args]
        try:
            super().parse_arguments(parser, None)
        finally:
            sys.argv = saved
        self._drop_heads()
        dump = self._parser(self.config.get("subcommand")).dump
        options = dump_options(dump, skip_unset="skip_unset" in flags or "skip_null" in flags,
                               skip_default="skip_default" in flags, with_comments="comments" in flags,
                               skip_validation=True)
        print(dump(self._command_config(), **options), end="")
        sys.exit(0)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands["finetune"] = {"model", "datamodule"}
        commands["extract"] = {"model", "datamodule"}
        commands["evaluate"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.num_classes", compute_fn=datamodule_num_classes,
            apply_on="instantiate",
        )

    def before_validate(self) -> None:
        """``validate`` with the demos' ``limit_val_batches: 0`` (set for their fits) ran no batch and exited 0
        without a metric or a word."""
        if self.trainer.limit_val_batches == 0:
            raise UsageError("validate evaluates nothing: trainer.limit_val_batches is 0 (the config's setting for "
                             "fit); pass --trainer.limit_val_batches 1.0")

    def before_predict(self) -> None:
        """``predict`` without a prediction writer computes every descriptor and keeps none."""
        from lightning.pytorch.callbacks import BasePredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            rank_zero_warn("predict writes nothing without a prediction-writer callback; `retrieval-lightning extract` "
                           "(same arguments, plus --output_dir) writes the descriptors to a feature store for `search`")

    def _run_subcommand(self, subcommand: str) -> None:
        label_wandb_runs(self.trainer, subcommand, self.config.get(subcommand, self.config).as_dict())
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigToLoggers):
                callback.config_filename = config_file_name(subcommand)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=DDP_EVALUATION_ADVICE)
                if subcommand not in TRAINING_SUBCOMMANDS:
                    warnings.filterwarnings("ignore", message=CHECKPOINT_DIRPATH_NOTE)
                super()._run_subcommand(subcommand)
        except ValueError as exc:  # Lightning's refusal of --ckpt_path best/hpc (a ValueError, so a traceback)
            if "ckpt_path=" not in str(exc) or user_error_in(exc) is not None:
                raise
            raise UsageError(f"--ckpt_path: {exc}; give the run's checkpoint by its file") from exc

    def _command_config(self) -> Any:
        """The parsed config of this run's command (the whole config without a subcommand: ``run=False``)."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _drop_heads(self) -> None:
        """Remove the heads given as ``--model.heads.<role>=null`` from the parsed config."""
        if not self.dropped_heads:
            return
        model = self._command_config()["model"]
        heads = model["heads"]
        unknown = sorted(set(self.dropped_heads) - set(heads))
        if unknown:
            raise UsageError(f"--model.heads.{unknown[0]}=null: no head {unknown[0]!r} is configured "
                             f"(the heads are {sorted(heads)})")
        for role in self.dropped_heads:  # and the training settings that name it
            del heads[role]
            for key in ("loss_weights", "detach", "freeze"):
                if isinstance(model.get(key), dict):
                    model[key].pop(role, None)
                elif isinstance(model.get(key), list):
                    model[key] = [name for name in model[key] if name != role]
            mults = model.get("optim") and model["optim"].get("head_lr_mult")
            if isinstance(mults, dict):
                mults.pop(role, None)

    def instantiate_classes(self) -> None:
        """A value the classes refuse while being built (``rerank.k: 0``, an unknown ``eval_resize`` or
        margin, ``freeze`` naming a head that is not configured) is a user error, reported in one line.
        jsonargparse re-raises a dataclass's refusal as a multi-line union error, so the innermost
        exception (the one that names the value) is reported."""
        if self.command_line is not None:  # parsed: W&B records sys.argv and DDP re-launches it, whose ranks add the
            sys.argv = self.command_line  # checkpoint's model again; a temp file's name would be neither re-runnable
        self._drop_heads()
        try:
            super().instantiate_classes()
        except ValueError as exc:
            if user_error_in(exc) is not None:
                raise
            raise UsageError(f"the configuration cannot be built: {innermost(exc)}") from exc
        except Exception as exc:
            refusal = accelerator_refusal(exc, self._command_config())
            if refusal is None:
                raise
            raise refusal from exc
        gloo_without_gpus(self.trainer)

    def _parse_ckpt_path(self) -> None:
        """The config and the command line define the model; ``--ckpt_path`` gives its weights (and a
        resumed run's state).

        Lightning would instead re-parse the checkpoint's hyper-parameters over the config file and the
        command line (Lightning-AI/pytorch-lightning#21455): ``test --ckpt_path C --model.rerank.k=5``
        silently used the checkpoint's ``k``, and as heads and backbone are modules, not
        hyper-parameters, a run mixed one model's settings (``detach``, ``eval_resize``, ...) with the
        config's heads. Settings that differ from the checkpoint's record are listed instead.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "best":  # Lightning's name for a fit earlier in the same process: never one from a command
            raise UsageError("--ckpt_path best names the best checkpoint of a fit earlier in the same Python process; "
                             "from the command line give the run's checkpoint by its file (ModelCheckpoint's "
                             "best_model_path, e.g. <default_root_dir>/checkpoints/best-*.ckpt)")
        if not ckpt_path or ckpt_path in _LIGHTNING_CKPT_NAMES:
            return
        if subcommand in _LIGHTNING_LOADS:  # extract/evaluate take plain weights files too
            checkpoint = open_lightning_checkpoint(ckpt_path)
        else:
            if not Path(ckpt_path).is_file():
                return  # loading the weights names a missing file
            try:
                checkpoint = open_checkpoint(ckpt_path)
            except Exception:  # noqa: BLE001 - loading the weights reports an unreadable file, with its path
                return
        recorded = checkpoint.get("hyper_parameters")
        if not isinstance(recorded, dict):  # import-checkpoint writes the architecture record alone
            recorded = (checkpoint.get(ARCHITECTURE_KEY) or {}).get("module")
        if not isinstance(recorded, dict):
            return
        changes = model_setting_changes(_with_modules(recorded, checkpoint.get(ARCHITECTURE_KEY)),
                                        self.config[subcommand].get("model"))
        if subcommand not in ("fit", "finetune"):  # what only training reads is no news to an evaluation
            changes = [c for c in changes if not c.startswith(_TRAINING_SETTINGS)]
        if changes:
            resumed = (" (resuming restores the optimiser's and scheduler's state, learning rates included)"
                       if subcommand in ("fit", "finetune") else "")
            rank_zero_info(f"--ckpt_path {ckpt_path}: this run's model settings differ from the checkpoint's; "
                           f"the config and command line apply{resumed}, except to what the checkpoint holds "
                           "as tensors (a fixed GeM p is a buffer): " + "; ".join(changes[:8])
                           + (f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""))


def _with_modules(recorded: dict[str, Any], architecture: Any) -> dict[str, Any]:
    """The checkpoint's hyper-parameters plus its heads' and backbone's arguments from its architecture
    record (they are modules, not hyper-parameters); the backbone's weights source is the checkpoint."""
    if not isinstance(architecture, Mapping):
        return recorded
    backbone = dict(architecture.get("backbone") or {})
    backbone["init_args"] = {k: v for k, v in (backbone.get("init_args") or {}).items() if k != "weights"}
    return {**recorded, "heads": architecture.get("heads") or {}, "backbone": backbone}


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> RetrievalCLI:
    """LightningCLI with the plugins this command names imported (lazily), checked by the registry first."""
    args = given = list(sys.argv[1:] if args is None else args)
    kept = split_dropped_heads(args)[0]
    ckpt_paths = [value for _, value in overrides(kept, "ckpt_path")]
    args, note = with_checkpoint_model(args, ckpt_paths[-1] if ckpt_paths else None, config_files(kept), kept)
    if note:
        rank_zero_info(note)
    used = check_plugin_names(split_dropped_heads(args)[0])
    problems = register_plugin_aliases(used)
    if problems:  # a plugin this command names cannot load: say why, not the parser's "expected a class path"
        raise PluginError("; ".join(problems))
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "retrieval-lightning", *args]  # DDP re-launches sys.argv
    try:
        return RetrievalCLI(
            RetrievalModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_class=RetrievalTrainer,
            save_config_callback=SaveConfigToLoggers,
            parser_kwargs={"parser_mode": "omegaconf+"},
            parser_class=ConciseArgumentParser,
            args=None,
            run=run,
            auto_configure_optimizers=False,
            command_line=[sys.argv[0], *given] if note else None,
        )
    finally:
        if not run:
            sys.argv = saved_argv


def print_plugins() -> int:
    rows = describe_plugins()
    cols = ["kind", "name", "role", "distribution", "version", "target"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols} if rows else {c: len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols))
        if row["status"] != "ok":
            print(f"    ! {row['status']}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def run_download(args: Sequence[str]) -> int:
    """``download <datamodule> [--option value ...]``: call the datamodule's ``download`` classmethod."""
    from jsonargparse import ArgumentParser

    if not args or args[0].startswith("-"):
        downloadable = [n for n in DATAMODULES.names() if callable(getattr(DATAMODULES.get(n), "download", None))]
        asked = bool(args) and args[0] in ("-h", "--help")
        print("usage: retrieval-lightning download <datamodule> [options]; datamodules with a download: "
              + ", ".join(downloadable) + "; their options: retrieval-lightning download <datamodule> --help",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    cls = DATAMODULES.get(args[0])
    if not callable(getattr(cls, "download", None)):
        print(f"error: datamodule {args[0]!r} has no download() method", file=sys.stderr)
        return 2
    parser = ArgumentParser(prog=f"retrieval-lightning download {args[0]}", description=cls.download.__doc__)
    parser.add_method_arguments(cls, "download")
    cfg = parser.parse_args(list(args[1:]))
    summary = cls.download(**cfg.as_dict())
    if summary is not None:
        print(summary)
    return 0


COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, function) taking the remaining arguments, returning an exit status
    "search": ("retrieval_lightning.search_cli", "run_search"),
    "match": ("retrieval_lightning.match", "run_match"),
    "import-checkpoint": ("retrieval_lightning.importers", "run_import"),
}


#: the commands outside LightningCLI's parser, for the top-level help and the unknown-command error
OTHER_COMMANDS = {
    "plugins": "heads and datamodules installed, with role, distribution and version",
    "download": "download a datamodule's data (those with a download(): see download --help)",
    "search": "query images against an extracted feature store",
    "match": "inliers between two images (SIFT, or a checkpoint's local features / verifier), drawn",
    "import-checkpoint": "convert an official checkpoint into this framework's (formats: see its --help)",
}


def _other_commands_help() -> str:
    width = max(map(len, OTHER_COMMANDS))
    return "other commands (each takes --help):\n" + "\n".join(
        f"  {name.ljust(width)}  {text}" for name, text in OTHER_COMMANDS.items()) + (
        f"\n  {'--version'.ljust(width)}  this package's version and torch's, lightning's, timm's, numpy's")


def version_line() -> str:
    """This package's version with the versions a bug report needs (the libraries that decide the numbers)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "lightning", "timm", "numpy"))
    return f"retrieval-lightning {installed('retrieval-lightning')} ({libraries}; Python {sys.version.split()[0]})"


def _dispatch(argv: list[str]) -> int:
    lightning = sorted(RetrievalCLI.subcommands())
    if argv in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_other_commands_help() + "\n")  # then LightningCLI's own usage of the training commands
    elif not argv[0].startswith("-") and argv[0] not in (*lightning, *OTHER_COMMANDS):
        known = [*lightning, *OTHER_COMMANDS]
        close = difflib.get_close_matches(argv[0], known, n=1)
        raise UsageError(f"unknown command {argv[0]!r}{f'; did you mean {close[0]!r}?' if close else '.'} "
                         f"Commands: {', '.join(known)}")
    if argv and argv[0] == "plugins":
        if argv[1:] in (["-h"], ["--help"]):
            print(f"usage: retrieval-lightning plugins\n{OTHER_COMMANDS['plugins']} (takes no options)")
            return 0
        if argv[1:]:
            raise UsageError(f"plugins takes no arguments, got {' '.join(argv[1:])!r}")
        return print_plugins()
    if argv and argv[0] == "download":
        return run_download(argv[1:])
    if argv and argv[0] in COMMANDS:
        module, function = COMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
    run_lightning_cli(argv)
    return 0


def _open_progress_bars() -> bool:
    """Whether a tqdm bar (Lightning's, or one of this package's passes) is still open on the terminal."""
    from tqdm.std import tqdm

    return bool(getattr(tqdm, "_instances", None))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: known user errors print one ``error: ...`` line and exit 2 (``--traceback`` shows it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv or os.environ.get("RETRIEVAL_LIGHTNING_TRACEBACK") == "1"
    argv = [a for a in argv if a != "--traceback"]
    quiet_third_party_notices()
    stopping: threading.Thread | None = None
    try:
        return _dispatch(argv)
    except Exception as exc:
        # the ranks this process launched stop too (given a moment to stop by themselves) while it reports
        stopping = threading.Thread(target=stop_launched_ranks, daemon=True)
        stopping.start()
        cause = user_error_in(exc)
        if cause is None and peer_stopped(exc) and not show_traceback:
            rank = this_rank()
            print(f"error{f' (rank {rank})' if rank else ''}: stopped: another rank of this run failed (its error "
                  "is printed above or below)", file=sys.stderr)
            return 1
        if cause is None or show_traceback:
            raise
        message = worker_message(str(cause), type(cause).__name__).strip().splitlines()
        lines = [f"error: {message[0] if message else type(cause).__name__}", *(f"  {line}" for line in message[1:4])]
        report = report_once("\n".join(lines))  # under DDP: once, not once per rank
        if report is not None:
            if _open_progress_bars():  # the line of a bar the error stopped (Lightning's): start a new one
                print(file=sys.stderr)
            print(report, file=sys.stderr)
        return 2
    finally:
        if stopping is not None:
            stopping.join()
        _finish_wandb_run()


#: Lightning's advice under DDP test / validate, false here: the gathered descriptors are de-duplicated by
#: dataset index, so each item is evaluated exactly once
DDP_EVALUATION_ADVICE = r"Using `DistributedSampler` with the dataloaders\. During `trainer\.(test|validate)\(\)`"
#: ModelCheckpoint's note (every rank prints it) that a restored checkpoint's run kept its best ones elsewhere:
#: nothing to an evaluation, which writes no checkpoint
CHECKPOINT_DIRPATH_NOTE = r"The dirpath has changed from"


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_third_party_notices() -> None:
    """Lines a command's user can do nothing about, printed by its dependencies on every run: Lightning's
    advertisement for its own logger service, and the deprecation warning its pytree helper triggers under
    recent torch (Lightning's own code; the check it makes is unaffected). Other warnings are kept."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in logger.filters:
        logger.addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _finish_wandb_run() -> None:
    """One command, one W&B run: a second ``main`` in the same process (a notebook) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish()


if __name__ == "__main__":
    sys.exit(main())
