"""Callbacks: resolved config to W&B, and pictures of retrieval results."""

from retrieval_lightning.callbacks.config import SaveConfigToLoggers
from retrieval_lightning.callbacks.gallery import RetrievalGallery
from retrieval_lightning.callbacks.metrics_json import MetricsToJson

__all__ = ["MetricsToJson", "RetrievalGallery", "SaveConfigToLoggers"]
