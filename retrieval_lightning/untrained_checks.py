"""Which heads hold weights nothing trained or loaded, and the warnings and refusals about them.

A frozen head or backbone that still holds its random initialisation, or an evaluation of random heads, makes a
run useless without failing; these checks say so before the work. Mixed into
:class:`~retrieval_lightning.module.RetrievalModule`.
"""

from __future__ import annotations

from typing import Iterable

from lightning.pytorch.utilities import rank_zero_warn

from retrieval_lightning.errors import UsageError
from retrieval_lightning.head import Head


class FrozenUntrainedError(UsageError):
    """``freeze`` keeps a head fixed whose weights were never trained or loaded (names the tensors)."""


class UntrainedChecks:
    """The random-weight checks of :class:`~retrieval_lightning.module.RetrievalModule` (its attributes)."""

    def untrained_frozen_tensors(self) -> dict[str, list[str]]:
        """Per frozen head, the tensors its build drew at random that nothing has loaded since."""
        return self.untrained_head_tensors(self.frozen - {"backbone"})

    def untrained_head_tensors(self, roles: Iterable[str]) -> dict[str, list[str]]:
        """Per head of ``roles``, the tensors its build drew at random that nothing has loaded since."""
        found = {}
        for role in sorted(roles):
            prefix = f"heads.{role}."
            keys = [prefix + n for n in self.heads[role].untrained_tensors() if prefix + n not in self._loaded_tensors]
            if keys:
                found[role] = keys
        return found

    def backbone_is_untrained(self) -> bool:
        """The backbone was built at random (``weights: null``) and nothing has loaded it since."""
        return getattr(self.backbone, "weights", "unknown") is None and not any(
            name.startswith("backbone.") for name in self._loaded_tensors)

    def warn_if_frozen_backbone_is_random(self) -> None:
        """A frozen backbone of random weights gives the heads random features to learn from: warn (a
        baseline may want it, so it is not refused as a frozen random head is)."""
        if "backbone" in self.frozen and self.backbone_is_untrained():
            rank_zero_warn("model.freeze keeps the backbone fixed, but its weights are random (backbone weights: "
                           "null) and nothing loaded them: the heads train on random features. Give backbone "
                           "weights, --model.init_from <ckpt>, or take the backbone out of model.freeze")

    def warn_if_sparsifier_learns_on_a_random_verifier(self) -> None:
        """A sparsifier learns which of the re-ranking head's features to keep: when that head trains
        along from random weights (nothing loaded it), the recipe's ``init_from`` was most likely
        forgotten (a frozen one is refused by :meth:`check_frozen_heads_are_trained`). Not refused:
        training both from scratch is a legitimate, if unusual, choice."""
        head = self.rerank_head
        if self.sparsifier is None or head is None or {"sparsifier", head.role} & self.frozen:
            return
        keys = self.untrained_head_tensors([head.role]).get(head.role)
        if keys:
            rank_zero_warn(f"the sparsifier trains against a {head.role} of random weights ({len(keys)} tensors, "
                           f"{', '.join(keys[:2])}, ... never trained or loaded): the sparsifier stage starts from "
                           "the verifier stage's checkpoint (--model.init_from <ckpt>)")

    def warn_if_one_class_trains_a_classifier(self) -> None:
        """A classifier over one class has a loss of 0 whatever it sees (a softmax over one logit): a run on a
        training set of one label trained nothing and said nothing. Warned, as a head without a classifier
        (training-only tensors) may still learn from it."""
        classifiers = [role for role, head in self.heads.items()
                       if role not in self.frozen and head.training_only and self.num_classes == 1]
        if classifiers:
            rank_zero_warn(f"the training set has one class: the classifier of {classifiers} has a loss of 0 on "
                           "every batch (a softmax over one logit) and trains nothing; train on two or more labels")

    def check_trained_heads_have_losses(self) -> None:
        """Refuse, before the first step, to train a head that has no ``losses`` (a parameter-free verifier)."""
        missing = [f"{type(head).__name__} ({role!r})" for role, head in self.heads.items()
                   if role not in self.frozen and type(head).losses is Head.losses]
        if missing:
            raise UsageError(f"{', '.join(missing)} {'implements' if len(missing) == 1 else 'implement'} no losses, "
                             "so fit cannot train it: freeze it (model.freeze) or implement "
                             "losses(features, labels[, pairs])")

    def check_frozen_heads_are_trained(self) -> None:
        """Refuse to fit around a frozen head of random weights (see :meth:`Head.untrained_tensors`)."""
        untrained = self.untrained_frozen_tensors()
        if not untrained:
            return
        where = (f"model.init_from ({self.hparams.get('init_from')}) does not hold them"
                 if self.hparams.get("init_from") else "model.init_from is not set")
        heads = "; ".join(f"{role!r}: {len(keys)} tensors ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                          for role, keys in untrained.items())
        raise FrozenUntrainedError(
            f"model.freeze keeps heads fixed whose weights were never trained or loaded: {heads}. {where}: "
            "give the checkpoint of the recipe stage that trained them (--model.init_from <ckpt>), "
            "or take the heads out of model.freeze"
        )

    def warn_if_evaluating_random_heads(self, stage: str) -> None:
        """Evaluating a head nobody trained or loaded (``test`` without ``--ckpt_path``/``init_from``) is
        almost always a mistake: say so, but go on (``finetune`` measures untrained baselines on purpose)."""
        if self._fitted_here:
            return
        untrained = self.untrained_head_tensors(self.heads.keys())
        if self.backbone_is_untrained():
            rank_zero_warn(f"{stage}: the backbone holds random weights (backbone weights: null) that were never "
                           "loaded, so every descriptor is of random weights; pass --ckpt_path or --model.init_from")
        if untrained:
            heads = ", ".join(f"{role!r} ({len(keys)} tensors, e.g. {keys[0]})" for role, keys in untrained.items())
            rank_zero_warn(f"{stage}: heads {heads} hold random weights that were never trained or loaded, so their "
                           "metrics are of random weights; pass --ckpt_path or --model.init_from with a trained "
                           "checkpoint")
