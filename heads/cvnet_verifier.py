"""CVNet's correlation verifier (Lee et al., CVPR 2022) as a re-ranking head of role ``verifier``.

It reads conv4 of a frozen backbone (CVNet takes it before the last block's final ReLU: build the
backbone with ``pre_activation=("conv4",)``), projects a 3-level pyramid (area scales 0.25, 0.5,
1; one 3x3 conv per level), correlates query and database levels (9 cosine maps, clamped at 0,
resized to the full 4D size) and classifies the pair with centre-pivot 4D convolutions. The score
is the probability of "same instance".

Stored per image (:meth:`entry_kinds`): the three projected levels, **L2-normalised per location**,
as ``(h_i*w_i, P)`` float16 rows (``level0``..``level2``) plus their ``(h, w)`` (``level{i}_hw``).
A row of zeros is a dropped location: it contributes nothing (a sparsifier that does not fill the
dropped locations, ``fill_sigma: 0``, relies on this).
Scoring builds only the correlation entries the first strided 4D convolution reads
(:mod:`heads._cvnet.fast`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads._cvnet.fast import SCALES, LevelSet, level_sizes, pair_logits_fast, prepare_levels, resize
from heads._cvnet.network import CorrelationLearner
from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import EntryKind, FeatureFn, PairExplanation, VerifierHead


SCORE_DTYPES = ("auto", "float32", "bfloat16")
PROJECTIONS = ("learned", "identity")
#: correspondences :meth:`CVNetVerifierHead.explain` returns (the strongest mutual nearest neighbours)
EXPLAIN_MATCHES = 40
#: largest 4D correlation scored (query cells x candidate cells at scale 1): 2048 x 1536 px images
#: (128 x 96 cells at stride 16) are within it; phone photos at full size (4032 x 3024: 8.5x more)
#: would need tens of GB for the 4D network, and fail deep inside it or take the machine's memory.
MAX_PAIR_CELLS = 2**28


def check_pair_size(query_hw: tuple[int, ...], candidate_hw: tuple[int, ...]) -> None:
    """Refuse, in one line naming the sizes, a pair whose 4D correlation exceeds :data:`MAX_PAIR_CELLS`."""
    cells = query_hw[0] * query_hw[1] * candidate_hw[0] * candidate_hw[1]
    if cells > MAX_PAIR_CELLS:
        block1_gb = cells * 4 / 2**30  # 16 channels x (cells / 2^4: half resolution on four axes) x 4 B
        raise UsageError(
            f"cvnet_verifier: a {query_hw[0]}x{query_hw[1]}-cell query against a "
            f"{candidate_hw[0]}x{candidate_hw[1]}-cell candidate is a 4D correlation of {cells:.3g} cells "
            f"(at most {MAX_PAIR_CELLS:.3g}; the network's first block alone would hold {block1_gb:.0f} GB): "
            "score images of at most about 2048 px on the long side (CVNet's tester uses ROxford's <= 1024 px "
            "images): --data.init_args.max_side 1024 in test/extract, --max-side 1024 in match"
        )


def pair_statistics(logits: Tensor, same: Tensor) -> dict[str, Tensor]:
    """What to watch while a verifier trains: the accuracy of its same/different call, and its mean
    P(same) on positive and on negative pairs (the gap between the two is what re-ranking uses)."""
    p_same = logits.float().softmax(dim=1)[:, 1]
    out = {"pair_accuracy": ((p_same > 0.5).long() == same).float().mean()}
    for name, selected in (("p_same_positive", same == 1), ("p_same_negative", same == 0)):
        if bool(selected.any()):
            out[name] = p_same[selected].mean()
    return out


class CVNetVerifierHead(VerifierHead):
    """The CVNet re-ranking model on one backbone stage.

    Args:
        stage: backbone stage read (``conv4``; pre-activation is the backbone's option).
        width: projection width P of every pyramid level (256 in CVNet; small for CPU training).
        batch_size: candidates scored together (memory grows linearly: about 0.2 GB per pair at
            768x1024 with R50).
        max_pairs: in-batch training pairs per step (half positive, half negative when possible);
            unread with pair batches (``sampling: pairs``, every shipped recipe), which bring their own pairs.
        entry_dtype: dtype of stored levels (``float16`` on disk; ``float32`` for exact checks).
        score_dtype: arithmetic of :meth:`score`: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere),
            ``float32`` everywhere (the official tester's numbers), or ``bfloat16`` everywhere.
        border: cells within this many of a projected level's edge are zeroed, in training and in
            the stored entries, so they correlate with nothing (0: the official model). Edge cells
            carry the zero padding of the backbone and the projection, which looks alike in every
            image; on a 14 x 14 map they are a quarter of the cells (on R50's 48 x 64, 7 %).
        projection: ``learned`` (the official model): a trained 3x3 convolution per pyramid level, to
            ``width`` channels. ``identity``: none; the levels correlate the stage's own channels (``width``
            becomes the stage's channel count) and only the 4D network learns. With a few hundred
            training images a learned projection learns their look, not correspondence; the backbone's
            own feature cosine is what ``experiments/cvnet_demo.yaml`` correlates (README).
    """

    stages = ("conv4",)
    #: how pairs are scored, not what is stored: a store stays valid when they change
    scoring_only = ("batch_size", "max_pairs", "score_dtype")

    def __init__(
        self,
        stage: str = "conv4",
        width: int = 256,
        batch_size: int = 4,
        max_pairs: int = 16,
        entry_dtype: str = "float16",
        score_dtype: str = "auto",
        border: int = 0,
        projection: str = "learned",
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.projection = projection
        if border < 0:
            raise ValueError(f"border must be >= 0, got {border}")
        self.border = int(border)
        if entry_dtype not in ("float16", "float32"):  # numpy, and so the stores, have no bfloat16
            raise ValueError(f"entry_dtype must be float16 or float32 (what a store holds), got {entry_dtype!r}")
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
        self.score_dtype = score_dtype
        self.stage = stage
        self.stages = (stage,)
        if projection != "identity" and width < 1:
            raise ValueError(f"width must be >= 1 (the projection's channels), got {width}")
        if batch_size < 1:  # a negative one scored nothing and returned uninitialised scores
            raise ValueError(f"batch_size must be >= 1 (database images scored together), got {batch_size}")
        if max_pairs < 2:  # one positive and one negative at least; smaller values were overridden
            raise ValueError(f"max_pairs must be >= 2 (in-batch pairs: half positive, half negative), got {max_pairs}")
        self.width = int(width)
        self.batch_size = int(batch_size)
        self.max_pairs = int(max_pairs)
        self.entry_dtype = entry_dtype
        #: entries also hold each location's norm before normalisation (``level<i>_norm``): set by a
        #: sparsifier that selects locations by it (stored rows are unit vectors, whose norms say nothing)
        self.store_norms = False

    def _build(self, stage_channels: dict[str, int], num_classes: int) -> None:
        channels = stage_channels[self.stage]
        if self.projection == "identity":
            self.width = channels
            self.projections = nn.ModuleList(nn.Identity() for _ in SCALES)
        else:
            self.projections = nn.ModuleList(
                nn.Conv2d(channels, self.width, 3, padding=1, bias=False) for _ in SCALES
            )
        self.learner = CorrelationLearner(len(SCALES) ** 2)

    def _device(self) -> torch.device:
        return next(self.learner.parameters()).device

    # ---- the network, for training and for the sparsifier -------------------------------------
    def project(self, conv4: Tensor) -> list[Tensor]:
        """(B, C, h, w) stage map -> the 3 projected levels (B, P, h_i, w_i), not normalised."""
        h, w = conv4.shape[-2:]
        levels = [conv(resize(conv4, size)) for conv, size in zip(self.projections, level_sizes(h, w))]
        return [self._drop_border(level) for level in levels]

    def _drop_border(self, level: Tensor) -> Tensor:
        """Zero the cells within ``border`` of the edge (a zero cell correlates with nothing); a level
        too small to keep an inside, or ``border`` 0, leaves it whole."""
        b, (h, w) = self.border, level.shape[-2:]
        if b == 0 or h <= 2 * b or w <= 2 * b:
            return level
        inside = torch.zeros(h, w, dtype=level.dtype, device=level.device)
        inside[b : h - b, b : w - b] = 1
        return level * inside

    def pair_logits(
        self,
        query_levels: Sequence[Tensor],
        db_levels: Sequence[Tensor],
        db_masks: Sequence[Tensor] | None = None,
        db_fill: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """(B, 2) logits for aligned pairs of projected levels (as :meth:`project` returns them).

        A database location set to zero contributes nothing. The query side may have batch 1
        (one query against B candidates). ``db_masks[i]`` (B, h_i, w_i) multiplies database level
        ``i``'s rows *after* L2 normalisation (the sparsifier's selection): a 0 equals a dropped
        row, and a soft mask has a real gradient (scaling before the normalisation would have none).
        ``db_fill(units, mask)``, when given, replaces that product: it says what a dropped row
        holds (the sparsifier's fill).
        """
        if db_masks is None:
            db = prepare_levels(list(db_levels))
        else:
            if len(db_masks) != len(db_levels):
                raise ValueError(f"{len(db_masks)} db_masks for {len(db_levels)} database levels")
            units = []
            for level, mask in zip(db_levels, db_masks):
                b, _, h, w = level.shape
                if tuple(mask.shape) != (b, h, w):
                    raise ValueError(f"db mask of shape {tuple(mask.shape)} for a level of shape {tuple(level.shape)}")
                unit = F.normalize(level, dim=1, eps=1e-12)
                unit = db_fill(unit, mask) if db_fill is not None else unit * mask.unsqueeze(1).to(level.dtype)
                units.append(self._drop_border(unit))  # a fill does not bring it back
            db = prepare_levels(units, normalized=True)
        return pair_logits_fast(self.learner, prepare_levels(list(query_levels)), db)

    # ---- training --------------------------------------------------------------------------------
    def _in_batch_pairs(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Balanced same/different pairs among the batch: (first, second, target) index tensors."""
        n = labels.shape[0]
        first, second = torch.triu_indices(n, n, offset=1, device=labels.device)
        same = labels[first] == labels[second]
        pos, neg = same.nonzero().flatten(), (~same).nonzero().flatten()
        pos, neg = pos[torch.randperm(len(pos), device=pos.device)], neg[torch.randperm(len(neg), device=neg.device)]
        if len(pos) and len(neg):
            take = min(len(pos), len(neg), max(1, self.max_pairs // 2))
            chosen = torch.cat([pos[:take], neg[:take]])
        else:
            chosen = torch.cat([pos, neg])[: self.max_pairs]
        if not len(chosen):
            raise ValueError(f"a batch of {n} image(s) forms no pair for the verifier's loss; use a batch of two "
                             "or more images (or pair batches: sampling: pairs)")
        return first[chosen], second[chosen], same[chosen].long()

    def losses(
        self, features: Mapping[str, Tensor], labels: Tensor, pairs: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Cross-entropy on same/different over pairs of the batch.

        ``pairs`` (optional, from a pair-mining datamodule): (M, 3) long rows ``(i, j, same)``;
        without it, pairs are formed inside the batch from ``labels``.
        """
        if pairs is not None:
            first, second, target = pairs[:, 0], pairs[:, 1], pairs[:, 2].long()
        else:
            first, second, target = self._in_batch_pairs(labels)
        levels = self.project(features[self.stage])
        logits = self.pair_logits([lv[first] for lv in levels], [lv[second] for lv in levels])
        self.watch(**pair_statistics(logits.detach(), target))
        return {"pair_ce": F.cross_entropy(logits, target)}

    # ---- re-ranking --------------------------------------------------------------------------------
    def entry_kinds(self) -> dict[str, EntryKind]:
        """The stored form a sparsifier rewrites: per pyramid level ``level<i>`` ((h*w, width) unit rows, row-major
        over the level's grid; a zero row contributes nothing to a correlation, so a dropped location may be a
        zero row), ``level<i>_hw`` (h, w), and with ``store_norms`` (which a sparsifier selecting by norm sets)
        ``level<i>_norm``, each location's norm before normalisation."""
        kinds = {f"level{i}": EntryKind(self.entry_dtype, (self.width,), ragged=True) for i in range(len(SCALES))}
        kinds.update({f"level{i}_hw": EntryKind("int32", (2,)) for i in range(len(SCALES))})
        if self.store_norms:
            kinds.update({f"level{i}_norm": EntryKind("float32", (), ragged=True) for i in range(len(SCALES))})
        return kinds

    @torch.no_grad()
    def extract_entries(self, images: Sequence[Tensor], features_at: FeatureFn) -> list[dict[str, Tensor]]:
        """Each image at its own size (scale 1.0, as the official tester) -> normalised level rows."""
        device = self._device()
        dtype = getattr(torch, self.entry_dtype)
        entries = []
        for image in images:
            conv4 = features_at(image.unsqueeze(0).to(device))[self.stage].float()
            entry: dict[str, Tensor] = {}
            for i, level in enumerate(self.project(conv4)):
                unit = F.normalize(level[0], dim=0, eps=1e-12)
                entry[f"level{i}"] = unit.flatten(1).t().contiguous().to(dtype).cpu()
                entry[f"level{i}_hw"] = torch.tensor(unit.shape[-2:], dtype=torch.int32)
                if self.store_norms:
                    entry[f"level{i}_norm"] = level[0].norm(dim=0).flatten().float().cpu()
            entries.append(entry)
        return entries

    def _levels_of(self, entries: Sequence[Mapping[str, Tensor]], device: torch.device) -> LevelSet:
        """Stored entries of equal sizes -> a normalised :class:`LevelSet` on ``device``."""
        levels = []
        for i in range(len(SCALES)):
            h, w = (int(v) for v in entries[0][f"level{i}_hw"])
            with torch.autocast("cpu", enabled=False):  # a caller's CPU bf16 autocast cannot stack fp16 entries
                rows = torch.stack([e[f"level{i}"] for e in entries]).to(device=device, dtype=torch.float32)
            level = rows.transpose(1, 2).reshape(len(entries), -1, h, w)
            levels.append(self._drop_border(level))  # whatever a densified entry holds
        return prepare_levels(levels, normalized=True)

    @torch.no_grad()
    def score(
        self, query: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], seeds: Sequence[int]
    ) -> Tensor:
        """Probability of "same instance" for each candidate; deterministic (``seeds`` unused)."""
        device = self._device()
        out = torch.empty(len(candidates))
        if not candidates:
            return out
        bf16 = self.score_dtype == "bfloat16" or (self.score_dtype == "auto" and device.type == "cuda")
        # fp32 is asked for explicitly: a caller's autocast region (a bf16-mixed loop) must not make it bf16
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        groups: dict[tuple, list[int]] = {}
        for k, entry in enumerate(candidates):
            key = tuple(tuple(int(v) for v in entry[f"level{i}_hw"]) for i in range(len(SCALES)))
            groups.setdefault(key, []).append(k)
        for key in groups:  # before anything is allocated
            check_pair_size(tuple(int(v) for v in query[f"level{len(SCALES) - 1}_hw"]), key[-1])
        query_set = self._levels_of([query], device)
        with autocast:
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    db_set = self._levels_of([candidates[k] for k in chunk], device)
                    logits = pair_logits_fast(self.learner, query_set, db_set)
                    out[chunk] = logits.float().softmax(-1)[:, 1].cpu()
        return out

    def _finest_units(self, entry: Mapping[str, Tensor]) -> tuple[Tensor, int, int]:
        """The scale-1 level of a stored entry as (h*w, P) unit rows, edge cells zeroed as
        :meth:`score` zeroes them, and its (h, w)."""
        finest = f"level{len(SCALES) - 1}"
        h, w = (int(v) for v in entry[f"{finest}_hw"])
        level = self._drop_border(entry[finest].float().t().reshape(1, -1, h, w))
        return F.normalize(level[0].flatten(1).t(), dim=1, eps=1e-12), h, w

    @torch.no_grad()
    def explain(self, query: Mapping[str, Tensor], candidate: Mapping[str, Tensor]) -> PairExplanation:
        """The score, and where the pair correlates: on the finest level (scale 1, the one the 4D
        network sees at full resolution), each location's best clamped cosine with the other image
        (the heat maps) and the strongest mutual nearest neighbours (the lines). A candidate from a
        sparse store is explained as the verifier scores it, dropped locations as densified."""
        score = float(self.score(query, [candidate], [0])[0])
        (q, hq, wq), (d, hd, wd) = self._finest_units(query), self._finest_units(candidate)
        corr = (q @ d.t()).float().clamp_min(0)  # (hq*wq, hd*wd), the scale-1 channel (fp32 under autocast too)
        best_q, to_d = corr.max(dim=1)
        best_d, to_q = corr.max(dim=0)
        mutual = (to_q[to_d] == torch.arange(len(q))) & (best_q > 0)
        rows = mutual.nonzero().flatten()
        rows = rows[best_q[rows].argsort(descending=True, stable=True)][:EXPLAIN_MATCHES]
        cols = to_d[rows]

        def centres(index: Tensor, h: int, w: int) -> Tensor:
            return torch.stack([(index % w + 0.5) / w, (index // w + 0.5) / h], dim=1)

        matches = torch.cat([centres(rows, hq, wq), centres(cols, hd, wd)], dim=1)
        return PairExplanation(
            score=score,
            matches=matches.numpy().astype(np.float32),
            strengths=best_q[rows].numpy().astype(np.float32),
            query_heat=best_q.reshape(hq, wq).numpy(),
            candidate_heat=best_d.reshape(hd, wd).numpy(),
            caption=(f"CVNet verifier: P(same) = {score:.3f}. Heat: each location's best cosine with the other "
                     f"image at scale 1 ({hq}x{wq} / {hd}x{wd} cells). Lines: the {len(rows)} strongest mutual "
                     "nearest neighbours."),
        )


__all__ = ["CVNetVerifierHead"]
