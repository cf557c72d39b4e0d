"""The model's Python API (notebooks, services, ``search``, ``match``): global descriptors of images, re-ranking
entries and scores, a pair's evidence. A mixin of :class:`~retrieval_lightning.module.RetrievalModule`, kept apart
from training and evaluation: every call runs in evaluation mode on fp32 weights, whatever state the model is in."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_lightning.data.image_input import api_image
from retrieval_lightning.entry_checks import check_entries, check_entry_kinds
from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import EntryKind, GlobalHead, PairExplanation, RerankHead, SparsifierHead
from retrieval_lightning.layers.scale_resize import resize_to_scale
from retrieval_lightning.match import explain_local_pair, has_local_features
from retrieval_lightning.retrieval.rerank import content_seed, pair_seeds
from retrieval_lightning.retrieval.rerank_eval import evaluation_mode


def accepts_keyword(method: Any, name: str) -> bool:
    """Whether ``method`` takes the keyword ``name`` (by name or through ``**kwargs``)."""
    parameters = inspect.signature(method).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class InferenceAPI:
    """Embedding, re-ranking and explanation calls of a model with a ``backbone``, ``heads`` by role, a
    ``global_head`` and its ``eval_scales`` / ``eval_resize`` (a :class:`torch.nn.Module`'s ``device``,
    ``parameters`` and ``training`` come with the module)."""

    backbone: nn.Module
    heads: nn.ModuleDict
    eval_scales: Sequence[float]
    eval_resize: str
    device: torch.device
    global_head: GlobalHead

    @contextmanager
    def _api_mode(self) -> Iterator[None]:
        """The Python API's calls: fp32 weights (a ``.double()`` / ``.half()`` model is refused by name, not
        by a dtype clash deep in a convolution), evaluation mode for the call."""
        other = sorted({str(p.dtype) for p in self.parameters() if p.is_floating_point()} - {str(torch.float32)})
        if other:
            raise UsageError(f"the model's weights are {', '.join(other)}: its layers run fp32 weights (some keep "
                             "fp32 arithmetic for stability); call model.float(), and for speed run inside "
                             "torch.autocast (bf16), as precision bf16-mixed does")
        with evaluation_mode(self):
            yield

    @torch.no_grad()
    def embed_image(self, image: Tensor) -> Tensor:
        """Multi-scale global descriptor of one (3, H, W) image: L2 per scale, summed, L2 (DELG).

        Float in [0, 1] or uint8 (scaled); computed in evaluation mode (BatchNorm on its running statistics,
        left untouched) whatever mode the model is in, then the model is put back in it."""
        with self._api_mode():
            return self._embed(api_image(image))

    @torch.no_grad()
    def embed_batch(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """:meth:`embed_image` of every image of a list or a (B, 3, H, W) batch, stacked."""
        with self._api_mode():
            if len(images) == 0:
                return torch.zeros(0, self.global_head.dim, device=self.device)
            return torch.stack([self._embed(api_image(img, f"image {i}")) for i, img in enumerate(images)])

    def _embed(self, image: Tensor) -> Tensor:
        head = self.global_head
        acc = None
        for scale in self.eval_scales:
            x = resize_to_scale(image[None].to(self.device), scale, self.eval_resize)
            desc = head.embed(self.backbone(x))[0].float()
            if desc.shape != (head.dim,):  # stores and gathers are laid out from dim
                raise UsageError(f"{type(head).__name__}.embed gave a descriptor of shape {tuple(desc.shape)} per "
                                 f"image, but its dim is {head.dim}")
            acc = desc if acc is None else acc + desc
        return F.normalize(acc, dim=-1)

    @property
    def rerank_head(self) -> RerankHead | None:
        """The configured re-ranking head (role ``local`` or ``verifier``), if any."""
        return next((h for h in self.heads.values() if isinstance(h, RerankHead)), None)

    @property
    def sparsifier(self) -> SparsifierHead | None:
        head = self.heads["sparsifier"] if "sparsifier" in self.heads else None
        return head if isinstance(head, SparsifierHead) else None

    def _require_rerank_head(self) -> RerankHead:
        head = self.rerank_head
        if head is None:
            raise RuntimeError(f"this model has no re-ranking head (heads: {sorted(self.heads)})")
        return head

    @property
    def rerank_prefix(self) -> str:
        """Stores name re-ranking kinds ``<role>-<name>`` (beside ``global``)."""
        return f"{self._require_rerank_head().role}-"

    def features_at(self, images: Tensor) -> dict[str, Tensor]:
        """The backbone as a re-ranking head sees it: (B, 3, h, w) RGB in [0, 1] -> {stage: map}."""
        return self.backbone(images.to(self.device))

    def rerank_entry_kinds(self, database: bool = True) -> dict[str, EntryKind]:
        """What is stored per image: the head's kinds, rewritten by the sparsifier for database images; for a
        query (scored dense) without what only the sparsifier's selection reads (its ``consumed_kinds``)."""
        head = self._require_rerank_head()
        kinds = head.entry_kinds()
        check_entry_kinds(kinds, f"{type(head).__name__}.entry_kinds()", self.rerank_prefix)
        if self.sparsifier is not None and database:
            kinds = self.sparsifier.entry_kinds(kinds)
            check_entry_kinds(kinds, f"{type(self.sparsifier).__name__}.entry_kinds()", self.rerank_prefix)
        elif self.sparsifier is not None:
            consumed = self.sparsifier.consumed_kinds(kinds)
            kinds = {name: kind for name, kind in kinds.items() if name not in consumed}
        return kinds

    @torch.no_grad()
    def rerank_entries(self, images: Sequence[Tensor], database: bool = True,
                       resize_factors: Tensor | Sequence[Sequence[float]] | None = None) -> list[dict[str, Tensor]]:
        """Per image, what is stored for the re-ranking head (after the sparsifier for database images).

        ``images`` are (3, H, W) float RGB in [0, 1] (or uint8, scaled); the model applies its own
        normalisation, in evaluation mode whatever mode it is in (as :meth:`embed_image`).
        ``resize_factors`` (one (height, width) pair per image, 1 when ``None``): each image's size over
        its original's, handed to heads whose ``extract_entries`` takes them (pixel distances measured
        in the original image, as DELG's RANSAC threshold is).
        """
        with self._api_mode():
            return self._rerank_entries(images, database, resize_factors)

    @torch.no_grad()
    def dense_entries(self, images: Sequence[Tensor],
                      resize_factors: Tensor | Sequence[Sequence[float]] | None = None) -> list[dict[str, Tensor]]:
        """The re-ranking head's own entries of ``images``, before any sparsifier, with what only a sparsifier's
        selection reads (the verifier's row norms): the input of :meth:`SparsifierHead.sparsify`, for experiments
        with other selections (``benchmarks/sparsity_sweep.py``). Arguments as :meth:`rerank_entries`."""
        with self._api_mode():
            entries = self._head_entries(images, resize_factors)
            head = self._require_rerank_head()
            entries = _entry_list(entries, head, len(images))
            check_entries(entries, head.entry_kinds(), type(head).__name__)
            return [{k: v.detach().cpu() for k, v in e.items()} for e in entries]

    def _head_entries(self, images: Sequence[Tensor],
                      resize_factors: Tensor | Sequence[Sequence[float]] | None) -> list[dict[str, Tensor]]:
        head = self._require_rerank_head()
        tensors = [api_image(img, f"image {i}").to(self.device) for i, img in enumerate(images)]
        if resize_factors is not None and accepts_keyword(head.extract_entries, "resize_factors"):
            factors = torch.as_tensor(resize_factors, dtype=torch.float64).cpu().reshape(-1, 2)
            if len(factors) != len(images):
                raise ValueError(f"{len(factors)} resize factors for {len(images)} images")
            return head.extract_entries(tensors, self.features_at, resize_factors=factors)
        return head.extract_entries(tensors, self.features_at)

    def _rerank_entries(self, images: Sequence[Tensor], database: bool,
                        resize_factors: Tensor | Sequence[Sequence[float]] | None) -> list[dict[str, Tensor]]:
        head = self._require_rerank_head()
        entries = _entry_list(self._head_entries(images, resize_factors), head, len(images))
        producer: Any = head
        if database and self.sparsifier is not None:
            producer = self.sparsifier
            entries = _entry_list(self.sparsifier.sparsify(entries), producer, len(images), "sparsify")
        elif self.sparsifier is not None:  # a query: scored dense
            consumed = self.sparsifier.consumed_kinds(head.entry_kinds())
            entries = [{k: v for k, v in e.items() if k not in consumed} for e in entries]
        check_entries(entries, self.rerank_entry_kinds(database), type(producer).__name__)
        return [{k: v.detach().cpu() for k, v in e.items()} for e in entries]

    def densify_entries(self, entries: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Stored database entries -> what the re-ranking head scores (the sparsifier's inverse), checked
        against the head's kinds: a plugin's ``densify`` mistake is named here, not as a shape clash deep
        inside the head's scoring."""
        if self.sparsifier is None:
            return entries
        dense = _entry_list(self.sparsifier.densify(entries), self.sparsifier, len(entries), "densify")
        check_entries(dense, self.rerank_entry_kinds(database=False), f"{type(self.sparsifier).__name__}.densify")
        return dense

    @torch.no_grad()
    def score_entries(
        self, query: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], seeds: Sequence[int]
    ) -> Tensor:
        head = self._require_rerank_head()
        returned = head.score(query, candidates, seeds)
        try:
            scores = torch.as_tensor(returned)
        except (TypeError, ValueError, RuntimeError) as err:
            raise UsageError(f"{type(head).__name__}.score returned {type(returned).__name__}, not a tensor of "
                             f"scores ({err})") from None
        if tuple(scores.shape) not in ((len(candidates),), (len(candidates), 1)):
            raise UsageError(f"{type(head).__name__}.score returned scores of shape {tuple(scores.shape)} for "
                             f"{len(candidates)} candidates: it must return one score per candidate")
        bad = (~torch.isfinite(scores.float().reshape(-1))).nonzero().flatten().tolist()
        if bad:  # one NaN would reorder a fused shortlist silently (search printed it as "not re-ranked")
            raise UsageError(f"{type(head).__name__}.score returned NaN/Inf for {len(bad)} of {len(candidates)} "
                             f"candidates (positions {bad[:10]} of the list it was given)")
        return scores.reshape(len(candidates))  # (K,) as documented, also from a head returning (K, 1)

    @torch.no_grad()
    def rerank_scores(
        self, query_image: Tensor, candidates: Sequence[Tensor] | Sequence[Mapping[str, Tensor]],
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """(K,) re-ranking scores of a query image against K candidate images or stored entries (images as
        for :meth:`rerank_entries`; scored in evaluation mode). Without ``seeds`` a pair's seed (RANSAC's)
        follows the query's pixels and the candidate's entries, so a pair scores the same in any list."""
        with self._api_mode():
            query = self.rerank_entries([query_image], database=False)[0]
            if len(candidates) and isinstance(candidates[0], Tensor):
                entries = self.rerank_entries(list(candidates), database=True)  # type: ignore[arg-type]
            else:
                entries = [dict(c) for c in candidates]  # type: ignore[arg-type]
            if seeds is None:
                # the pixels as the model reads them: a uint8 image and its float copy are one query
                seeds = pair_seeds(content_seed(api_image(query_image)), [content_seed(entry) for entry in entries])
            seeds = list(seeds)
            entries = self.densify_entries(entries)
            return torch.as_tensor(self.score_entries(query, entries, seeds)).float().cpu()

    @torch.no_grad()
    def explain_pair(self, query_image: Tensor, candidate_image: Tensor) -> PairExplanation:
        """The re-ranking head's evidence for one pair (the candidate as the store would hold it,
        its kept locations marked when a sparsifier stores it); images as for :meth:`rerank_scores`."""
        with self._api_mode():
            return self._explain_pair(query_image, candidate_image)

    def _explain_pair(self, query_image: Tensor, candidate_image: Tensor) -> PairExplanation:
        head = self._require_rerank_head()
        query = self.rerank_entries([query_image], database=False)[0]
        stored = self.rerank_entries([candidate_image], database=True)[0]
        if type(head).explain is RerankHead.explain and has_local_features(self.rerank_entry_kinds(database=False)):
            # a local-feature head (DELG) need not explain itself: its inliers are the evidence
            explanation = explain_local_pair(query, self.densify_entries([stored])[0], tuple(query_image.shape[-2:]),
                                             tuple(candidate_image.shape[-2:]), getattr(head, "match_options", {}))
        else:
            explanation = head.explain(query, self.densify_entries([stored])[0])
        if not math.isfinite(float(explanation.score)):  # as score_entries refuses it
            raise UsageError(f"{type(head).__name__}.explain returned the score {explanation.score}")
        if self.sparsifier is not None:
            explanation.candidate_kept = self.sparsifier.kept_cells(stored)
        return explanation


def _entry_list(entries: Any, producer: Any, n: int, method: str = "extract_entries") -> list[Any]:
    """A head's returned entries as the list of ``n`` dicts the contract asks for, or its mistake named."""
    if not isinstance(entries, (list, tuple)) or len(entries) != n:
        got = (f"{len(entries)} entries" if isinstance(entries, (list, tuple))
               else f"one {type(entries).__name__}")
        raise UsageError(f"{type(producer).__name__}.{method} returned {got} for {n} images: extract_entries, a "
                         "sparsifier's sparsify and densify return a list with one dict of tensors per image")
    return list(entries)
