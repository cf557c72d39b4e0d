"""The command line as read before LightningCLI's parser: which plugins a command names (so their
short-name aliases exist when the parser meets them), the heads it removes with ``=null`` and the
``--print_config`` it asks for. Kept apart from ``cli`` so that reading arguments is one job."""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from retrieval_lightning.errors import UsageError
from retrieval_lightning.registry import DATAMODULES, HEADS, PluginError


def register_plugin_aliases(names: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Create plugins' short-name aliases (all, or only ``{"heads": [...], "datamodules": [...]}``).

    Returns the problems of plugins that failed to load (listing imports nothing; only the
    aliased plugins are imported).
    """
    problems = []
    for key, registry in (("heads", HEADS), ("datamodules", DATAMODULES)):
        wanted = registry.names() if names is None else [n for n in names.get(key, ()) if n in registry.names()]
        for name in wanted:
            try:
                registry.alias(name)
            except PluginError as exc:
                problems.append(str(exc))
    return problems


def command_sources(args: Sequence[str]) -> list[tuple[str, str]]:
    """``("file", path)`` and ``(key, value)`` in the order given: jsonargparse applies them in that order."""
    sources: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c") or (arg.startswith("-c") and not arg.startswith("--") and len(arg) > 2):
            if eq:
                sources.append(("file", value))
            elif name in ("--config", "-c") and i + 1 < len(args):
                sources.append(("file", args[i + 1]))
                i += 1
            else:
                sources.append(("file", arg[2:]))  # -cFILE
        elif name.startswith("--") and name != "--print_config" and (eq or i + 1 < len(args)):
            sources.append((name[2:], value if eq else args[i + 1]))
            i += 0 if eq else 1
        i += 1
    return sources


def config_files(args: Sequence[str]) -> list[str]:
    """The config files a command line names (``--config F``, ``--config=F``, ``-c F``, ``-cF``), in order."""
    return [value for source, value in command_sources(args) if source == "file"]


def overrides(args: Sequence[str], key: str) -> list[tuple[str, str]]:
    """Values given on the command line for keys matching ``key`` (a regex on the dotted name)."""
    found = []
    pattern = re.compile(rf"^--({key})$")
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        match = pattern.match(name)
        if match and (eq or i + 1 < len(args)):
            found.append((match.group(1), value if eq else args[i + 1]))
    return found


def split_dropped_heads(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments without ``--model.heads.<role>=null``, the roles so dropped).

    Why: a config's head cannot be removed by an override otherwise (the parser wants a head there), and
    an evaluation config of a two-head model then cannot serve the model's one-head stage.
    """
    kept: list[str] = []
    dropped: list[str] = []
    pattern = re.compile(r"^--model\.heads\.([^.=]+)$")
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        match = pattern.match(name)
        if match and not eq and i + 1 < len(args):
            value, step = args[i + 1], 2
        else:
            step = 1
        if match and (eq or step == 2) and value.strip().lower() in ("null", "none", "~"):
            dropped.append(match.group(1))
        else:
            if match and (eq or step == 2) and match.group(1) in dropped:
                dropped.remove(match.group(1))  # set again after its =null: the last value wins, as for any option
            kept.extend(args[i : i + step])
        i += step
    return kept, dropped


def _yaml_with_comments() -> bool:
    """Whether jsonargparse can print a config with comments (it needs ruamel.yaml, not a dependency)."""
    try:
        return importlib.util.find_spec("ruamel.yaml") is not None
    except ImportError:  # no ruamel package at all
        return False


#: the flags ``--print_config=...`` takes here, as jsonargparse takes them
PRINT_CONFIG_FLAGS = ("skip_default", "skip_unset", "skip_null", *(("comments",) if _yaml_with_comments() else ()))


def without_print_config(args: Sequence[str]) -> tuple[list[str], set[str]]:
    """(the arguments without ``--print_config[=flags]``, its flags)."""
    kept: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name != "--print_config":
            kept.append(args[i])
        elif eq:
            flags.update(f for f in value.split(",") if f)
        elif i + 1 < len(args) and set(args[i + 1].split(",")) <= set(PRINT_CONFIG_FLAGS):
            flags.update(args[i + 1].split(","))
            i += 1
        i += 1
    return kept, flags


def _class_path_of(spec: Any) -> str | None:
    """A plugin spec's class name: ``name`` or ``{class_path: name, ...}`` (None for anything else)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        return spec["class_path"]
    return None


def _inline(value: str) -> Any:
    """An override's value as the parser reads it: an inline YAML mapping (``'{class_path: x}'``) or the string."""
    if value.lstrip().startswith("{"):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value  # the parser says what is wrong with it
    return value


def plugin_names_used(args: Sequence[str]) -> dict[str, dict[str, str]]:
    """Short plugin names a command uses, by where they are set (config files and overrides, plain or as an
    inline mapping's ``class_path``). Only names without a dot are plugin names; dotted import paths are left to
    the parser."""
    heads: dict[str, str] = {}
    data: dict[str, str] = {}

    def add_heads(configured: Any, where: Callable[[str], str]) -> None:  # where: a role's key, as shown
        for role, spec in (configured.items() if isinstance(configured, dict) else ()):
            name = _class_path_of(spec)
            if name is not None:
                heads[where(role)] = name

    for path in config_files(args):
        try:
            with open(path, encoding="utf-8") as stream:  # a named stream: YAML errors name the file
                config = yaml.safe_load(stream) or {}
        except OSError:
            continue  # the parser reports a missing config file itself
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(config, dict):
            continue  # the parser says what a config must be
        model = config.get("model")  # a mapping, or another config file's path (the parser reads that one)
        add_heads(model.get("heads") if isinstance(model, dict) else None,
                  lambda role, path=path: f"model.heads.{role}.class_path ({path})")
        name = _class_path_of(config.get("data"))
        if name is not None:
            data[f"data{'' if isinstance(config['data'], str) else '.class_path'} ({path})"] = name
    for _, value in overrides(args, r"model\.heads"):
        add_heads(_inline(value), lambda role: f"--model.heads.{role}")
    for where, value in overrides(args, r"model\.heads\.[^.]+\.class_path|model\.heads\.[^.]+"):
        name = _class_path_of(_inline(value))
        if name is not None:
            heads[f"--{where}"] = name
    for where, value in overrides(args, r"data\.class_path|data"):
        name = _class_path_of(_inline(value))
        if name is not None:
            data[f"--{where}"] = name
    short = lambda found: {k: v for k, v in found.items() if v and "." not in v and not v.startswith("{")}  # noqa: E731
    return {"heads": short(heads), "datamodules": short(data)}


def check_plugin_names(args: Sequence[str]) -> dict[str, list[str]]:
    """Raise the registry's error (what exists, the closest name) for an unknown short name."""
    used = plugin_names_used(args)
    for key, registry in (("heads", HEADS), ("datamodules", DATAMODULES)):
        for where, name in used[key].items():
            try:
                registry.entry(name)
            except PluginError as exc:
                raise PluginError(f"{where}: {exc}") from None
    return {key: sorted(set(found.values())) for key, found in used.items()}
