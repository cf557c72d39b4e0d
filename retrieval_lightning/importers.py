"""``retrieval-lightning import-checkpoint <format> <source> <output>``: official weights → this framework.

Converters are plugins of the entry-point group ``retrieval_lightning.importers``: a function
``convert(source: str, output: str) -> str`` that writes a self-contained checkpoint (see
:mod:`retrieval_lightning.model_record`) and returns a one-line summary. The core knows none of
them; ``heads`` declares ``cvnet`` for the official CVNet R50/R101 files.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from retrieval_lightning.registry import Registry

IMPORTERS_GROUP = "retrieval_lightning.importers"


def _check_importer(obj: object) -> str | None:
    return None if callable(obj) else f"{obj!r} is not callable as convert(source, output)"


IMPORTERS = Registry(IMPORTERS_GROUP, "checkpoint importer", __name__, _check_importer)


def run_import(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="retrieval-lightning import-checkpoint",
        description="Convert an official checkpoint into a self-contained retrieval-lightning checkpoint.",
    )
    parser.add_argument("format", help=f"one of: {', '.join(IMPORTERS.names()) or 'none installed'}")
    parser.add_argument("source", help="the official checkpoint file")
    parser.add_argument("output", help="where to write the converted .ckpt")
    args = parser.parse_args(list(argv))
    convert: Callable[[str, str], str] = IMPORTERS.get(args.format)  # type: ignore[assignment]
    print(convert(args.source, args.output))
    return 0
