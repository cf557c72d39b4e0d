"""Entry-point registries for head and datamodule plugins.

How a plugin is found: a distribution declares, in its packaging metadata,

.. code-block:: ini

    [options.entry_points]
    retrieval_lightning.heads =
        my_head = my_pkg.heads:MyHead
    retrieval_lightning.datamodules =
        my_data = my_pkg.data:MyDataModule

The built-in heads and datamodules are declared exactly so in this project's ``setup.cfg``.
Listing reads metadata only; a plugin's module is imported the first time :meth:`Registry.get`
asks for it. A head class must subclass :class:`~retrieval_lightning.head.Head`; a datamodule
class must subclass ``lightning.LightningDataModule`` and provide ``eval_sets(stage)`` (see
:mod:`retrieval_lightning.data.types`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterable

HEADS_GROUP = "retrieval_lightning.heads"
DATAMODULES_GROUP = "retrieval_lightning.datamodules"


class PluginError(LookupError):
    """Any registry failure: unknown, duplicated or broken plugin."""


class UnknownPluginError(PluginError, AttributeError):
    """No plugin of that name is declared.

    Also an ``AttributeError``, so ``hasattr(head_plugins, name)`` and ``getattr(..., default)``
    on the alias modules answer False / the default instead of raising.
    """


@dataclass(frozen=True)
class PluginEntry:
    name: str
    target: str  # "module:attr"
    distribution: str
    version: str
    entry_point: metadata.EntryPoint

    def describe(self) -> str:
        return f"{self.name} ({self.target}) from {self.distribution} {self.version}"


def _entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=group)


class Registry:
    """One entry-point group: lists lazily, imports on first use, caches what it loaded."""

    def __init__(
        self,
        group: str,
        kind: str,
        alias_module: str,
        check: Callable[[object], str | None] | None = None,
    ):
        self.group = group
        self.kind = kind
        self.alias_module = alias_module
        self._check = check
        self._loaded: dict[str, object] = {}
        self._aliases: dict[str, type] = {}

    def entries(self) -> dict[str, PluginEntry]:
        """Every declared plugin by name (the first declaration of a name two distributions claim;
        :meth:`clashes` says which, and using such a name is an error)."""
        return self._scan()[0]

    def clashes(self) -> dict[str, str]:
        """Names two distributions declare, with the error that using one of them raises."""
        return self._scan()[1]

    def _scan(self) -> tuple[dict[str, PluginEntry], dict[str, str]]:
        found: dict[str, PluginEntry] = {}
        clashes: dict[str, str] = {}
        for ep in _entry_points(self.group):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "<unknown distribution>"
            version = ep.dist.version if ep.dist is not None else "?"
            entry = PluginEntry(ep.name, ep.value, dist, version, ep)
            other = found.get(ep.name)
            if other is not None and (other.distribution, other.target) != (dist, ep.value):
                clashes.setdefault(ep.name, (
                    f"{self.kind} name {ep.name!r} is declared twice in entry-point group "
                    f"{self.group!r}: by {other.describe()} and by {entry.describe()}; "
                    "uninstall one or rename its entry point"))
            found.setdefault(ep.name, entry)
        return found, clashes

    def names(self) -> list[str]:
        return sorted(self.entries())

    def entry(self, name: str) -> PluginEntry:
        entries, clashes = self._scan()
        if name in clashes:  # only a command that uses the name is stopped by the clash
            raise PluginError(clashes[name])
        if name not in entries:
            known = sorted(entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}{hint} Registered {self.kind}s "
                f"(entry-point group {self.group!r}): {', '.join(known) or 'none'}"
            )
        return entries[name]

    def get(self, name: str) -> type:
        """The plugin class for ``name``, imported on first use."""
        if name in self._loaded:
            return self._loaded[name]  # type: ignore[return-value]
        entry = self.entry(name)
        if not entry.entry_point.pattern.match(entry.target):  # else importlib fails inside its own parsing
            raise PluginError(
                f"{self.kind} plugin {name!r} from distribution {entry.distribution} {entry.version}: its "
                f"entry-point target {entry.target!r} is not of the form module:attribute"
            )
        try:
            obj = entry.entry_point.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin named
            raise PluginError(
                f"{self.kind} plugin {name!r} ({entry.target}) from distribution "
                f"{entry.distribution} {entry.version} failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self._check is not None:
            problem = self._check(obj)
            if problem:
                raise PluginError(
                    f"{self.kind} plugin {name!r} ({entry.target}) from distribution "
                    f"{entry.distribution}: {problem}"
                )
        self._loaded[name] = obj
        return obj  # type: ignore[return-value]

    def alias(self, name: str) -> type:
        """A subclass of the plugin class importable as ``<alias_module>.<name>``.

        Config parsers (jsonargparse) resolve a ``class_path`` without dots by class name among
        the subclasses they know; the alias is named after the entry point, so configs and
        command lines can say ``class_path: gem_arcface``, and checkpoints record an import path
        that resolves through the registry again.
        """
        if name not in self._aliases:
            cls = self.get(name)
            self._aliases[name] = type(
                name, (cls,), {"__module__": self.alias_module, "__qualname__": name, "__doc__": cls.__doc__}
            )
        return self._aliases[name]

    def module_hooks(self) -> tuple[Callable[[str], type], Callable[[], list[str]]]:
        """``__getattr__`` and ``__dir__`` of :attr:`alias_module`, whose attributes are the plugins.

        Attribute access goes through the registry (imports the plugin on first use), so a config's
        ``class_path: <name>`` and a checkpoint's recorded class path both resolve to the plugin. An
        unknown name raises :class:`UnknownPluginError`, an ``AttributeError``, so ``hasattr`` works; a
        declared plugin that fails to import still raises :class:`PluginError` (a broken install must
        not look like a missing name)."""

        def module_getattr(name: str) -> type:
            if name.startswith("_"):
                raise AttributeError(name)
            return self.alias(name)

        return module_getattr, self.names


def _check_head(obj: object) -> str | None:
    """Why a head class cannot serve its role, or ``None``: the base class the role is reached through
    (a ``verifier`` that is a plain ``Head`` would never re-rank) and the methods it must implement."""
    from retrieval_lightning.head import ROLES, GlobalHead, Head, LocalHead, RerankHead, SparsifierHead, VerifierHead

    if not (isinstance(obj, type) and issubclass(obj, Head)):
        return f"{obj!r} is not a subclass of retrieval_lightning.head.Head"
    if obj.role not in ROLES:
        return f"{obj.__qualname__}.role={obj.role!r} is not one of {ROLES}"
    base, required = {
        "global": (GlobalHead, ("_build", "dim", "embed")),
        "local": (RerankHead, ("_build", "entry_kinds", "extract_entries", "score")),
        "verifier": (RerankHead, ("_build", "entry_kinds", "extract_entries", "score")),
        "sparsifier": (SparsifierHead, ("_build", "entry_kinds", "sparsify", "densify")),
    }[obj.role]
    if not issubclass(obj, base):
        return (f"{obj.__qualname__} has role {obj.role!r} but is not a subclass of "
                f"retrieval_lightning.head.{base.__name__}, through which the core reaches that role")
    for named in (LocalHead, VerifierHead):  # both reach the core as RerankHead: the role would win unseen
        if issubclass(obj, named) and obj.role != named.role:
            return (f"{obj.__qualname__} subclasses retrieval_lightning.head.{named.__name__} but declares role "
                    f"{obj.role!r}: drop the role attribute, or subclass RerankHead")
    missing = [name for name in required if getattr(obj, name) is getattr(base if name != "_build" else Head, name)]
    if missing:
        return f"{obj.__qualname__} (role {obj.role!r}) does not implement {', '.join(missing)}"
    return None


def _check_datamodule(obj: object) -> str | None:
    import lightning.pytorch as pl

    if not (isinstance(obj, type) and issubclass(obj, pl.LightningDataModule)):
        return f"{obj!r} is not a subclass of lightning.LightningDataModule"
    if not callable(getattr(obj, "eval_sets", None)):
        return f"{obj.__qualname__} has no eval_sets(stage) method"
    return None


HEADS = Registry(HEADS_GROUP, "head", "retrieval_lightning.head_plugins", _check_head)
DATAMODULES = Registry(
    DATAMODULES_GROUP, "datamodule", "retrieval_lightning.datamodule_plugins", _check_datamodule
)


def describe_plugins() -> list[dict[str, str]]:
    """Rows for ``retrieval-lightning plugins``: kind, name, role, distribution, version."""
    rows = []
    for registry in (HEADS, DATAMODULES):
        for name, entry in sorted(registry.entries().items()):
            try:
                obj = registry.get(name)
                role = getattr(obj, "role", "") if registry is HEADS else "data"
                status = "ok"
            except PluginError as exc:
                role, status = "?", f"error: {exc}"
            rows.append(
                {
                    "kind": registry.kind,
                    "name": name,
                    "role": role,
                    "distribution": entry.distribution,
                    "version": entry.version,
                    "target": entry.target,
                    "status": status,
                }
            )
    return rows
