"""Registered heads by entry-point name: ``retrieval_lightning.head_plugins.<name>``, imported on first
use (:meth:`~retrieval_lightning.registry.Registry.module_hooks`)."""

from __future__ import annotations

from retrieval_lightning.registry import HEADS

__getattr__, __dir__ = HEADS.module_hooks()
