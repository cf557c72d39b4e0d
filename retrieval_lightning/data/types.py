"""Sample and ground-truth types: what datamodules and the core agree on (the README's "Writing a datamodule
plugin" lists the attributes too).

Images travel as float32 RGB tensors in [0, 1] of shape (3, H, W); normalisation belongs to
the backbone (ImageNet statistics, BGR for CVNet weights), so datamodules stay model-agnostic.

Training batches are dicts ``{"image": (B,3,H,W) float, "label": (B,) int in 0 .. num_classes - 1, "index": (B,)}``
(:class:`TrainSample` per item); a datamodule that mines pair batches adds ``"pairs"``: (M, 3) rows ``(i, j, same)``
of batch positions. Evaluation items are dicts ``{"image": (3,H,W) float, "index": int}`` where ``index`` is the
item's position in its :class:`EvalSet` dataset, so results gathered from DDP ranks (whose sampler pads with
repeats) can be de-duplicated; optional ``"resize_factor"`` (the image's (height, width) over its original's:
local heads measure pixel distances in the original) and ``"unreadable"`` (a placeholder of an image skipped under
``on_error: skip``). :func:`retrieval_lightning.data.loaders.eval_loaders` batches them as the core reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, TypedDict

from torch import Tensor
from torch.utils.data import Dataset


class TrainSample(TypedDict):
    """One training item: an image, its class (0 .. num_classes - 1) and its position in the dataset."""

    image: Tensor
    label: int
    index: int


@dataclass(frozen=True)
class ImageResize:
    """How an eval set's whole images are sized for the model (DELG's ``ResizeImage``): the long side
    capped at ``max_side`` (``None``: full size), or brought to it with ``upscale``; bilinear with
    antialiasing. ``extract`` records it beside the features, so ``search`` sizes a new query as the
    database was sized."""

    max_side: int | None
    upscale: bool = False

    def __post_init__(self) -> None:
        if self.max_side is not None and (isinstance(self.max_side, bool) or not isinstance(self.max_side, int)
                                          or self.max_side < 1):  # 0 gave 1x1 images, < 0 a torch assert
            raise ValueError(f"max_side must be a positive number of pixels or None (full size), got {self.max_side!r}")

    def factor(self, height: int, width: int) -> float:
        """The resize factor of a ``height`` x ``width`` image."""
        long_side = max(height, width)
        if self.max_side is None or long_side == self.max_side:
            return 1.0
        return self.max_side / long_side if (long_side > self.max_side or self.upscale) else 1.0


class RevisitopQuery(TypedDict, total=False):
    """Ground truth of one query in the revisitop convention (0-based database indices)."""

    bbx: Sequence[float]
    easy: Sequence[int]
    hard: Sequence[int]
    junk: Sequence[int]


@dataclass
class EvalSet:
    """One retrieval benchmark as one dataset: the queries first, then the database.

    ``protocol`` names a metric protocol of :mod:`retrieval_lightning.evaluation`
    (``"revisitop"``, ``"gldv2_retrieval"``, ``"gldv2_recognition"``) and ``ground_truth`` is
    what that protocol takes:

    - ``revisitop``: list (one per query) of :class:`RevisitopQuery`.
    - ``gldv2_retrieval``: ``{"solution": {query_id: [index_ids]}, "query_ids": [...],
      "db_ids": [...]}`` with ids in dataset order.
    - ``gldv2_recognition``: ``{"solution": {query_id: [landmark ids]}, "query_ids": [...],
      "db_labels": [landmark id per database item]}``.
    """

    name: str
    dataset: Dataset
    n_queries: int
    protocol: str
    ground_truth: Any
    #: names of the items in dataset order (queries then database), for reports and pictures
    image_ids: list[str] = field(default_factory=list)
    #: how whole images are sized (``None``: not declared; ``search`` then needs ``--max-side``)
    image_resize: ImageResize | None = None

    def __post_init__(self) -> None:
        total = len(self.dataset)  # type: ignore[arg-type]
        if not 0 < self.n_queries < total:
            raise ValueError(
                f"EvalSet {self.name!r}: n_queries={self.n_queries} must be in (0, {total}) "
                "(the dataset holds queries then database)"
            )

    @property
    def n_database(self) -> int:
        return len(self.dataset) - self.n_queries  # type: ignore[arg-type]
