"""The head contract: what every head plugin is and how the core calls it.

A head is an ``nn.Module`` with a **role** and the backbone **stages** it reads. The core builds
it in two steps: the plugin's constructor takes plain hyper-parameters (so a head can be made in
a notebook or from YAML), then :meth:`Head.build` is called once by
:class:`~retrieval_lightning.module.RetrievalModule` with the channel count of every stage the
head reads and the number of training classes, and creates the parameters.

Roles and their inference method:

- ``global``: :meth:`GlobalHead.embed` ``(features) -> (B, D)`` L2-normalised descriptors.
- ``local`` / ``verifier`` (:class:`RerankHead`): ``entry_kinds()``, ``extract_entries(images,
  features_at)`` and ``score(query, candidates, seeds) -> (K,)``; the core stores entries, builds
  shortlists, calls ``score`` and fuses it with the global score. Optionally ``explain(query,
  candidate) ->`` :class:`PairExplanation`, what ``retrieval-lightning match`` draws for a pair.
- ``sparsifier`` (:class:`SparsifierHead`): ``sparsify`` / ``densify`` the verifier's stored form;
  optionally ``kept_cells(entry)``, the stored locations, drawn by ``match`` on the database image.

Every head returns its named training losses from :meth:`Head.losses`; the module weights and
sums them and logs each as ``train/<role>/<name>``. Values worth watching that are not losses (an
accuracy, mean scores) are handed to :meth:`Head.watch` inside ``losses`` and logged the same way.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

ROLES = ("global", "local", "verifier", "sparsifier")


def record_init_args(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``__init__`` so the outermost call stores its bound arguments in ``self._init_args``.

    Self-contained checkpoints rebuild every head from these (plain values only: heads take plain
    constructor arguments, the contract of this module).
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        if "_init_args" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[name] = list(value) if isinstance(value, tuple) else value
            self.__dict__["_init_args"] = recorded
        init(self, *args, **kwargs)

    return wrapper


class Head(nn.Module):
    """Base class of every head; subclasses set ``role`` and ``stages``."""

    role: ClassVar[str] = ""
    #: backbone stages read, by name (``conv4``, ``conv5``, ...); may be overridden per instance (a sparsifier,
    #: whose input is the verifier's entries, may read none)
    stages: tuple[str, ...] = ("conv5",)
    #: state-dict prefixes (inside the head) that exist only for training, e.g. a classifier over the
    #: training classes: a model built for evaluation (``num_classes=0``) loads checkpoints without them
    training_only: ClassVar[tuple[str, ...]] = ()
    #: constructor arguments that do not change what is stored (how entries are scored, or what only
    #: training reads, e.g. a loss temperature): left out of store identities, so changing one re-uses
    #: an existing store instead of re-extracting it
    scoring_only: ClassVar[tuple[str, ...]] = ()
    #: revision of what the head stores: bump it when the same weights and arguments come to store other
    #: entries (a fixed bug in extraction), so that stores written before are refused, not silently reused
    store_revision: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self._built = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.role and cls.role not in ROLES:
            raise TypeError(f"{cls.__qualname__}.role={cls.role!r} is not one of {ROLES}")
        if "__init__" in cls.__dict__:
            cls.__init__ = record_init_args(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments this head was made with (what a checkpoint needs to rebuild it)."""
        return dict(self.__dict__.get("_init_args", {}))

    @property
    def is_built(self) -> bool:
        return self._built

    def build(self, stage_channels: Mapping[str, int], num_classes: int) -> None:
        """Create parameters once the backbone's channels and the class count are known."""
        missing = [s for s in self.stages if s not in stage_channels]
        if missing:
            raise ValueError(
                f"{type(self).__name__} reads backbone stages {missing} but the backbone only has "
                f"{sorted(stage_channels)}"
            )
        self._build({s: int(stage_channels[s]) for s in self.stages}, int(num_classes))
        self._built = True

    def _build(self, stage_channels: dict[str, int], num_classes: int) -> None:
        raise NotImplementedError

    def losses(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Named scalar training losses for a batch (unweighted)."""
        raise NotImplementedError

    def watch(self, **values: Tensor | float) -> None:
        """Record values of the current ``losses`` call worth watching in a run (an accuracy, mean
        scores): the module logs them as ``train/<role>/<name>`` beside the losses, never optimises them."""
        self.__dict__["_watched"] = {k: torch.as_tensor(v).detach() for k, v in values.items()}

    def training_metrics(self) -> dict[str, Tensor]:
        """What the last ``losses`` call recorded with :meth:`watch` (then forgotten)."""
        return self.__dict__.pop("_watched", {})

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups; override to give some parameters their own lr/decay."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def untrained_tensors(self) -> list[str]:
        """State-dict names (inside the head) whose values after ``build`` are random draws.

        Why: a head frozen with such tensors never loaded (a later stage of a recipe run without
        ``init_from``, or from the wrong stage's checkpoint) trains the rest against noise for hours;
        ``fit`` refuses that. Default: every parameter except the training-only ones. Override when
        the build is a deliberate starting point (an identity map, a fixed pooling exponent).
        """
        return [n for n, _ in self.named_parameters() if not n.startswith(self.training_only)]


class GlobalHead(Head):
    """A head producing one L2-normalised descriptor per image."""

    role: ClassVar[str] = "global"

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def embed(self, features: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def pool(self, features: Mapping[str, Tensor]) -> Tensor:
        """The descriptor the training classifier sees (before L2 normalisation)."""
        raise NotImplementedError

    #: set by heads that want their classifier imprinted from training descriptors at fit start
    wants_imprint: bool = False

    def imprint(self, class_sums: Tensor, class_counts: Tensor) -> None:
        """Initialise the classifier from per-class sums of :meth:`pool` over the training set."""
        raise NotImplementedError(f"{type(self).__name__} does not support imprinting")



#: ``features_at(images) -> {stage: map}``: the backbone as a re-ranking head sees it. ``images`` is a
#: (B, 3, H, W) float RGB batch in [0, 1] at whatever size the head chose (the head resizes for its own
#: scales); the callable normalises, runs the backbone and returns the stages the head reads.
FeatureFn = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class EntryKind:
    """One array a re-ranking head stores per database image.

    ``dtype`` is a numpy dtype name (``float16``, ``uint8``, ``int32`` ...), ``shape`` the shape of
    one row. ``ragged=False``: exactly one row per image (entry tensor of shape ``shape``).
    ``ragged=True``: any number of rows per image (entry tensor of shape ``(n, *shape)``), e.g. local
    keypoints, or a dense map whose size follows the image stored as ``(h*w, C)`` rows next to a
    fixed ``(2,)`` kind holding ``(h, w)``.
    """

    dtype: str
    shape: tuple[int, ...]
    ragged: bool = False


@dataclass
class PairExplanation:
    """What a re-ranking head shows of one scored pair, for a picture (``retrieval-lightning match``).

    Positions are fractions of the image's width and height (x, y in [0, 1]), so a head need not
    know the pixel size the images are drawn at. A heat map is any (h, w) grid of values in [0, 1],
    drawn stretched over its image.

    Attributes:
        score: the head's score of the pair (what :meth:`RerankHead.score` returns).
        matches: (n, 4) float rows ``(query x, query y, candidate x, candidate y)``, strongest first.
        strengths: (n,) how strongly each match holds (e.g. its similarity), for colouring.
        query_heat / candidate_heat: optional (h, w) maps of each side's evidence.
        candidate_kept: optional (h, w) bool map of the candidate's stored locations (a sparse store).
        caption: one line saying what the score, the lines and the heat maps are.
    """

    score: float
    matches: np.ndarray
    strengths: np.ndarray
    query_heat: np.ndarray | None = None
    candidate_heat: np.ndarray | None = None
    candidate_kept: np.ndarray | None = None
    caption: str = ""


class RerankHead(Head):
    """A re-ranking head (role ``local`` or ``verifier``): re-scores a query's global shortlist.

    The core (:mod:`retrieval_lightning.retrieval.rerank`) knows exactly three things about it:

    - :meth:`entry_kinds` ``() -> {name: EntryKind}``: what is stored per image;
    - :meth:`extract_entries` ``(images, features_at) -> list[{name: Tensor}]``: one entry per image
      (queries and database alike), each tensor matching its :class:`EntryKind`; ``images`` is a
      list of (3, H, W) float RGB tensors in [0, 1], possibly of different sizes. A head whose
      method also takes the keyword ``resize_factors`` gets a (B, 2) float64 tensor: each image's
      (height, width) over its original's (an eval set's images are shrunk to ``eval_max_side``), so
      it can measure pixel distances in the original image (DELG's RANSAC threshold);
    - :meth:`score` ``(query, candidates, seeds) -> (K,) float tensor``: one query entry against K
      candidate entries; higher is more similar. ``seeds[k]`` is a per-(query, candidate) seed for
      anything random (RANSAC), so scores do not depend on the rank or order they are computed in.

    Entries reach :meth:`score` as CPU tensors read back from the store, in the stored dtype.
    """

    def entry_kinds(self) -> dict[str, EntryKind]:
        raise NotImplementedError

    def extract_entries(self, images: Sequence[Tensor], features_at: FeatureFn) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def score(
        self, query: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], seeds: Sequence[int]
    ) -> Tensor:
        raise NotImplementedError

    def explain(self, query: Mapping[str, Tensor], candidate: Mapping[str, Tensor]) -> PairExplanation:
        """Optional: the evidence behind ``score(query, [candidate])`` as a :class:`PairExplanation`
        (entries as :meth:`score` receives them)."""
        raise NotImplementedError(f"{type(self).__name__} does not explain its scores (no explain method)")


class LocalHead(RerankHead):
    """Local features (keypoints, descriptors) scored by geometric verification (DELG).

    Entries named ``keypoints`` ((n, 2) in the original image's pixels, ordered as ``heads/delg_local.py`` stores
    them) and ``descriptors`` ((n, d) unit rows) or ``descriptor_bits`` (packed sign bits) are the core's
    convention: ``match`` and :meth:`RetrievalModule.explain_pair` then draw the inliers of
    :func:`retrieval_lightning.retrieval.geometry.match_and_verify` under the head's ``match_options`` (a dict of
    its keyword arguments), unless the head overrides :meth:`RerankHead.explain`. Its :meth:`RerankHead.score` is
    its own: :func:`retrieval_lightning.retrieval.geometry.verify_shortlist` scores a shortlist by inlier counts
    with the same options (``heads/delg_local.py`` uses it)."""

    role: ClassVar[str] = "local"


class VerifierHead(RerankHead):
    """Dense features scored by a learned verifier network (CVNet)."""

    role: ClassVar[str] = "verifier"


class SparsifierHead(Head):
    """Rewrites a verifier's stored entry into a smaller form the verifier still scores (CVNet-DS).

    - :meth:`entry_kinds` ``(verifier_kinds) -> {name: EntryKind}``: the sparse stored form;
    - :meth:`sparsify` ``(entries) -> entries``: dense verifier entries of database images -> sparse
      (applied at extraction; queries stay dense);
    - :meth:`densify` ``(entries) -> entries``: back to the verifier's form (unselected positions
      zero, or filled from the kept ones as ``gumbel_sparsifier``'s ``fill_sigma`` does by default)
      right before :meth:`RerankHead.score`, without the :meth:`consumed_kinds` (checked against the
      verifier's kinds).

    The verifier's stored layout it rewrites is the verifier's own: ``cvnet_verifier``'s is in its
    ``entry_kinds`` docstring.

    :meth:`attach` is called once by the module with the verifier it serves.
    """

    role: ClassVar[str] = "sparsifier"

    def attach(self, verifier: RerankHead) -> None:
        self.verifier = [verifier]  # a list: not registered as a submodule (no duplicate parameters)

    def entry_kinds(self, verifier_kinds: Mapping[str, EntryKind]) -> dict[str, EntryKind]:
        raise NotImplementedError

    def sparsify(self, entries: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def densify(self, entries: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def consumed_kinds(self, verifier_kinds: Mapping[str, EntryKind]) -> set[str]:
        """Kinds of the verifier's dense entries that only :meth:`sparsify` reads (a selection input):
        neither stored nor given back by :meth:`densify`. Default: none."""
        return set()

    def kept_cells(self, entry: Mapping[str, Tensor]) -> np.ndarray | None:
        """Optional: (h, w) bool map of the locations a stored (sparse) entry keeps, at its finest
        level, for pictures; ``None`` when the entry is not sparse or the head cannot say."""
        return None
