"""Reusable layers: pooling, margin-based classifiers, and resizing an image to an evaluation scale."""

from retrieval_lightning.layers.gem import GeM
from retrieval_lightning.layers.margins import ArcFaceMargin, CosineClassifier, CurricularFaceMargin, build_margin

__all__ = ["GeM", "ArcFaceMargin", "CosineClassifier", "CurricularFaceMargin", "build_margin"]
