"""A picture of each evaluation: queries with their top-k results, correct ones marked (for a
re-ranking model, each query's global and re-ranked results, one row above the other).

People judge a retrieval model by looking at what it returns; this callback saves a PNG per eval
set after every validation/test epoch (under ``<default_root_dir>/gallery/``) and sends it to W&B when a
``WandbLogger`` is attached. Borders: green = positive, red = negative, grey = junk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AbstractSet, Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.evaluation import SHORTLIST, EvalResult
from retrieval_lightning.thumbnail_grid import Tile, draw_rows

_COLOURS = {1: "#1a9850", 0: "#d73027", -1: "#808080"}
#: border of a picture's wrong (other-landmark) images
NEGATIVE_COLOUR = _COLOURS[0]


def weights_label(trainer: pl.Trainer) -> str:
    """What the evaluated weights are, for a picture's title and file name: the training step, or in
    ``test``/``validate --ckpt_path`` (where Lightning restores no step count) the checkpoint's name, or
    the ``model.init_from`` checkpoint's."""
    # `evaluate` loads its --ckpt_path itself (Lightning's trainer.ckpt_path is of fit/test only)
    ckpt_path = getattr(trainer, "ckpt_path", None) or getattr(trainer, "weights_path", None)
    if trainer.global_step == 0 and not getattr(trainer.state, "fn", None) == "fit":
        if ckpt_path:
            return f"ckpt {Path(ckpt_path).stem}"
        init_from = (getattr(getattr(trainer, "lightning_module", None), "hparams", None) or {}).get("init_from")
        if init_from:  # `test --model.init_from <ckpt>`: trained weights, not "step 0"
            return f"init_from {Path(str(init_from)).stem}"
    return f"step {trainer.global_step}"


def gallery_key(stage: str, eval_set: str) -> str:
    """The W&B key of a gallery: beside the metrics of the evaluation it draws (``evaluate`` logs ``test/...``)."""
    section = {"validate": "val", "evaluate": "test"}.get(stage, stage)
    return f"{section}/{eval_set}/gallery"


def metrics_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs metrics at (its count of batches that stepped, one behind ``global_step`` in a
    validation during ``fit``): a picture logged at it sits on its metrics' row."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def free_path(path: Path) -> Path:
    """``path``, or ``<stem>_2<suffix>``, ``_3``... when taken: an evaluation never overwrites an
    earlier one's picture (``finetune``'s baseline, another checkpoint tested in the same directory)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def gallery_rows(dataset, n_queries: int, topk: Tensor, relevance: Tensor, max_queries: int = 4, k: int = 5,
                 before: Tensor | None = None, before_relevance: Tensor | None = None) -> list[list[Tile]]:
    """Rows of :func:`draw_gallery`: a query, then its top ``k`` database images with relevance borders.

    With ``before`` (the global ranking of a re-ranked result, and its marks), each query gets the
    global row first, then the re-ranked row whose captions say where each image stood globally
    (``from #4``; ``from >#10`` past the global shortlist kept): what re-ranking changed is seen at a glance."""

    def row(r: int, label: str, order: Tensor, marks: Tensor, was: list[int] | None = None) -> list[Tile]:
        query = dataset[r]
        # an unreadable query's placeholder still ranks something, which its metrics do not count
        unreadable = "\nunreadable: scored 0" if query.get("unreadable") else ""
        tiles = [Tile(query["image"], f"query {r}{label}{unreadable}")]
        for c in range(min(k, order.shape[1])):
            db_index = int(order[r, c])
            caption = f"#{c + 1} db {db_index}"
            if was is not None:
                caption += f", from #{was.index(db_index) + 1}" if db_index in was else f", from >#{len(was)}"
            tiles.append(Tile(dataset[n_queries + db_index]["image"], caption, _COLOURS[int(marks[r, c])]))
        return tiles

    if before is None:
        return [row(r, "", topk, relevance) for r in range(min(max_queries, topk.shape[0]))]
    before_marks = before_relevance if before_relevance is not None else torch.zeros_like(before)  # unmarked: red
    rows = []
    for r in range(min(max_queries, topk.shape[0])):
        rows.append(row(r, ", global", before, before_marks))
        rows.append(row(r, ", re-ranked", topk, relevance, was=[int(i) for i in before[r]]))
    return rows


def draw_gallery(dataset, n_queries: int, topk: Tensor, relevance: Tensor, title: str, path: Path,
                 max_queries: int = 4, k: int = 5, before: EvalResult | None = None) -> Path:
    """Draw :func:`gallery_rows` (``before``: the global result of a re-ranked one) to ``path``."""
    rows = gallery_rows(dataset, n_queries, topk, relevance, max_queries, k,
                        None if before is None else before.topk, None if before is None else before.relevance)
    return draw_rows(rows, title, path)


def border_legend(protocol: str) -> str:
    """What a gallery's borders mean, under its title: revisitop's marks are the Medium setup's."""
    medium = " (revisitop's Medium: easy and hard correct, junk ignored)" if protocol == "revisitop" else ""
    return f"borders: green correct, red wrong, grey junk{medium}"


def _headline(metrics: Mapping[str, float], global_metrics: Mapping[str, float] | None = None) -> str:
    """The first three mAP values (or metrics), as ``global → re-ranked`` when both are given."""
    keys = [k for k in metrics if k.startswith("mAP")] or list(metrics)
    if global_metrics is None:
        return ", ".join(f"{k} {metrics[k]:.1f}" for k in keys[:3])
    return ", ".join(f"{k} {global_metrics[k]:.1f} → {metrics[k]:.1f}" for k in keys[:3] if k in global_metrics)


class RetrievalGallery(pl.Callback):
    """Save (and log to W&B) a query/top-k picture for every eval set after each evaluation."""

    def __init__(self, max_queries: int = 4, k: int = 5, output_dir: str | None = None) -> None:
        if not 1 <= k <= SHORTLIST:
            raise ValueError(f"RetrievalGallery.k must be in [1, {SHORTLIST}] (an evaluation keeps each query's "
                             f"top {SHORTLIST}), got {k}")
        if max_queries < 1:
            raise ValueError(f"RetrievalGallery.max_queries must be >= 1, got {max_queries}")
        self.max_queries = max_queries
        self.k = k
        self.output_dir = output_dir
        self.saved: list[Path] = []

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        results = getattr(pl_module, "last_eval", {})
        if not results or trainer.datamodule is None:
            return
        global_results = getattr(pl_module, "last_eval_global", {})
        self.draw(trainer, trainer.datamodule.eval_sets(stage), results, stage,
                  reranked={n for n, r in results.items() if r is not global_results.get(n, r)},
                  global_results=global_results)

    def draw(self, trainer: pl.Trainer, eval_sets: Iterable[EvalSet], results: Mapping[str, EvalResult], stage: str,
             reranked: AbstractSet[str] = frozenset(),
             global_results: Mapping[str, EvalResult] | None = None) -> list[Path]:
        """One picture per evaluated set, under ``<output_dir or default_root_dir>/gallery``, and to W&B
        (also for ``evaluate``, which scores stores outside Lightning's loops). A re-ranked set whose
        global result is in ``global_results`` shows both rankings of each query."""
        sets = {s.name: s for s in eval_sets}
        root = Path(self.output_dir or trainer.default_root_dir) / "gallery"
        drawn = []
        for name, result in results.items():
            if name not in sets:
                continue
            eval_set = sets[name]
            label = weights_label(trainer)
            path = free_path(root / f"{stage}_{name}_{label.replace(' ', '')}.png")
            before = (global_results or {}).get(name) if name in reranked else None
            headline = _headline(result.metrics, None if before is None else before.metrics)
            if name in reranked and before is None:
                headline = f"re-ranked, {headline}"
            title = f"{stage} {name} ({label}): {headline}\n{border_legend(eval_set.protocol)}"
            draw_gallery(eval_set.dataset, eval_set.n_queries, result.topk, result.relevance, title, path,
                         self.max_queries, self.k, before=before)
            drawn.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=gallery_key(stage, name), images=[os.fspath(path)], caption=[title],
                                     step=metrics_step(trainer))
        self.saved += drawn
        return drawn

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")
