"""Where commands write the files a user names on their command line."""

from __future__ import annotations

import os
from pathlib import Path


def picture_path(out: str | os.PathLike[str], default_name: str) -> Path:
    """Where ``--out`` puts a picture: inside it when it names a directory, with ``.png`` added when it has no
    suffix, else the path as given.

    Resolved before the work, and pictures are written as PNG whatever the suffix: neither a directory
    nor an unusual suffix can fail a command at its end, after a long search."""
    path = Path(out)
    if path.is_dir():
        return path / default_name
    return path if path.suffix else path.with_suffix(".png")
