"""The head contract: what every head plugin is and how the core calls it.

A head is an ``nn.Module`` with a **role** and the backbone **stages** it reads. The core builds
it in two steps: the plugin's constructor takes plain hyper-parameters (so a head can be made in
a notebook or from YAML), then :meth:`Head.build` is called once by
:class:`~retrieval_lightning.module.RetrievalModule` with the channel count of every stage the
head reads and the number of training classes, and creates the parameters.

Roles and their inference method:

- ``global``: :meth:`GlobalHead.embed` ``(features) -> (B, D)`` L2-normalised descriptors.
- ``local``: ``extract(features, meta) -> (keypoints, descriptors, scores)``.
- ``verifier``: ``dense(features)`` for storage, ``score(query, candidates) -> (K,)``.
- ``sparsifier``: ``sparsify(dense)`` to a smaller stored form the verifier still scores.

Every head returns its named training losses from :meth:`Head.losses`; the module weights and
sums them and logs each as ``train/<role>/<name>``.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

from torch import Tensor, nn

ROLES = ("global", "local", "verifier", "sparsifier")


class Head(nn.Module):
    """Base class of every head; subclasses set ``role`` and ``stages``."""

    role: ClassVar[str] = ""
    #: backbone stages read, by name (``conv4``, ``conv5``, ...); may be overridden per instance
    stages: tuple[str, ...] = ("conv5",)

    def __init__(self) -> None:
        super().__init__()
        self._built = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.role and cls.role not in ROLES:
            raise TypeError(f"{cls.__qualname__}.role={cls.role!r} is not one of {ROLES}")

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

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups; override to give some parameters their own lr/decay."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]


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

