"""Registered heads by entry-point name: ``retrieval_lightning.head_plugins.<name>``.

Attribute access goes through the registry (imports the plugin on first use), so a config's
``class_path: <name>`` and a checkpoint's recorded class path both resolve to the plugin.
An unknown name raises :class:`~retrieval_lightning.registry.UnknownPluginError`, an
``AttributeError``, so ``hasattr`` works; a declared plugin that fails to import still raises
:class:`~retrieval_lightning.registry.PluginError` (a broken install must not look like a missing name).
"""

from __future__ import annotations

from retrieval_lightning.registry import HEADS


def __getattr__(name: str) -> type:
    if name.startswith("_"):
        raise AttributeError(name)
    return HEADS.alias(name)


def __dir__() -> list[str]:
    return HEADS.names()
