"""Data contracts shared by the core and every datamodule plugin."""

from retrieval_lightning.data.types import EvalSet, ImageResize, RevisitopQuery, TrainSample

__all__ = ["EvalSet", "ImageResize", "RevisitopQuery", "TrainSample"]
