"""Registered datamodules by entry-point name: ``retrieval_lightning.datamodule_plugins.<name>``, imported on first
use (:meth:`~retrieval_lightning.registry.Registry.module_hooks`)."""

from __future__ import annotations

from retrieval_lightning.registry import DATAMODULES

__getattr__, __dir__ = DATAMODULES.module_hooks()
