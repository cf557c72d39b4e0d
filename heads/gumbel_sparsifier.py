"""CVNet-DS: learn which database locations of the verifier's projected levels to store.

Why: CVNet must store every database image's dense projected pyramid (5.2 MiB fp32 at 768x1024),
which does not scale to a million images. This head scores every location of a database image's
levels with a small conv net, keeps the top ones, and stores only those (positions + fp16, int8
or int4 rows); the verifier scores the scattered-back map through its dense code path, each dropped
location holding the Gaussian average of the kept rows around it (:mod:`heads._sparse.fill`;
``fill_sigma: 0`` leaves it zero). The keep scores are learned end to end through the verifier's
pair loss, with the same fill, by a straight-through Gumbel relaxation
(:mod:`heads._sparse.selection`), plus a budget term. With ``spread`` the top-k is greedy and
each kept location lowers its neighbours' scores, so the kept cells cover the level the fill
reconstructs.
"""

from __future__ import annotations

import re
import zlib
from functools import partial
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads._cvnet.fast import SCALES
from heads._sparse import codec
from heads._sparse.fill import fill_dropped, fill_rows
from heads._sparse.masked import Fill, accepts_db_masks, bernoulli_logprob, masked_pair_logits, plackett_luce_logprob
from heads._sparse.selection import (
    RELAXATIONS, budget_counts, budget_loss, concrete_st_mask, gumbel_like, keep_count, spread_topk, temperature,
    topk_st_mask,
)
from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import EntryKind, RerankHead, SparsifierHead

SELECTIONS = ("learned", "norm", "random")
#: suffix of a verifier's kind holding each stored row's norm before normalisation (``level0_norm``)
NORM_SUFFIX = "_norm"
ESTIMATORS = ("auto", "straight_through", "score_function")
TARGETS = ("labels", "dense")
#: the order an untrained scorer keeps (its last layer starts at zero): ``norm``, the feature norm, or
#: ``sparsity``, the peakiness of the unit row (small L1 norm: a few large components)
PRIORS = ("norm", "sparsity")


def _natural_order(name: str) -> list:
    """Sort key putting ``level2`` before ``level10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _standardised(values: Tensor) -> Tensor:
    """(B, 1, h, w) values standardised per image (centred only when there is one location)."""
    centred = values - values.mean(dim=(2, 3), keepdim=True)
    if values[0].numel() < 2:
        return centred
    return centred / (values.std(dim=(2, 3), keepdim=True, unbiased=False) + 1e-6)


def norm_overlap(logits: Sequence[Tensor], levels: Sequence[Tensor], counts: Sequence[int]) -> Tensor:
    """Share of the cells the keep logits select (top-k per level) that top-k by feature norm selects too.

    With the default ``prior`` the scorer starts at that order (its last layer is zero at
    initialisation), so this says how far training has moved the selection from the norm baseline:
    1.0 = not at all; about the keep ratio for an unrelated selection."""
    shares = []
    for lg, lv, k in zip(logits, levels, counts):
        if k <= 0:
            continue
        by_logits = torch.zeros_like(lg).scatter_(1, torch.topk(lg.detach(), k, dim=1).indices, 1.0)
        norms = lv.detach().float().norm(dim=1).flatten(1)
        by_norm = torch.zeros_like(lg).scatter_(1, torch.topk(norms, k, dim=1).indices, 1.0)
        shares.append((by_logits * by_norm).sum(dim=1).mean() / k)
    return torch.stack(shares).mean() if shares else torch.ones(())


class GumbelSparsifierHead(SparsifierHead):
    """Per-location keep logits on the database side, trained through the attached verifier.

    Args:
        stage: backbone stage the verifier projects (its ``project`` input).
        width: channels of the verifier's projected levels (must match the verifier).
        num_levels: pyramid levels (CVNet: 3); each has its own learned logit offset.
        hidden: width of the keep-score conv net.
        keep_ratio: fraction of each level's locations kept at extraction (and the training
            target); ignored when ``budget`` is set.
        budget: a fixed number of locations per image instead, shared by levels in proportion
            to their size (largest remainder: the counts add up to it, each level keeping 1 to all).
        relaxation: ``topk`` (exactly the extraction count in every step) or ``concrete``
            (per-location coins, the count held by the budget term).
        tau_start, tau_end, tau_steps: geometric temperature schedule of the relaxation's
            straight-through gradient (the forward masks are exactly 0/1 at any temperature; their
            Gumbel noise keeps unit scale, so a training mask is a sample around the extraction's
            top-k, as close to it as the logits are large against that noise). Steps count the
            training calls of :meth:`losses`: micro-batches under gradient accumulation.
        budget_weight: weight of the budget term, the squared gap between a level's mean keep probability
            (sigmoid of the logits) and the target (returned already weighted). Under ``topk`` the count is
            exact anyway and the term is a regulariser: its gradient reaches the scorer and the norm weight, not
            only the per-level offsets, and holds the logits' scale against the unit Gumbel noise. Restricted to
            the offsets, the demo's eight seeds lost 3.7 points of mAP-H (docs/sparsifier_experiments.md, stop
            47). Under ``concrete`` it is divided by the temperature, as the straight-through gradient of the
            pair loss grows as 1 / tau: otherwise annealing tau lets the pair loss outweigh the budget and the
            kept share drifts above the target.
        selection: ``learned``; ``norm`` (top-k by feature norm) and ``random`` are the
            baselines the sparsity benchmark compares with.
        value_dtype, int8_scale, index_dtype: the stored form (:mod:`heads._sparse.codec`):
            values ``float16``, ``int8`` or ``int4`` (two per byte; the width must be even), or ``float32``
            (twice fp16's bytes: keep ratio 1.0 then equals a verifier storing ``entry_dtype: float32``);
            ``int8_scale`` (``row`` or ``image``) is the scale of either integer form.
        negatives_per_anchor: in-batch negative pairs per image (positives: every image with a
            same-label partner); unread with pair batches (``sampling: pairs``, every shipped recipe).
        estimator: how the pair loss reaches the keep logits (:mod:`heads._sparse.masked`):
            ``straight_through`` needs a verifier whose ``pair_logits`` takes ``db_masks``;
            ``score_function`` works with any verifier; ``auto`` picks the first available.
        fill_sigma: what a dropped location holds when scored (:mod:`heads._sparse.fill`): 0
            (zero, it contributes nothing) or the Gaussian average (sigma in cells of its level)
            of the kept rows around it. Training and scoring use the same fill; nothing is
            stored for it.
        target: what the masked pair logits are fitted to: ``labels`` (same/different, the
            verifier's own loss) or ``dense`` (the frozen verifier's probabilities on the dense
            pair: a selection is good when it changes no score, right or wrong).
        prior: the order the scorer starts from and adds to (:data:`PRIORS`): ``norm`` (the
            projected feature's norm) or ``sparsity`` (minus the L1 norm of the L2-normalised row:
            peaky features first), standardised per image and weighted by a learned scalar.
        spread: how strongly a kept location discourages keeping its neighbours (0: plain top-k):
            the learned and norm selections pick greedily, each pick lowering the other scores by
            ``spread`` standard deviations at its own cell, less with distance
            (:func:`heads._sparse.selection.spread_topk`), in training (``relaxation: topk``, the
            straight-through estimator) as at extraction. Dropped cells are filled from the kept
            ones around them, which needs kept cells everywhere.
    """

    #: which draw ``selection: random`` takes (a benchmark averages several; the draw is a function of
    #: the rows, the level and this, so a store is reproducible)
    random_draw: int = 0
    scoring_only = ("fill_sigma",)  # the fill is made at scoring time; the stored rows do not depend on it
    #: 1: the selection reads the verifier's true feature norms (stores of revision 0 selected on fp16 noise)
    store_revision = 1

    def __init__(
        self,
        stage: str = "conv4",
        width: int = 256,
        num_levels: int = 3,
        hidden: int = 32,
        keep_ratio: float = 0.15,
        budget: int | None = None,
        relaxation: str = "topk",
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        tau_steps: int = 1000,
        budget_weight: float = 1.0,
        selection: str = "learned",
        value_dtype: str = "int4",
        int8_scale: str = "row",
        index_dtype: str = "int16",
        negatives_per_anchor: int = 1,
        estimator: str = "auto",
        fill_sigma: float = 1.5,
        target: str = "labels",
        prior: str = "norm",
        spread: float = 0.0,
    ) -> None:
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if budget is None and not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be at least 1 location per image, got {budget}")
        if not (tau_start > 0 and tau_end > 0):  # the relaxations divide by the temperature
            raise ValueError(f"tau_start and tau_end must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
        if tau_steps < 0:
            raise ValueError(f"tau_steps must be >= 0, got {tau_steps}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if fill_sigma < 0:
            raise ValueError(f"fill_sigma must be >= 0 (0: dropped locations are zero), got {fill_sigma}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if spread < 0:
            raise ValueError(f"spread must be >= 0 (0: plain top-k), got {spread}")
        if spread > 0 and (relaxation != "topk" or estimator == "score_function"):
            raise ValueError("spread needs relaxation 'topk' and the straight-through estimator (a greedy pick has "
                             f"no keep probability to score), got relaxation {relaxation!r}, estimator {estimator!r}")
        self.spread = float(spread)
        self.estimator, self.target, self.prior = estimator, target, prior
        self.fill_sigma = float(fill_sigma)
        codec.check_options(value_dtype, int8_scale, index_dtype)
        if value_dtype == "int4" and width % 2:
            raise ValueError(f"value_dtype 'int4' packs two channels per byte: width {width} must be even "
                             "(or store int8 / float16)")
        self.stages = (stage,)
        self.stage = stage
        for name, value in (("width", width), ("num_levels", num_levels), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if budget_weight < 0:  # the optimiser would push the kept share away from the target
            raise ValueError(f"budget_weight must be >= 0, got {budget_weight}")
        if negatives_per_anchor < 0:  # a slice bound: -1 meant all other-label images but the last
            raise ValueError(f"negatives_per_anchor must be >= 0, got {negatives_per_anchor}")
        self.width, self.num_levels, self.hidden = int(width), int(num_levels), int(hidden)
        self.keep_ratio, self.budget = float(keep_ratio), (None if budget is None else int(budget))
        self.relaxation = relaxation
        self.tau_start, self.tau_end, self.tau_steps = float(tau_start), float(tau_end), int(tau_steps)
        self.budget_weight = float(budget_weight)
        self.selection = selection
        self.value_dtype, self.int8_scale, self.index_dtype = value_dtype, int8_scale, index_dtype
        self.negatives_per_anchor = int(negatives_per_anchor)

    def _build(self, stage_channels: dict[str, int], num_classes: int) -> None:
        p, h = self.width, self.hidden
        # input: the L2-normalised row and its standardised log-norm (what the verifier's cosine
        # ignores but a saliency score wants)
        self.scorer = nn.Sequential(
            nn.Conv2d(p + 1, h, 1), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(h, 1, 1),
        )
        nn.init.zeros_(self.scorer[-1].weight)  # untrained = top-k by feature norm, a sane start
        nn.init.zeros_(self.scorer[-1].bias)
        self.norm_weight = nn.Parameter(torch.ones(()))
        self.level_bias = nn.Parameter(torch.zeros(self.num_levels))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ verifier
    def attach(self, verifier: RerankHead) -> None:
        missing = [m for m in ("project", "pair_logits") if not callable(getattr(verifier, m, None))]
        if missing:  # it selects among the verifier's projected levels and trains through its pair logits
            raise UsageError(f"gumbel_sparsifier needs a verifier with {' and '.join(missing)} (as cvnet_verifier "
                             f"has); {type(verifier).__name__} has not")
        if self.stage not in getattr(verifier, "stages", (self.stage,)):
            raise ValueError(f"sparsifier reads {self.stage!r} but the verifier reads {verifier.stages}")
        width = getattr(verifier, "width", getattr(verifier, "proj_dim", None))
        if width is not None and int(width) != self.width:
            raise ValueError(f"sparsifier width={self.width} but the verifier projects to {width} channels")
        levels = getattr(verifier, "num_levels", len(SCALES))
        if levels != self.num_levels:  # fewer shared one learned offset; more were never trained
            raise ValueError(f"sparsifier num_levels={self.num_levels} but the verifier has {levels} pyramid levels")
        super().attach(verifier)
        if hasattr(verifier, "store_norms"):
            # its entries are unit rows: the selection needs each location's norm beside them (the
            # training input, the projected levels, has it)
            verifier.store_norms = True

    def _verifier(self) -> RerankHead:
        if not getattr(self, "verifier", None):
            raise RuntimeError("GumbelSparsifierHead needs attach(verifier) before training or extraction")
        return self.verifier[0]

    # ------------------------------------------------------------------ scores
    def keep_logits(self, level: Tensor, index: int) -> Tensor:
        """Keep logits (B, h*w) of projected level ``index`` (B, P, h, w).

        ``level`` is not detached: with the verifier fine-tuned along (not in ``freeze``), the budget term and the
        straight-through gradients reach its projections too, so features and selection are trained together
        (end to end, as CVNet-DS); with it frozen only the scorer learns."""
        level = level.float()
        unit = F.normalize(level, dim=1)
        z = _standardised(torch.log(level.norm(dim=1, keepdim=True) + 1e-6))
        if self.prior == "norm":
            prior = z
        else:  # peaky rows first: a unit row's L1 norm is 1 for one component, sqrt(P) for all equal
            l1 = unit.abs().sum(dim=1, keepdim=True)
            l1 = torch.where(l1 > 0, l1, torch.full_like(l1, float(level.shape[1]) ** 0.5))  # zero rows last
            prior = _standardised(-torch.log(l1))
        logits = self.norm_weight * prior + self.scorer(torch.cat([unit, z], dim=1))
        return (logits + self.level_bias[min(index, self.num_levels - 1)]).flatten(1)

    def _counts(self, sizes: Sequence[int]) -> list[int]:
        if self.budget is not None:
            return budget_counts(sizes, self.budget)
        return [keep_count(n, self.keep_ratio) for n in sizes]

    def target_fraction(self, sizes: Sequence[int]) -> float:
        return sum(self._counts(sizes)) / max(sum(sizes), 1)

    def temperature(self) -> float:
        return temperature(int(self.step), self.tau_start, self.tau_end, self.tau_steps)

    # ------------------------------------------------------------------ training
    def pairs(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In-batch (query, database, same) pairs: each image with its next same-label partner,
        and with its next ``negatives_per_anchor`` other-label images (cyclic order)."""
        lab = labels.tolist()
        n = len(lab)
        q, d, same = [], [], []
        for i in range(n):
            order = [(i + s) % n for s in range(1, n)]
            pos = next((j for j in order if lab[j] == lab[i]), None)
            if pos is not None:
                q.append(i), d.append(pos), same.append(1)
            for j in [j for j in order if lab[j] != lab[i]][: self.negatives_per_anchor]:
                q.append(i), d.append(j), same.append(0)
        dev = labels.device
        return (torch.tensor(q, dtype=torch.long, device=dev), torch.tensor(d, dtype=torch.long, device=dev),
                torch.tensor(same, dtype=torch.long, device=dev))

    def relaxed_masks(self, logits: Sequence[Tensor], shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Straight-through 0/1 masks (B, h*w) per level (of ``shapes``) for the current temperature."""
        tau = self.temperature()
        counts = self._counts([h * w for h, w in shapes])
        if self.relaxation == "topk":
            return [topk_st_mask(lg, k, tau, hw=tuple(hw), spread=self.spread)
                    for lg, k, hw in zip(logits, counts, shapes)]
        return [concrete_st_mask(lg, tau) for lg in logits]

    def sampled_masks(self, logits: Sequence[Tensor], sizes: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """Hard masks drawn from the keep distribution and their summed log-probability (B,)."""
        masks, logp = [], []
        for lg, k in zip(logits, self._counts(sizes)):
            if self.relaxation == "topk":
                g = lg.detach() + gumbel_like(lg.detach())
                hard = torch.zeros_like(lg).scatter_(1, torch.topk(g, k, dim=1).indices, 1.0)
                logp.append(plackett_luce_logprob(lg, g, k))
            else:
                hard = torch.bernoulli(torch.sigmoid(lg.detach()))
                logp.append(bernoulli_logprob(lg, hard))
            masks.append(hard)
        return masks, torch.stack(logp).sum(0)

    def greedy_masks(self, logits: Sequence[Tensor], shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """The extraction's deterministic selection, as 0/1 masks."""
        counts = self._counts([h * w for h, w in shapes])
        return [spread_topk(lg.detach(), k, tuple(hw), self.spread)[0].to(lg.dtype)
                for lg, k, hw in zip(logits, counts, shapes)]

    def _fill(self) -> Fill | None:
        return partial(fill_dropped, sigma=self.fill_sigma) if self.fill_sigma > 0 else None

    def uses_straight_through(self) -> bool:
        if self.estimator == "auto":
            return accepts_db_masks(self._verifier())
        return self.estimator == "straight_through"

    def losses(
        self, features: Mapping[str, Tensor], labels: Tensor, pairs: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Pair cross-entropy of the verifier on masked database sides (against the labels or the
        dense pair's probabilities, ``target``), plus the budget term.

        ``pairs`` (optional, from a pair-mining datamodule): (M, 3) long rows ``(query, database,
        same)``, the mined hard negatives the verifier trained on; without it, :meth:`pairs`.
        """
        verifier = self._verifier()
        levels = verifier.project(features[self.stage])
        if pairs is not None:
            q_idx, d_idx, same = pairs[:, 0], pairs[:, 1], pairs[:, 2].long()
        else:
            q_idx, d_idx, same = self.pairs(labels)
        if len(same) == 0:
            raise ValueError("a batch of one image forms no pair")
        shapes = [lv.shape[2:] for lv in levels]
        sizes = [h * w for h, w in shapes]
        q_levels, d_levels = [lv[q_idx] for lv in levels], [lv[d_idx] for lv in levels]
        logits = [self.keep_logits(lv, i) for i, lv in enumerate(d_levels)]

        def as_maps(masks: Sequence[Tensor]) -> list[Tensor]:
            return [m.reshape(-1, *hw) for m, hw in zip(masks, shapes)]

        if self.target == "dense":
            with torch.no_grad():
                goal = verifier.pair_logits(q_levels, d_levels).float().softmax(dim=1)
        else:
            goal = same

        def pair_loss(masks: Sequence[Tensor], reduction: str = "mean") -> Tensor:
            pair = masked_pair_logits(verifier, q_levels, d_levels, as_maps(masks), self._fill()).float()
            return F.cross_entropy(pair, goal, reduction=reduction)  # soft targets: KL to dense + a constant

        out: dict[str, Tensor] = {}
        name = "pair_ce" if self.target == "labels" else "pair_distill"
        if self.uses_straight_through():
            masks = self.relaxed_masks(logits, shapes)
            out[name] = pair_loss(masks)
        else:
            if self.spread > 0:
                raise UsageError(f"gumbel_sparsifier spread={self.spread} needs the straight-through estimator, which "
                                 f"{type(verifier).__name__} does not support (its pair_logits takes no db_masks)")
            masks, logp = self.sampled_masks(logits, sizes)
            ce = pair_loss(masks, "none")
            with torch.no_grad():
                baseline = pair_loss(self.greedy_masks(logits, shapes), "none")
            out[name] = ce.mean()
            # REINFORCE with the greedy selection as baseline: its value is not a loss, its gradient is
            out["score_function"] = ((ce.detach() - baseline) * logp).mean()
        fraction = self.target_fraction(sizes)
        weight = self.budget_weight / (self.temperature() if self.relaxation == "concrete" else 1.0)
        out["budget"] = weight * torch.stack([budget_loss(lg, fraction) for lg in logits]).mean()
        # the share of cells the training masks kept (exactly the target under the top-k relaxation; what
        # the budget term holds under the concrete one), and how far the selection is from top-k by norm
        self.watch(temperature=self.temperature(),
                   kept_fraction=torch.cat([m.detach().flatten(1) for m in masks], dim=1).mean(),
                   norm_overlap=norm_overlap(logits, d_levels, self._counts(sizes)))
        if self.training:
            self.step += 1
        return out

    # ------------------------------------------------------------------ storage
    @staticmethod
    def dense_levels(kinds: Mapping[str, EntryKind]) -> list[str]:
        """Names of the verifier's dense level kinds: ragged (h*w, P) rows with a ``<name>_hw`` kind."""
        names = [n for n, k in kinds.items() if k.ragged and len(k.shape) == 1 and f"{n}_hw" in kinds]
        return sorted(names, key=_natural_order)

    def consumed_kinds(self, verifier_kinds: Mapping[str, EntryKind]) -> set[str]:
        """Each level's row norms (``level0_norm``): the selection's input, not stored."""
        return {f"{name}{NORM_SUFFIX}" for name in self.dense_levels(verifier_kinds)} & set(verifier_kinds)

    def entry_kinds(self, verifier_kinds: Mapping[str, EntryKind]) -> dict[str, EntryKind]:
        out: dict[str, EntryKind] = {}
        levels = self.dense_levels(verifier_kinds)
        consumed = self.consumed_kinds(verifier_kinds)
        for name, kind in verifier_kinds.items():
            if name in levels:
                out.update(codec.sparse_kinds(name, kind.shape[0], self.value_dtype, self.int8_scale, self.index_dtype))
            elif name not in consumed:
                out[name] = kind
        return out

    def stored_bytes(self, verifier_kinds: Mapping[str, EntryKind], level_sizes: Sequence[int]) -> float:
        """Bytes one database image takes in the store at this head's setting, for the verifier's
        dense kinds with levels of ``level_sizes`` locations (``h*w``, in level order): what the
        store will report, computed without extracting anything (e.g. at R50 shapes)."""
        kinds = self.entry_kinds(verifier_kinds)
        rows = {}
        for level, count in zip(self.dense_levels(verifier_kinds), self._counts(level_sizes)):
            rows.update({name: count for name in kinds if name.startswith(f"{level}_") and kinds[name].ragged})
        return codec.bytes_per_image(kinds, rows)

    def _entry_levels(self, entry: Mapping[str, Tensor]) -> list[str]:
        names = [n for n in entry if f"{n}_hw" in entry and entry[n].ndim == 2]
        return self.dense_levels({n: EntryKind("float16", (1,), True) for n in names} |
                                 {f"{n}_hw": EntryKind("int32", (2,)) for n in names})

    def _positions(self, rows: Tensor, norms: Tensor | None, hw: Tensor, index: int, k: int) -> Tensor:
        """The ``k`` kept locations of one level: ``rows`` as stored, ``norms`` each row's norm before
        the verifier normalised it (``None``: the rows are stored as projected)."""
        h, w = (int(v) for v in hw.reshape(-1)[:2])
        if self.selection == "random":
            data = rows.detach().cpu().contiguous().view(torch.int16).numpy().tobytes()
            gen = torch.Generator().manual_seed(zlib.crc32(data) ^ index ^ (int(self.random_draw) << 8))
            return torch.sort(torch.randperm(rows.shape[0], generator=gen)[:k]).values
        projected = rows.float() if norms is None else F.normalize(rows.float(), dim=1) * norms.float().reshape(-1, 1)
        if self.selection == "norm":
            return self._select(projected.norm(dim=1), k, (h, w))
        level = projected.to(self.norm_weight.device).t().reshape(1, -1, h, w)  # what keep_logits saw in training
        return self._select(self.keep_logits(level, index)[0].cpu(), k, (h, w))

    def _select(self, scores: Tensor, k: int, hw: tuple[int, int]) -> Tensor:
        """Sorted positions of the ``k`` locations kept from one level's scores (h*w,): the pick
        :meth:`greedy_masks` makes in training (``spread`` 0: the stable top-k)."""
        return torch.nonzero(spread_topk(scores.reshape(1, -1), k, hw, self.spread)[0][0]).flatten()

    @torch.no_grad()
    def sparsify(self, entries: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Dense verifier entries (database images) -> only the top locations of every level."""
        out = []
        for entry in entries:
            levels = self._entry_levels(entry)
            counts = self._counts([entry[n].shape[0] for n in levels])
            consumed = set(levels) | {f"{name}{NORM_SUFFIX}" for name in levels}
            sparse = {k: v for k, v in entry.items() if k not in consumed}
            for i, (name, k) in enumerate(zip(levels, counts)):
                rows = entry[name]
                pos = self._positions(rows, entry.get(f"{name}{NORM_SUFFIX}"), entry[f"{name}_hw"], i, k)
                sparse.update(codec.encode_level(name, rows, pos, self.value_dtype, self.int8_scale, self.index_dtype))
            out.append(sparse)
        return out

    def kept_cells(self, entry: Mapping[str, Tensor]) -> np.ndarray | None:
        """(h, w) bool map of the finest stored level's kept locations; ``None`` for a dense entry."""
        stems = (k[: -len("_pos")] for k in entry if k.endswith("_pos"))
        names = sorted((n for n in stems if f"{n}_hw" in entry), key=_natural_order)
        if not names:
            return None
        finest = names[-1]
        h, w = (int(v) for v in entry[f"{finest}_hw"].reshape(-1)[:2])
        kept = np.zeros(h * w, dtype=bool)
        kept[entry[f"{finest}_pos"].long().numpy()] = True
        return kept.reshape(h, w)

    def densify(self, entries: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Sparse entries -> the verifier's dense form (dropped rows zero, or filled from the kept
        ones with ``fill_sigma``); dense entries pass through."""
        out = []
        for entry in entries:
            names = sorted({k[: -len("_pos")] for k in entry if k.endswith("_pos") and f"{k[:-4]}_val" in entry})
            dense = {k: v for k, v in entry.items()
                     if not any(k in (f"{n}_pos", f"{n}_val", f"{n}_scale") for n in names)}
            for name in names:
                hw = entry[f"{name}_hw"]
                rows = codec.decode_level(name, entry, hw)
                h, w = (int(v) for v in hw.reshape(-1)[:2])
                dense[name] = fill_rows(rows, entry[f"{name}_pos"], (h, w), self.fill_sigma)
            out.append(dense)
        return out
