"""``retrieval-lightning``: LightningCLI for fit/validate/test/predict/finetune, plus ``plugins``
and ``download``.

Plugins are loaded before the parser is built, so configs name heads and datamodules by their
entry-point names (``class_path: gem_arcface``, ``class_path: minilandmarks``). The parser runs in
``omegaconf+`` mode: interpolations are resolved after command-line overrides are applied.
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from retrieval_lightning.callbacks import SaveConfigToLoggers
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.registry import DATAMODULES, HEADS, PluginError, describe_plugins
from retrieval_lightning.trainer import RetrievalTrainer


def register_plugin_aliases() -> list[str]:
    """Create every plugin's short-name alias; return the problems of plugins that failed to load."""
    problems = []
    for registry in (HEADS, DATAMODULES):
        for name in registry.names():
            try:
                registry.alias(name)
            except PluginError as exc:
                problems.append(str(exc))
    return problems


class RetrievalCLI(LightningCLI):
    """LightningCLI wired to the registry: the datamodule's ``num_classes`` flows into the model."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands["finetune"] = {"model", "datamodule"}
        commands["extract"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.num_classes", compute_fn=lambda dm: int(getattr(dm, "num_classes", 0)),
            apply_on="instantiate",
        )


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> RetrievalCLI:
    for problem in register_plugin_aliases():
        warnings.warn(problem, stacklevel=1)
    return RetrievalCLI(
        RetrievalModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        trainer_class=RetrievalTrainer,
        save_config_callback=SaveConfigToLoggers,
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=list(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,
    )


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
        print("usage: retrieval-lightning download <datamodule> [options]; datamodules: "
              + ", ".join(DATAMODULES.names()), file=sys.stderr)
        return 2
    cls = DATAMODULES.get(args[0])
    if not callable(getattr(cls, "download", None)):
        print(f"datamodule {args[0]!r} has no download() method", file=sys.stderr)
        return 2
    parser = ArgumentParser(prog=f"retrieval-lightning download {args[0]}", description=cls.download.__doc__)
    parser.add_method_arguments(cls, "download")
    cfg = parser.parse_args(list(args[1:]))
    summary = cls.download(**cfg.as_dict())
    if summary is not None:
        print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plugins":
        return print_plugins()
    if argv and argv[0] == "download":
        try:
            return run_download(argv[1:])
        except PluginError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
