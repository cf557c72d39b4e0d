"""Where commands write the files a user names on their command line, and how they read its paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError


def user_path(value: str) -> str:
    """An argparse ``type`` for path arguments: ``~`` expanded as a shell would.

    Why: the shell leaves ``--out=~/x.png`` (``~`` after ``=``) and a quoted ``'~/x'`` as they are, and the
    LightningCLI subcommands already expand them; without this the argparse commands wrote to a folder named ``~``.
    """
    return os.path.expanduser(value)


def check_folder_can_be_made(folder: str | os.PathLike[str], option: str) -> Path:
    """``folder`` itself, made now if it is not there, and writable: no part of it is an existing file, and
    a file can be created in it. Checked before the work, so a typo or a read-only path costs nothing
    (``mkdir`` or the first write would fail only at the end, ``search`` after printing its results)."""
    path = Path(folder)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"is inside {part}, a file"
                raise UsageError(f"{option} {folder}: {where}, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from None
    return path


def picture_path(out: str | os.PathLike[str], default_name: str) -> Path:
    """Where ``--out`` puts a picture: inside it when it names a directory, with ``.png`` added when it has no
    suffix, else the path as given.

    Resolved before the work, and pictures are written as PNG whatever the suffix: neither a directory
    nor an unusual suffix nor a file in the way can fail a command at its end, after a long search."""
    path = Path(out)
    if path.is_dir():
        return path / default_name
    check_folder_can_be_made(path.parent, f"--out {out}: its folder")
    return path if path.suffix else path.with_suffix(".png")


def file_path(out: str | os.PathLike[str], option: str) -> Path:
    """An output file the user named: not an existing folder, and its folder can be made."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"{option} {out}: is a folder; name the file to write")
    check_folder_can_be_made(path.parent, f"{option} {out}: its folder")
    return path
