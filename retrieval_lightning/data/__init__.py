"""Data contracts shared by the core and every datamodule plugin."""

from retrieval_lightning.data.types import EvalSet, RevisitopQuery, TrainSample

__all__ = ["EvalSet", "RevisitopQuery", "TrainSample"]
