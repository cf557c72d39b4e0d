"""``retrieval-lightning import-checkpoint <format> <source> <output>``: official weights → this framework.

Converters are plugins of the entry-point group ``retrieval_lightning.importers``: a function
``convert(source: str, output: str) -> str`` that writes a self-contained checkpoint (see
:mod:`retrieval_lightning.model_record`) and returns a one-line summary. The core knows none of
them; ``heads`` declares ``cvnet`` for the official CVNet R50/R101 files.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Sequence

from retrieval_lightning.checkpoints import UnsafePickleError, trusting_pickles
from retrieval_lightning.outputs import file_path, user_path
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
    parser.add_argument("source", type=user_path, help="the official checkpoint file")
    parser.add_argument("output", type=user_path, help="where to write the converted .ckpt")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle the source whole, running any code it names (files are read weights-only "
                             "otherwise): only for a file from a source you trust")
    args = parser.parse_args(list(argv))
    convert: Callable[[str, str], str] = IMPORTERS.get(args.format)  # type: ignore[assignment]
    file_path(args.output, "import-checkpoint's output")  # before the conversion, not at its end
    trust = trusting_pickles(args.source) if args.trust_pickle else contextlib.nullcontext()
    try:
        with trust:
            summary = convert(args.source, args.output)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{str(err).rstrip('.')}. If the file comes from a source you trust, add "
                                "--trust-pickle (unpickling runs the code it names)") from err
    print(summary)
    return 0
