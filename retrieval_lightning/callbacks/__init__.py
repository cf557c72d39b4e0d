"""Callbacks: resolved config to W&B, pictures of retrieval results, metrics to JSON, resume state,
preemption checkpoints."""

from retrieval_lightning.callbacks.config import SaveConfigToLoggers
from retrieval_lightning.callbacks.gallery import RetrievalGallery
from retrieval_lightning.callbacks.metrics_json import MetricsToJson
from retrieval_lightning.callbacks.preemption import PreemptionCheckpoint
from retrieval_lightning.callbacks.resume import ResumeState

__all__ = ["MetricsToJson", "PreemptionCheckpoint", "ResumeState", "RetrievalGallery", "SaveConfigToLoggers"]
