"""Hard-negative mining from the current global descriptors, refreshed every epoch (or kept while unchanged).

Why: pair/triplet losses learn little from random negatives (almost all trivially different);
the informative ones are the other-landmark images the global model ranks nearest to the anchor
(Radenović et al.; CVNet's recipe, CVPR 2022). The global descriptors change while training, so the
table is rebuilt every ``every_n_epochs`` epochs, just before that epoch's batches are drawn, unless
nothing it depends on has changed (below).

Generic by design (the core never imports a datamodule): the datamodule exposes ``pair_miner``,
any object with

- ``pool(epoch) -> np.ndarray``: training-set positions to mine over; the sampler draws an epoch's
  anchors from the pool of the table that serves it (``mined_epoch``), so epochs between two
  minings (``every_n_epochs`` > 1) keep mined negatives when the pool is a subset;
- ``pool_dataset(positions) -> Dataset`` of ``{"image": (3,h,w) RGB float in [0,1], "index": i}``,
  ``i`` the row in ``positions``;
- ``labels`` (one per training position), ``table_width``, ``distinct_labels``;
- ``set_negatives(epoch, positions, neighbours)``, ``mined_epoch``;
- ``identity`` (optional): a string naming the training images (a digest of their paths), without which
  a table is not saved for a resumed run;
- ``request``: an attribute this callback sets to ``request(epoch)``, which the sampler calls just
  before it draws an epoch's groups. Mining then happens exactly when the batches of that epoch are
  composed, for the right epoch, also when a run resumes mid-training (Lightning creates the first
  epoch's iterator before ``on_train_epoch_start`` and restores the epoch after ``on_fit_start``).

Under DDP each rank embeds a strided share of the pool and, once the descriptors are all-gathered,
finds the nearest other-label images of a share of the rows; the shares are gathered, so every rank's
sampler draws from the same table, the one a single process would build.

A table is kept while nothing it depends on changes (the weights of the backbone and the global head,
the pool, the training images, the settings): with the frozen global model of CVNet's verifier and
sparsifier stages and the whole training set as the pool (``pool_size: null``), the set is embedded
once per run, not once per epoch. The table is also saved under a hash of all that
(``mining/table-<key>.npy``), so a run resumed after preemption loads it instead of embedding 1.5M
images again; a miner exposes ``identity`` (of its training images) for that.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.std import tqdm  # not tqdm.auto, see retrieval_lightning.progress

from retrieval_lightning.callbacks.gallery import NEGATIVE_COLOUR
from retrieval_lightning.errors import UsageError
from retrieval_lightning.progress import shows_progress
from retrieval_lightning.rank_zero import on_rank_zero, raise_if_any_failed
from retrieval_lightning.retrieval.gather import gather_dedupe
from retrieval_lightning.distributed import torch_all_gather_object
from retrieval_lightning.thumbnail_grid import Tile, draw_rows


def part_rows(n: int, chunk: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Rows of an ``n``-row table that part ``rank`` of ``world_size`` computes: every ``world_size``-th
    chunk of ``chunk`` rows. The chunks are those of one process, so each row is computed from the same
    matrix product (bitwise the same table) whatever the number of parts."""
    starts = range(rank * chunk, n, world_size * chunk)
    if not starts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(start, min(n, start + chunk)) for start in starts])


#: columns of the similarity matrix computed at once: the search holds ``chunk`` x this many similarities
#: and one block of descriptors on its device, whatever the pool's size
COLUMN_BLOCK = 65536
#: descriptors up to this size move to the device once; larger ones (1.5M x 2048 fp32 = 12 GB) stay on
#: the host and travel a column block at a time. Either way each block's product is the same.
RESIDENT_BYTES = 2 << 30


def nearest_other_label(desc: Tensor, labels: Tensor, k: int, distinct: bool = True,
                        chunk: int = 1024, device: torch.device | str | None = None,
                        progress: bool = False, part: tuple[int, int] = (0, 1)) -> Tensor:
    """For every row, the ``k`` rows of other labels with the largest inner product, nearest first.

    ``distinct``: at most one row per label (the nearest of that label). Returns (N, k) int64
    row indices, ``-1`` where fewer than ``k`` exist. Ties are broken by the lower row index.
    ``device``: where the similarities are computed (the model's GPU makes a 100k pool take seconds);
    it holds ``chunk`` x :data:`COLUMN_BLOCK` similarities at a time, and the descriptors only when they
    fit in :data:`RESIDENT_BYTES`. ``progress``: a bar over the row chunks. ``part=(rank, world_size)``:
    compute only the rows of :func:`part_rows` (the others stay ``-1``), so ranks share the work.
    """
    n = desc.shape[0]
    labels = labels.reshape(-1).long()
    out = torch.full((n, k), -1, dtype=torch.long)
    if n == 0 or k == 0:
        return out
    device = torch.device(device) if device is not None else desc.device
    desc = desc.float()
    if desc.numel() * desc.element_size() <= RESIDENT_BYTES:
        desc = desc.to(device)
    labels_dev = labels.to(device)
    width = min(n, k * 4 + 16) if distinct else min(n, k)
    starts = range(part[0] * chunk, n, part[1] * chunk)
    for start in tqdm(starts, desc="hard negatives: nearest other labels", disable=not progress, leave=False):
        rows = slice(start, min(n, start + chunk))
        queries, query_labels = desc[rows].to(device), labels_dev[rows]
        pending, depth = list(range(rows.stop - rows.start)), width
        while pending:  # rare after the first pass: rows that must look further (a crowded label)
            pending = _pick_rows(out, start, pending, queries, query_labels, desc, labels_dev, labels, k, distinct,
                                 depth)
            depth = min(n, depth * WIDEN)
    return out


#: how much further each new pass of :func:`nearest_other_label` looks for the rows still short of k labels
WIDEN = 16
#: similarities one re-search pass holds (rows x depth): rows of a crowded label are searched together, a few at
#: a time when they must look through the whole pool (one row at a time took 0.46 s per row at 1.3M)
WIDE_SEARCH_ELEMENTS = 1 << 24


def _pick_rows(out: Tensor, start: int, rows: list[int], queries: Tensor, query_labels: Tensor, desc: Tensor,
               labels_dev: Tensor, labels: Tensor, k: int, distinct: bool, depth: int) -> list[int]:
    """Fill ``out`` for the chunk rows ``rows`` from their ``depth`` nearest other-label columns; return those
    that need to look further (distinct labels short of ``k`` while columns remain)."""
    n = desc.shape[0]
    short = []
    step = max(1, WIDE_SEARCH_ELEMENTS // depth)  # the first pass (depth 4k + 16): the whole chunk at once
    for first in range(0, len(rows), step):
        batch = rows[first:first + step]
        chosen = torch.tensor(batch, device=queries.device)
        top_vals, top_idx = _nearest_columns(queries[chosen], query_labels[chosen], desc, labels_dev, depth)
        for r, vals, idx in zip(batch, top_vals, top_idx):
            picked = _pick(vals, idx, labels, k, distinct)
            if distinct and len(picked) < k and depth < n and vals[-1] != float("-inf"):
                short.append(r)
            elif picked:
                out[start + r, : len(picked)] = torch.tensor(picked)
    return short


def _nearest_columns(queries: Tensor, query_labels: Tensor, desc: Tensor, labels: Tensor, width: int
                     ) -> tuple[Tensor, Tensor]:
    """The ``width`` columns of other labels with the largest similarity to each query row, nearest first,
    ties by the lower column (on the CPU): the top of each :data:`COLUMN_BLOCK` of columns, then merged.
    Other-label columns that run out are ``-inf``."""
    found_vals, found_idx = [], []
    for first in range(0, desc.shape[0], COLUMN_BLOCK):
        block = desc[first:first + COLUMN_BLOCK].to(queries.device)
        sims = queries @ block.T
        sims[query_labels[:, None] == labels[None, first:first + block.shape[0]]] = float("-inf")
        vals, idx = _topk_stable(sims, min(width, block.shape[0]))
        found_vals.append(vals)
        found_idx.append(idx + first)
    vals, idx = torch.cat(found_vals, dim=1), torch.cat(found_idx, dim=1)
    if len(found_vals) > 1:  # blocks in column order, each sorted: a stable sort keeps ties by the lower column
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :width]
        vals, idx = vals.gather(1, order), idx.gather(1, order)
    return vals, idx


def _pick(vals: Tensor, idx: Tensor, labels: Tensor, k: int, distinct: bool) -> list[int]:
    """The first ``k`` columns of ``idx`` (nearest first) that are not ``-inf``, one per label if ``distinct``."""
    picked: list[int] = []
    seen: set[int] = set()
    for v, j in zip(vals.tolist(), idx.tolist()):
        if v == float("-inf") or len(picked) == k:
            break
        lab = int(labels[j])
        if distinct and lab in seen:
            continue
        seen.add(lab)
        picked.append(j)
    return picked


def _topk_stable(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k by value, equal values ordered by lower index: ``topk``, then a stable re-sort of the k.

    ``topk`` picks arbitrarily among values tied at the k-th place (and differently on CPU and GPU),
    so a row whose k-th value has ties left outside the k is sorted whole (stable) instead.
    """
    _, idx = torch.topk(sims, k, dim=1)
    idx = idx.sort(dim=1).values
    vals = sims.gather(1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    if k < sims.shape[1]:
        last = vals[:, -1:]
        spill = ((sims == last).sum(1) > (vals == last).sum(1)) & (last[:, 0] != float("-inf"))
        for r in spill.nonzero().flatten().tolist():
            full = torch.sort(sims[r], descending=True, stable=True)
            vals[r], idx[r] = full.values[:k], full.indices[:k]
    return vals.cpu(), idx.cpu()


def _on_every_rank(flag: bool, gather: Callable[[Any], list[Any]] | None) -> bool:
    """Whether ``flag`` holds on every rank (``gather``: ``all_gather_object``, ``None`` without a process group),
    so all ranks take the same branch and the same collectives after it."""
    return all(gather(flag)) if gather is not None else flag


class KeptTable(NamedTuple):
    """The last mined table (``neighbours``: training positions) and what it is a function of (``key``)."""

    key: str | None
    neighbours: np.ndarray
    epoch: int


def as_list(items: list) -> list:
    """The pool loader's collate: the items as they are (their images differ in size). A module-level function,
    not a lambda: loader workers started by 'spawn' (macOS, Windows) receive it pickled."""
    return items


class HardNegativeMining(pl.Callback):
    """Rebuild the datamodule's hard-negative table from the model's global descriptors (or keep the last
    one while the global model's weights and the pool are unchanged).

    Args:
        every_n_epochs: mine at epochs ``first_epoch``, ``first_epoch + every_n_epochs``, ...
        first_epoch: epochs before it use random negatives.
        multiscale: embed with the module's multi-scale ``embed_batch`` (else one scale, cheaper).
        batch_size, num_workers: of the loader over the pool images.
        chunk: rows of the similarity matrix computed at once.
        picture_anchors, picture_negatives: after each mining, rank 0 draws this many anchors (spread
            over the pool) with their hardest negatives, captioned with label and cosine, to
            ``<output_dir or default_root_dir>/mining/epoch<E>.png`` and W&B (0 anchors: no picture).
            Looking is the quickest check that the negatives are hard but truly other landmarks.
    """

    def __init__(self, every_n_epochs: int = 1, first_epoch: int = 0, multiscale: bool = False,
                 batch_size: int = 16, num_workers: int = 0, chunk: int = 1024, picture_anchors: int = 4,
                 picture_negatives: int = 5, output_dir: str | None = None) -> None:
        if every_n_epochs < 1 or first_epoch < 0:
            raise ValueError(f"HardNegativeMining needs every_n_epochs >= 1 and first_epoch >= 0, got every_n_epochs="
                             f"{every_n_epochs!r} and first_epoch={first_epoch!r}")
        self.every_n_epochs, self.first_epoch = int(every_n_epochs), int(first_epoch)
        self.multiscale = bool(multiscale)
        self.batch_size, self.num_workers, self.chunk = int(batch_size), int(num_workers), int(chunk)
        self.picture_anchors, self.picture_negatives = int(picture_anchors), int(picture_negatives)
        self.output_dir = output_dir
        self.pictures: list[Path] = []
        self._kept: KeptTable | None = None

    def table_epoch(self, epoch: int) -> int | None:
        """The mining epoch whose table serves ``epoch``: the latest due one (``None`` before ``first_epoch``)."""
        if epoch < self.first_epoch:
            return None
        return self.first_epoch + (epoch - self.first_epoch) // self.every_n_epochs * self.every_n_epochs

    @staticmethod
    def _miner(trainer: pl.Trainer) -> Any:
        miner = getattr(trainer.datamodule, "pair_miner", None) if trainer.datamodule is not None else None
        if miner is None:
            raise UsageError("HardNegativeMining needs a datamodule exposing `pair_miner` (with sampling: pairs), "
                             f"{type(trainer.datamodule).__name__} has none; take it out of trainer.callbacks for "
                             "other sampling")
        return miner

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        miner = self._miner(trainer)
        miner.request = lambda epoch: self.mine_if_due(trainer, pl_module, miner, epoch)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        miner = getattr(trainer.datamodule, "pair_miner", None) if trainer.datamodule is not None else None
        if miner is not None:
            miner.request = None  # do not keep the trainer alive through the datamodule
        self._kept = None

    def mine_if_due(self, trainer: pl.Trainer, pl_module: Any, miner: Any, epoch: int) -> None:
        """Install the table that serves ``epoch``: mined now when due, or, in a run resumed between two
        minings, the last due epoch's mined again (the same table when the global model is frozen)."""
        serving = self.table_epoch(epoch)
        if serving is not None and miner.mined_epoch != serving:
            self.mine(trainer, pl_module, miner, serving)

    @torch.no_grad()
    def embed_pool(self, pl_module: Any, dataset: Any, rank: int = 0, world_size: int = 1,
                   progress: bool = False, precision: Callable[[], ContextManager] | None = None
                   ) -> tuple[Tensor, Tensor]:
        """This rank's share of the pool: ``(rows, descriptors)``; ``progress``: a bar over its batches.
        ``precision``: the context of the trainer's forward passes (bf16 autocast under ``bf16-mixed``),
        so the pool is embedded as validation embeds (a 1.5M-image pool takes its time on a GPU in fp32)."""
        share = Subset(dataset, list(range(rank, len(dataset), world_size)))
        # its own generator: a loader iterator draws a base seed, and from the global generator that draw
        # would shift every later global draw (a sparsifier's Gumbel noise) between a run and its resume,
        # which mines again after the random states are restored
        loader = DataLoader(share, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=as_list, generator=torch.Generator().manual_seed(0))
        rows, descs = [], []
        for items in tqdm(loader, desc="hard negatives: embedding the pool", disable=not progress, leave=False):
            images = [item["image"].to(pl_module.device) for item in items]
            rows.extend(int(item["index"]) for item in items)
            with precision() if precision is not None else nullcontext():
                descs.append(self._embed(pl_module, images).float().cpu())
        dim = pl_module.global_head.dim
        return torch.tensor(rows, dtype=torch.long), (torch.cat(descs) if descs else torch.zeros(0, dim))

    def _embed(self, pl_module: Any, images: list[Tensor]) -> Tensor:
        if self.multiscale:
            return pl_module.embed_batch(images)
        head = pl_module.global_head
        out: list[Tensor | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():  # same-size images in one backbone call
            desc = head.embed(pl_module.backbone(torch.stack([images[i] for i in idx])))
            for i, d in zip(idx, F.normalize(desc.float(), dim=-1)):
                out[i] = d
        return torch.stack(out)  # type: ignore[arg-type]

    def table_key(self, pl_module: Any, miner: Any, positions: np.ndarray) -> str | None:
        """What a mined table is a function of: the embedding's weights (every tensor of the backbone and the
        global head), the pool and its labels, the training images (the miner's ``identity``, if it has one)
        and the mining settings. ``None`` (never reused) when the module's backbone or global head is not a
        ``torch.nn.Module`` whose tensors say it all."""
        modules = (getattr(pl_module, "backbone", None), getattr(pl_module, "global_head", None))
        if not all(isinstance(module, torch.nn.Module) for module in modules):
            return None
        digest = hashlib.blake2b(digest_size=20)
        scales = getattr(pl_module, "eval_scales", None) if self.multiscale else None
        settings = (getattr(miner, "identity", None), miner.table_width, miner.distinct_labels,
                    getattr(miner, "mining_max_side", None), self.multiscale, scales)
        digest.update(repr(settings).encode())
        digest.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(np.asarray(miner.labels)[positions], dtype=np.int64).tobytes())
        for module in modules:
            for name, tensor in module.state_dict().items():
                digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()

    def mine(self, trainer: pl.Trainer, pl_module: Any, miner: Any, epoch: int) -> None:
        """Install ``epoch``'s table: the kept one when nothing it depends on changed (a frozen global model
        over the same pool: CVNet's later stages mining the whole training set embed it once), else mined:
        every rank embeds a strided share of the pool, and finds the nearest other-label images of a share of
        its rows; both are gathered, so every rank installs the same table."""
        positions = np.asarray(miner.pool(epoch), dtype=np.int64)
        gather = torch_all_gather_object()
        key, failure = None, None
        try:
            key = self.table_key(pl_module, miner, positions)
        except Exception as err:  # raised below on every rank, not left to the others' next collective
            failure = err
        raise_if_any_failed(failure, gather, f"hard-negative mining, epoch {epoch}")
        kept = self._kept
        keep = kept is not None and key is not None and kept.key == key
        if _on_every_rank(keep, gather):  # kept only where every rank keeps its own
            miner.set_negatives(epoch, positions, kept.neighbours)
            rank_zero_info(f"hard-negative mining, epoch {epoch}: the table of epoch {kept.epoch} kept "
                           "(the same global model and pool)")
            return
        self._kept = None
        saved = self.saved_table(trainer, miner, key)
        loaded = self._load_table(saved, miner, positions) if saved is not None and saved.exists() else None
        if _on_every_rank(loaded is not None, gather):
            miner.set_negatives(epoch, positions, loaded)
            self._kept = KeptTable(key, loaded, int(epoch))
            rank_zero_info(f"hard-negative mining, epoch {epoch}: the table of an earlier run of the same global "
                           f"model and pool loaded ({saved})")
            return
        was_training = pl_module.training
        pl_module.eval()
        rows, desc, failure = torch.zeros(0, dtype=torch.long), torch.zeros(0), None
        try:
            plugin = getattr(trainer, "precision_plugin", None)
            rows, desc = self.embed_pool(pl_module, miner.pool_dataset(positions), trainer.global_rank,
                                         trainer.world_size, shows_progress(trainer),
                                         getattr(plugin, "forward_context", None))
        except Exception as err:  # an unreadable image of one rank's share stops every rank, not only its own
            failure = err
        finally:
            pl_module.train(was_training)
        raise_if_any_failed(failure, gather, f"hard-negative mining, epoch {epoch}: embedding the pool")
        rows, gathered = gather_dedupe(pl_module, rows, spill=getattr(pl_module, "spill", None), desc=desc)
        if rows.numel() != positions.size:
            raise RuntimeError(f"mining gathered {rows.numel()} descriptors for a pool of {positions.size}")
        width = int(miner.table_width)
        own = part_rows(positions.size, self.chunk, trainer.global_rank, trainer.world_size)
        share, failure = torch.zeros(0, width, dtype=torch.long), None
        try:
            labels = torch.as_tensor(np.asarray(miner.labels)[positions])
            share = nearest_other_label(gathered["desc"], labels, width, bool(miner.distinct_labels), self.chunk,
                                        pl_module.device, shows_progress(trainer),
                                        part=(trainer.global_rank, trainer.world_size))[own]
        except Exception as err:  # a rank's failure (out of memory) stops every rank, not only its own
            failure = err
        raise_if_any_failed(failure, gather, f"hard-negative mining, epoch {epoch}")
        rows, tables = gather_dedupe(pl_module, own, table=share)
        if rows.numel() != positions.size:
            raise RuntimeError(f"mining gathered {rows.numel()} table rows for a pool of {positions.size}")
        table = tables["table"].numpy()
        if self.picture_anchors > 0:  # the other ranks wait: a failure there (a full disk) stops them too
            on_rank_zero(lambda: self.draw_mined(trainer, miner, epoch, positions, table, gathered["desc"]),
                         trainer.global_rank == 0, lambda value: trainer.strategy.broadcast(value, src=0),
                         f"hard-negative mining picture, epoch {epoch}")
        neighbours = np.where(table >= 0, positions[np.maximum(table, 0)], -1)
        miner.set_negatives(epoch, positions, neighbours)
        self._kept = KeptTable(key, neighbours, int(epoch))
        if saved is not None and trainer.global_rank == 0:
            self._save_table(saved, neighbours)
        rank_zero_info(f"hard-negative mining, epoch {epoch}: {positions.size} images, "
                       f"{int((neighbours >= 0).sum())} negatives")

    def saved_table(self, trainer: Any, miner: Any, key: str | None) -> Path | None:
        """Where a table is saved for a resumed run: ``<output_dir or default_root_dir>/mining/table-<key>.npy``.
        ``None`` (not saved) without a key, or for a miner without an ``identity`` of its training images, since
        a table must not outlive its images."""
        root = self.output_dir or getattr(trainer, "default_root_dir", None)
        if key is None or root is None or getattr(miner, "identity", None) is None:
            return None
        return Path(root) / "mining" / f"table-{key}.npy"

    @staticmethod
    def _load_table(path: Path, miner: Any, positions: np.ndarray) -> np.ndarray | None:
        """The table saved at ``path`` if it is whole and fits this pool, else ``None`` (a warning: mined again)."""
        try:
            table = np.load(path, allow_pickle=False)
            shape = (positions.size, int(miner.table_width))
            if table.dtype != np.int64 or table.shape != shape:
                raise ValueError(f"a {table.dtype} table of shape {table.shape}, expected int64 {shape}")
            if table.size and (table.min() < -1 or table.max() >= len(miner.labels)):
                raise ValueError(f"entries outside the {len(miner.labels)} training images")
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, mining again replaces it
            warnings.warn(f"hard-negative mining: the saved table {path} cannot be used ({err}); mining again")
            return None
        return table

    @staticmethod
    def _save_table(path: Path, table: np.ndarray) -> None:
        """Save ``table`` for a resumed run (under a temporary name, then renamed: a file that exists is whole)
        and remove the tables of other keys (a global model that trains leaves one per mining). A failure
        (a full disk) costs a resumed run its mining, not this run: a warning."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, table, allow_pickle=False)
            os.replace(tmp, path)
            for other in path.parent.glob("table-*.npy"):
                if other != path:
                    other.unlink(missing_ok=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"hard-negative mining: the table could not be saved to {path} ({err}); a resumed run "
                          "will mine it again")

    def draw_mined(self, trainer: pl.Trainer, miner: Any, epoch: int, positions: np.ndarray, table: np.ndarray,
                   desc: Tensor) -> Path:
        """Anchors spread over the pool, each followed by its mined negatives (pool rows in ``table``)."""
        examples = mined_examples(table, desc, self.picture_anchors, self.picture_negatives)
        needed = sorted({r for a, negs in examples for r in (a, *(j for j, _ in negs))})
        images = miner.pool_dataset(positions[needed])
        image_of = {row: images[i]["image"] for i, row in enumerate(needed)}
        labels = np.asarray(miner.labels)[positions]
        rows = [[Tile(image_of[a], f"anchor {positions[a]}, label {labels[a]}")]
                + [Tile(image_of[j], f"#{n + 1} label {labels[j]}, cos {cos:.2f}", NEGATIVE_COLOUR)
                   for n, (j, cos) in enumerate(negs)]
                for a, negs in examples]
        root = Path(self.output_dir or trainer.default_root_dir) / "mining"
        path = draw_rows(rows, f"hard negatives mined for epoch {epoch} (pool of {len(positions)})",
                         root / f"epoch{epoch:03d}.png")
        self.pictures.append(path)
        for logger in getattr(trainer, "loggers", []):
            if isinstance(logger, WandbLogger):
                logger.log_image(key="train/hard_negatives", images=[os.fspath(path)], step=trainer.global_step,
                                 caption=[f"hard negatives mined for epoch {epoch} (pool of {len(positions)})"])
        return path


def mined_examples(table: np.ndarray, desc: Tensor, anchors: int, negatives: int
                   ) -> list[tuple[int, list[tuple[int, float]]]]:
    """``anchors`` pool rows spread evenly over the pool, each with its first ``negatives`` mined rows and
    their cosine to it: ``[(anchor, [(negative, cos), ...]), ...]``."""
    n = table.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(anchors, n)).round().astype(np.int64)) if n and anchors else []
    return [(int(a), [(int(j), float(desc[a].float() @ desc[j].float())) for j in table[a, :negatives] if j >= 0])
            for a in picks]
