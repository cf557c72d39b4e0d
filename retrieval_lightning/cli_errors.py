"""Errors of the command line in one line each: the parser's (the option named, the closest one
suggested, the subcommand's own ``--help``), an accelerator the machine lacks, and the user error
inside a wrapped exception (a loader worker's, a jsonargparse union's)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from retrieval_lightning.errors import UsageError, user_error_types


def _subcommands() -> dict[str, set[str]]:
    from retrieval_lightning.cli import RetrievalCLI  # the CLI imports this module: looked up when needed

    return RetrievalCLI.subcommands()


class ConciseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad option as one ``error:`` line (with the closest valid name)
    instead of the whole usage and the types it tried. Errors it raises while trying alternatives
    internally (``exit_on_error`` off) are left to jsonargparse."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {concise_parser_error(message, parser)}", file=sys.stderr)
        print(f"  (all options: {_help_command(parser, message)} --help)", file=sys.stderr)
        sys.exit(2)


def _help_command(parser: Any, message: str) -> str:
    """The command whose ``--help`` lists the options ``message`` is about: a subcommand's missing options
    (``test.model.backbone``) are raised by the top parser, whose help does not list them."""
    command = parser.prog.replace(" [options]", "")
    subcommands = _subcommands()
    if set(command.split()) & set(subcommands):
        return command  # a subcommand's own parser (a file or value named test.x in the message is no command)
    listed = re.search(r"arguments are required: (.*)", message)
    named = listed and re.match(r"(" + "|".join(map(re.escape, subcommands)) + r")\.[\w.]+", listed.group(1))
    return f"{command} {named.group(1)}" if named else command


def accelerator_refusal(exc: BaseException, config: Any) -> UsageError | None:
    """Lightning's refusal of an accelerator this machine lacks, naming the setting and what the machine has.

    Why: a GPU config run on a CPU machine says only "No supported gpu backend found!" (``gpu``) or is a
    ``torch_xla`` traceback (``tpu``), neither naming ``--trainer.accelerator``. None for any other error.
    """
    import traceback

    import torch

    if not any("accelerator" in Path(frame.filename).name for frame in traceback.extract_tb(exc.__traceback__)):
        return None
    value = (config.get("trainer") or {}).get("accelerator")
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UsageError(f"--trainer.accelerator={value}: {first} (this machine has {', '.join(available)}; "
                      "--trainer.accelerator=auto picks the best of them)")


def interpolation_refusal(exc: BaseException) -> UsageError | None:
    """An ``${...}`` the parser could not resolve, in one line with how to write it (it was a traceback): keys are
    looked up in the subcommand's config, where ``${trainer.max_steps}`` is ``fit.trainer.max_steps``."""
    from omegaconf.errors import InterpolationResolutionError

    current = next((e for e in _chain(exc) if isinstance(e, InterpolationResolutionError)), None)
    if current is None:
        return None
    first = str(current).strip().splitlines()[0] if str(current).strip() else type(current).__name__
    return UsageError(f"{first}. An interpolation is resolved inside the subcommand's config: write it relative "
                      "to its own key (the recipes' ${....default_root_dir}) or from the subcommand "
                      "(${fit.trainer.max_steps})")


def concise_parser_error(message: str, parser: Any) -> str:
    """The line of a jsonargparse error that names the bad option, with "did you mean" when a valid one is close."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    unknown = re.search(r"unrecognized arguments: (--?[^\s=]+)", message)
    if unknown:
        name = unknown.group(1)
        options = [o for action in parser._actions for o in action.option_strings]
        listed = re.match(r"(--?[\w.\-]+)\[", name)
        if listed and listed.group(1) in options:  # "did you mean --trainer.callbacks?" of --trainer.callbacks[0].x
            base = listed.group(1)
            return (f"unknown option {name}: list items are not indexed on the command line ({base}+=<class> "
                    f"appends one, {base}.<argument>=<value> reaches the last one only): to change another, edit "
                    "the config")
        close = difflib.get_close_matches(name, [o for o in options if o != name], n=1, cutoff=0.75)
        return f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else "")
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    rejected = next((re.search(r"[Oo]ption '([^']+)' is not accepted|Key '([^']+)' is not expected", line)
                     for line in lines if re.search(r"is not accepted|is not expected", line)), None)
    if key and rejected:
        bad = rejected.group(1) or rejected.group(2)
        given = re.search(r"given class_path '([\w.]+)'", message)
        fields = _fields_of(parser, key.group(1)) + (_init_parameters(given.group(1)) if given else [])
        close = difflib.get_close_matches(bad, fields, n=1, cutoff=0.6)
        return f"{key.group(1)}: unknown option {bad!r}" + (f"; did you mean {close[0]!r}?" if close else "")
    missing_class = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.*(?:has no attribute|No module "
                              r"named).*)", message)
    if key and missing_class:  # a misspelt callback or logger class: jsonargparse's union error names neither
        path, reason = missing_class.group(1), missing_class.group(2).strip()
        return f"{key.group(1)}: class_path {path!r} cannot be imported ({reason})" + _close_class(path)
    found = re.findall(r'Parser key "([^"]+)"', message)
    keys = [k for i, k in enumerate(found) if i == 0 or k != found[i - 1]]  # two Union branches name a key twice
    if len(keys) > 1:  # a nested option (a head's argument): its path, the class, and the innermost reason
        given = re.search(r"given class_path '([\w.]+)'", message)
        where = keys[0] + (f" ({given.group(1).rsplit('.', 1)[-1]})" if given else "") + "".join(
            f", {k}" for k in keys[1:])
        return f"{where}: {_innermost_reason(message, keys[-1])}"
    return " ".join(lines[:2]) if lines else message


def _close_class(class_path: str) -> str:
    """``; did you mean '<module>.<Name>'?`` for the closest public name of the class path's module, if any."""
    module_name, _, name = class_path.rpartition(".")
    try:
        names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
    except (ImportError, ValueError):
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return f"; did you mean '{module_name}.{close[0]}'?" if close else ""


def _innermost_reason(message: str, key: str) -> str:
    """What jsonargparse says under the last ``Parser key "<key>"`` of ``message``: its first line, or for an
    optional (Union) option the types it expected and the value it got."""
    raw = [line for line in message.splitlines() if line.strip()]
    at = max(i for i, line in enumerate(raw) if line.strip().startswith(f'Parser key "{key}"'))
    indent = len(raw[at]) - len(raw[at].lstrip())
    block = []
    for line in raw[at + 1:]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line.strip())
    reason = block[0] if block else raw[-1].strip()
    if reason.startswith("Does not validate against any of the Union subtypes"):
        expected = [m.group(1) for m in (re.match(r"- Expected an? <class '([^']+)'>", b) for b in block) if m]
        given = next((b for b in block if b.startswith("Given value:")), "")
        types = [t for t in expected if t != "NoneType"]
        nullable = " (or null)" if "NoneType" in expected else ""
        reason = f"expected {' or '.join(types) or 'another value'}{nullable}" + (
            f". Got value: {given.split(':', 1)[1].strip()}" if given else "")
    return re.sub(r"Expected an? <class '([^']+)'>", r"expected \1", reason)


def _fields_of(parser: Any, dest: str) -> list[str]:
    """Argument names of the classes an option of ``parser`` accepts (dataclass fields, ``__init__`` parameters)."""
    action = next((a for a in parser._actions if a.dest == dest), None)
    hint = getattr(action, "_typehint", None)
    names: list[str] = []
    for cls in (typing.get_args(hint) or (hint,)):
        if dataclasses.is_dataclass(cls):
            names += [f.name for f in dataclasses.fields(cls)]
        elif isinstance(cls, type) and cls is not type(None):
            names += _signature_names(cls)
    return names


def _init_parameters(class_path: str) -> list[str]:
    """``__init__`` parameters of the class a ``class_path`` names (a datamodule or head plugin); none if it
    cannot be imported, since this only words an error that is already being reported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return _signature_names(cls) if isinstance(cls, type) else []


def _signature_names(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def worker_message(text: str, type_name: str) -> str:
    """The error's own message when a DataLoader worker raised it: PyTorch re-raises it in the main process
    with the worker's whole traceback as its message, where the path of a bad image is on the last lines."""
    if "Original Traceback (most recent call last)" not in text:
        return text
    lines = text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = re.match(rf"^(?:[A-Za-z_][\w.]*\.)?{re.escape(type_name)}: (.*)$", lines[i])
        if match:
            return "\n".join([match.group(1), *lines[i + 1:]])
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, and so on (a cycle ends it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def innermost(exc: BaseException) -> BaseException:
    """The first exception of the chain that ``exc`` was raised from or while handling."""
    *_, first = _chain(exc)
    return first


#: what a collective says on a rank whose peer has stopped (gloo; NCCL once its watchdog aborts the communicator)
PEER_GONE = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
             "NCCL communicator was aborted")


def peer_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is this rank's collective failing because another rank of the run stopped (its own error,
    printed by that rank, is the one to read): this rank's traceback would only bury it. Only under DDP: in one
    process a "connection reset by peer" is an error of its own (a download)."""
    import torch.distributed as dist

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
    return distributed and type(exc).__name__ in ("RuntimeError", "DistBackendError", "DistNetworkError") and \
        any(pattern in str(exc) for pattern in PEER_GONE)


def this_rank() -> str | None:
    """This process's global rank, when it is one of several (for an error line)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_rank())
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK"))


def user_error_in(exc: BaseException) -> BaseException | None:
    """``exc`` if it is a user error, else the first user error it was raised from.

    Why: jsonargparse re-raises what a datamodule raises while the CLI links ``num_classes`` as a
    ``ValueError`` "Call to compute_fn ... failed"; the user needs the cause (a missing CSV).
    """
    user_errors = user_error_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, user_errors):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None
