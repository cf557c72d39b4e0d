"""`RetrievalModule`: a backbone plus a dict of role -> head, trained and evaluated by Lightning.

Training sums each head's named losses with a per-head weight. Evaluation (multi-scale global descriptors of
every eval set, gathered from all ranks, re-ranked, scored on every rank) is
:class:`~retrieval_lightning.eval_loop.EvaluationLoop`'s; the Python API (``embed_image``, ``rerank_scores``, ...)
:class:`~retrieval_lightning.inference_api.InferenceAPI`'s; the checks of weights nothing trained
:class:`~retrieval_lightning.untrained_checks.UntrainedChecks`'.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import Tensor, nn

from retrieval_lightning.backbone import Backbone
from retrieval_lightning.checkpoints import (ARCHITECTURE_KEY, PLUGINS_KEY, check_state_fits, load_tensor_file,
                                             state_dict_of)
from retrieval_lightning.ddp_training import allow_unreached_parameters, decorrelate_ranks, unreached_stages
from retrieval_lightning.divergence import (
    TrainingDivergedError,
    check_finite_weights,
    check_labels,
    check_loss,
    non_finite_tensors,
)
from retrieval_lightning.errors import UsageError
from retrieval_lightning.eval_loop import EvaluationLoop
from retrieval_lightning.evaluation import EvalResult
from retrieval_lightning.imprint import imprint_heads, is_resuming
from retrieval_lightning.inference_api import InferenceAPI, accepts_keyword
from retrieval_lightning.layers.scale_resize import SCALE_RESIZES
from retrieval_lightning.head import ROLES, GlobalHead, Head, RerankHead, SparsifierHead
from retrieval_lightning.optim import OptimConfig, build_optimizer, split_decay
from retrieval_lightning.model_record import architecture_of, build_from_architecture, plugin_sources
from retrieval_lightning.momentum_contrast import CHECKPOINT_KEY as MOMENTUM_QUEUE_KEY
from retrieval_lightning.momentum_contrast import PREFIX as MOMENTUM_PREFIX
from retrieval_lightning.momentum_contrast import MomentumContrast, MomentumContrastConfig
from retrieval_lightning.retrieval.postprocess import PostProcessConfig
from retrieval_lightning.retrieval.rerank import RerankConfig
from retrieval_lightning.retrieval.rerank_eval import RerankEntryWriter
from retrieval_lightning.retrieval.spill import SpillConfig
from retrieval_lightning.untrained_checks import UntrainedChecks

DEFAULT_EVAL_SCALES = (0.7071, 1.0, 1.4142)


class IncompatibleCheckpointError(ValueError):
    """``init_from`` names a checkpoint whose tensors do not fit this model."""


class RetrievalModule(InferenceAPI, UntrainedChecks, EvaluationLoop, pl.LightningModule):
    """Backbone + ``heads: {role: Head}``.

    Args:
        backbone: the feature extractor (stages the heads read are added automatically).
        heads: one head per role (``global``, ``local``, ``verifier``, ``sparsifier``).
        num_classes: training classes (linked from the datamodule by the CLI).
        loss_weights: weight per role (default 1.0).
        detach: roles whose losses must not train the backbone (DELG's local head).
        freeze: ``"backbone"`` and/or roles whose parameters stay fixed (CVNet's later stages).
        init_from: checkpoint to initialise from (an earlier stage of a recipe); tensors whose
            names exist in this model must fit in shape, others are reported and left.
        optim: optimiser and LR schedule (see :class:`~retrieval_lightning.optim.OptimConfig`).
        eval_scales: image scales of the multi-scale global descriptor.
        eval_resize: how an image is resized to each scale: ``antialias`` (default), ``bilinear``
            (DELG's ``tf.image.resize``) or ``opencv`` (the official CVNet tester); see
            :mod:`retrieval_lightning.layers.scale_resize`.
        search_chunk: database rows scored at once during search (memory bound).
        freeze_bn: keep the backbone's BatchNorm statistics fixed while training (as
            cnnimageretrieval-pytorch fine-tunes): small or oddly distributed fine-tuning sets
            otherwise drag the ImageNet statistics away from what the test images need.
        rerank: how ``test``/``validate`` re-rank the global shortlist when a re-ranking head
            (``local`` or ``verifier``) is configured (see
            :class:`~retrieval_lightning.retrieval.rerank.RerankConfig`).
        postprocess: α-query expansion and/or DBA applied to the global descriptors before
            evaluation (off by default; see :class:`~retrieval_lightning.retrieval.postprocess.PostProcessConfig`).
        momentum_contrast: CVNet-Global's momentum-contrastive loss on the global descriptor, beside the
            global head's classifier (off by default; see
            :class:`~retrieval_lightning.momentum_contrast.MomentumContrastConfig`).
        spill: under DDP, gathered descriptors (evaluation, hard-negative mining) of at least
            ``spill.min_bytes`` (default 1 GiB) go to one memory-mapped file per machine in ``spill.dir``
            (default: the system's temporary directory, ``TMPDIR``) instead of a copy in every rank's memory
            (see :mod:`~retrieval_lightning.retrieval.spill`); ``min_bytes: null`` keeps them in memory.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: dict[str, Head],
        num_classes: int = 0,
        loss_weights: dict[str, float] | None = None,
        detach: Sequence[str] = (),
        freeze: Sequence[str] = (),
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        eval_scales: Sequence[float] = DEFAULT_EVAL_SCALES,
        eval_resize: str = "antialias",
        search_chunk: int = 65536,
        freeze_bn: bool = False,
        rerank: RerankConfig | None = None,
        postprocess: PostProcessConfig | None = None,
        momentum_contrast: MomentumContrastConfig | None = None,
        spill: SpillConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "heads"])
        for key, value in list(self.hparams.items()):  # plain values, so a resumed checkpoint loads weights-only
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = dataclasses.asdict(value)
        #: state-dict names ever loaded into this module (``init_from``, checkpoints, ``load_state_dict``)
        self._loaded_tensors: set[str] = set()
        self._fitted_here = False  # whether fit ran on this module (its heads are then trained, not random)
        self._batch_checked = False  # the global batch is compared with optim.reference_batch once
        self._momentum_restored = True  # False: a resumed checkpoint lacked the momentum copy (fit resets it)
        if not heads:
            raise ValueError("RetrievalModule needs at least one head")
        for role, head in heads.items():
            if isinstance(head, nn.Module) and "_parameters" not in vars(head):  # read as a missing attribute
                raise UsageError(f"head {type(head).__name__} ({role!r}) was not initialised as a module: its "
                                 "__init__ must call super().__init__() first")
            if role not in ROLES:
                raise ValueError(f"heads key {role!r} is not a role; roles are {ROLES}")
            if head.role != role:
                raise ValueError(f"head {type(head).__name__} has role {head.role!r} but is configured under {role!r}")
        self.backbone = backbone
        for head in heads.values():
            backbone.require(head.stages)
            if not head.is_built:
                head.build(backbone.stage_channels, num_classes)
        self.heads = nn.ModuleDict(heads)
        self.num_classes = num_classes
        stray = sorted(set(loss_weights or {}) - set(heads))
        if stray:  # a misspelt role would train its head at weight 1.0, silently
            raise ValueError(f"loss_weights name {stray}, which are not configured heads {sorted(heads)}")
        self.loss_weights = {role: float((loss_weights or {}).get(role, 1.0)) for role in heads}
        unknown = [r for r in list(detach) + list(freeze) if r != "backbone" and r not in heads]
        if unknown:
            raise ValueError(f"detach/freeze name {unknown}, which are not configured heads {sorted(heads)}")
        self.detach = set(detach)
        self.frozen = set(freeze)
        self.optim = optim or OptimConfig()
        stray = sorted(set(self.optim.head_lr_mult) - set(heads))
        if stray:  # a misspelt role would train its head at the full lr, silently
            raise ValueError(f"optim.head_lr_mult names {stray}, which are not configured heads {sorted(heads)}")
        self.eval_scales = tuple(float(s) for s in eval_scales)
        if not self.eval_scales or not all(math.isfinite(s) and s > 0 for s in self.eval_scales):
            # [] embedded nothing; a scale <= 0 described every image from one pixel, silently
            raise ValueError(f"eval_scales must be one or more finite factors > 0, got {list(eval_scales)}")
        if int(search_chunk) < 1:
            raise ValueError(f"search_chunk must be >= 1 (database rows scored at a time), got {search_chunk}")
        if eval_resize not in SCALE_RESIZES:
            raise ValueError(f"eval_resize must be one of {SCALE_RESIZES}, got {eval_resize!r}")
        self.eval_resize = eval_resize
        self.search_chunk = int(search_chunk)
        self.freeze_bn = bool(freeze_bn)
        self.rerank = rerank if rerank is not None else RerankConfig()
        self.postprocess = postprocess
        self.spill = spill if spill is not None else SpillConfig()
        self._attach_rerank_heads()
        self.momentum_contrast = self._momentum_contrast(momentum_contrast)
        self._apply_freeze()
        if init_from:
            self.initialise_from(init_from)
        #: per eval loader: (dataset indices, descriptors, unreadable flags) of each batch
        self._eval_buffers: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self._rerank_writers: dict[int, RerankEntryWriter] = {}
        #: per eval set, the last evaluation (re-ranked when the model re-ranks) and its global-only one
        self.last_eval: dict[str, EvalResult] = {}
        self.last_eval_global: dict[str, EvalResult] = {}

    # ------------------------------------------------------------------ set-up
    def _frozen_modules(self) -> list[nn.Module]:
        return [self.backbone if name == "backbone" else self.heads[name] for name in sorted(self.frozen)]

    def _apply_freeze(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "RetrievalModule":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen BatchNorm keeps its running statistics
        if mode and self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _quiet_intended_eval_modules(self) -> None:
        """Lightning warns at the start of training about every module left in eval mode; frozen parts
        (and BatchNorm under ``freeze_bn``) are in eval mode on purpose. When those are all of them, the
        warning is replaced by one line naming them; any other module in eval mode keeps the warning."""
        intended = {id(m) for part in self._frozen_modules() for m in part.modules()}
        if self.freeze_bn:
            intended |= {id(sub) for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                         for sub in m.modules()}  # timm's BatchNormAct2d holds its activation
        copy = self.momentum_contrast
        if copy is not None:  # the momentum copy embeds keys in eval mode by design
            intended |= {id(m) for part in (copy.backbone, copy.head) for m in part.modules()}
        in_eval = [m for m in self.modules() if not m.training]
        if in_eval and all(id(m) in intended for m in in_eval):
            warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start")
            parts = sorted(self.frozen) + (["the backbone's BatchNorm (freeze_bn)"] if self.freeze_bn else [])
            parts += ["momentum_contrast's momentum copy"] if copy is not None else []
            rank_zero_info(f"in eval mode while training, as configured: {', '.join(parts)}")

    def _attach_rerank_heads(self) -> None:
        rerankers = [r for r, h in self.heads.items() if isinstance(h, RerankHead)]
        if len(rerankers) > 1:
            raise ValueError(f"configure one re-ranking head (local or verifier), got {rerankers}")
        sparsifier = self.heads["sparsifier"] if "sparsifier" in self.heads else None
        if sparsifier is not None:
            verifier = self.heads["verifier"] if "verifier" in self.heads else None
            if not isinstance(sparsifier, SparsifierHead) or verifier is None:
                raise ValueError("a sparsifier head rewrites a verifier's entries: configure heads.verifier too")
            sparsifier.attach(verifier)

    def _momentum_contrast(self, config: MomentumContrastConfig | None) -> MomentumContrast | None:
        if config is None:
            return None
        if {"backbone", "global"} <= self.frozen:
            raise ValueError("momentum_contrast trains the global descriptor, but model.freeze keeps both the "
                             "backbone and the global head fixed")
        return MomentumContrast(config, self.backbone, self.global_head)

    def is_training_only(self, name: str) -> bool:
        """Whether a state-dict entry exists only for training (see ``Head.training_only``; the momentum
        copy of ``momentum_contrast``)."""
        if name.startswith(MOMENTUM_PREFIX):
            return True
        for role, head in self.heads.items():
            prefix = f"heads.{role}."
            if name.startswith(prefix) and any(name[len(prefix):].startswith(t) for t in head.training_only):
                return True
        return False

    def load_weights(self, path: str | Path) -> None:
        """Load a full model's weights under :func:`~retrieval_lightning.checkpoints.check_state_fits`."""
        state = check_state_fits(self.state_dict(), state_dict_of(load_tensor_file(path)), self.is_training_only,
                                 str(path), evaluating=True)
        check_finite_weights(state, str(path))
        self.load_state_dict(state, strict=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``test --ckpt_path`` / resume: apply the strictness policy before Lightning's strict load."""
        if self.momentum_contrast is not None:
            # a checkpoint of a run without the contrast: the copy and the queue start afresh at fit start
            self._momentum_restored = MOMENTUM_QUEUE_KEY in checkpoint and any(
                k.startswith(MOMENTUM_PREFIX) for k in checkpoint["state_dict"])
            if MOMENTUM_QUEUE_KEY in checkpoint:
                self.momentum_contrast.load_checkpoint_state(checkpoint[MOMENTUM_QUEUE_KEY])
        own = self.state_dict()
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        state = check_state_fits(own, checkpoint["state_dict"], self.is_training_only,
                                 f"checkpoint {source}" if source else "checkpoint", evaluating=not fitting)
        check_finite_weights(state, f"checkpoint {source}" if source else "the checkpoint")
        if fitting:  # after the tensors: another model's checkpoint is named as that, not as changed groups
            self._check_optimizer_state_fits(checkpoint)
        for key in [k for k in own if k not in state]:
            state[key] = own[key]  # training-only tensors the file lacks keep their initialisation
        checkpoint["state_dict"] = state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, remembering which tensors now hold loaded values."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._loaded_tensors.update(state_dict)
        return result

    def on_test_start(self) -> None:
        self.warn_if_evaluating_random_heads("test")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":  # inside fit the heads are being trained
            self.warn_if_evaluating_random_heads("validate")

    def on_predict_start(self) -> None:  # ``extract``: features stored from random heads are as useless
        self.warn_if_evaluating_random_heads("extract")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_tensors(checkpoint["state_dict"])
        if bad:  # before ModelCheckpoint writes or rotates anything: the last finite checkpoint stays
            raise TrainingDivergedError(
                f"training diverged by step {self.global_step}: the weights hold NaN/Inf ({', '.join(bad[:5])}), so "
                "no checkpoint of them is written and the run's latest checkpoint is its last finite one: resume or "
                "--model.init_from it with a lower learning rate or a gradient clip (--trainer.gradient_clip_val)")
        checkpoint[ARCHITECTURE_KEY] = architecture_of(self)
        checkpoint[PLUGINS_KEY] = plugin_sources(self)
        if self.momentum_contrast is not None:
            checkpoint[MOMENTUM_QUEUE_KEY] = self.momentum_contrast.state_for_checkpoint()

    def save_checkpoint(self, path: str | Path) -> None:
        """Write a self-contained checkpoint (weights + architecture) without a Trainer."""
        torch.save({"state_dict": self.state_dict(), ARCHITECTURE_KEY: architecture_of(self),
                    PLUGINS_KEY: plugin_sources(self), "pytorch-lightning_version": pl.__version__}, str(path))

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **overrides: Any
    ) -> "RetrievalModule":
        """Rebuild backbone and heads from the checkpoint's own record (no config file), then load weights.

        ``overrides`` replace module arguments of the record (e.g. ``rerank=RerankConfig(k=20)``).
        """
        checkpoint = load_tensor_file(checkpoint_path)
        module = build_from_architecture(checkpoint, str(checkpoint_path), overrides)
        state = check_state_fits(module.state_dict(), state_dict_of(checkpoint), module.is_training_only,
                                 str(checkpoint_path))
        module.load_state_dict(state, strict=False)
        if map_location is not None:
            module.to(map_location)
        return module.eval()

    def initialise_from(self, path: str) -> None:
        """Copy every fitting tensor of a checkpoint; a shape conflict is an error naming the key, except in a
        training-only tensor (a classifier over another training set's classes: fine-tuning on other landmarks),
        which keeps its initialisation, said in a warning."""
        state = state_dict_of(load_tensor_file(path))
        own = self.state_dict()
        differ = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        conflicts = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                     for k in differ if not self.is_training_only(k)]
        if conflicts:
            raise IncompatibleCheckpointError(f"{path} does not fit this model: " + "; ".join(conflicts[:8]))
        if differ:
            rank_zero_warn(f"init_from {path}: training-only tensors of another shape keep their initialisation "
                           "(a classifier over another training set's classes; imprinted at fit start if its head "
                           "imprints): " + "; ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                                                     f"{tuple(own[k].shape)}" for k in differ[:8]))
        matched = {k: v for k, v in state.items() if k in own and k not in differ}
        if not matched:
            raise IncompatibleCheckpointError(
                f"{path}: no tensor name matches this model (checkpoint keys start {list(state)[:3]}, "
                f"model keys start {list(own)[:3]})"
            )
        check_finite_weights(matched, str(path))
        self.load_state_dict(matched, strict=False)
        skipped = len(own) - len(matched)
        if skipped:
            rank_zero_info(f"init_from {path}: loaded {len(matched)} tensors, {skipped} model tensors kept "
                           "their initialisation")

    # ------------------------------------------------------------------ training
    @property
    def global_head(self) -> GlobalHead:
        head = self.heads["global"] if "global" in self.heads else None
        if not isinstance(head, GlobalHead):
            raise RuntimeError("this model has no global head: evaluation needs one")
        return head

    def head_features(self, role: str, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        head = self.heads[role]
        detach = role in self.detach
        return {s: (features[s].detach() if detach else features[s]) for s in head.stages}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """The weighted sum of the trained heads' losses. Under DDP the losses are logged as the ranks' mean (one
        all-reduce each: their names are the same on every rank); what heads watch (``training_metrics``) is
        rank 0's, its names being the heads' own."""
        images, labels = batch["image"], batch["label"]
        sync = getattr(self._trainer, "world_size", 1) > 1
        check_labels(labels, self.num_classes, sync)  # before any head indexes a classifier with them
        if self.momentum_contrast is not None:
            self._momentum_follows_network(batch_idx)
        features = self.backbone(images)
        total = images.new_zeros(())
        named: dict[str, Tensor] = {}
        for role, head in self.heads.items():
            if role in self.frozen:
                continue
            extra = {k: batch[k] for k in ("pairs",) if k in batch and accepts_keyword(head.losses, k)}
            losses = head.losses(self.head_features(role, features), labels, **extra)
            _check_losses(role, head, losses)
            for name, value in losses.items():
                self.log(f"train/{role}/{name}", value, prog_bar=False, batch_size=len(labels), sync_dist=sync)
                named[f"train/{role}/{name}"] = value
                total = total + self.loss_weights[role] * value
            for name, value in head.training_metrics().items():
                if name in losses:
                    raise UsageError(f"{type(head).__name__} watches {name!r}, which is also one of its losses")
                self.log(f"train/{role}/{name}", value, prog_bar=False, batch_size=len(labels))
        if self.momentum_contrast is not None:
            contrast = self._momentum_contrast_loss(images, labels, features, sync)
            named["train/momentum_contrast/loss (weighted)"] = contrast
            total = total + contrast
        self.log("train/loss", total, prog_bar=True, batch_size=len(labels), sync_dist=sync)
        self._non_finite_steps = check_loss(total, named, int(getattr(self._trainer, "global_step", 0)), sync,
                                            str(getattr(self._trainer, "precision", "32-true")),
                                            getattr(self, "_non_finite_steps", 0),
                                            lambda: not non_finite_tensors(dict(self.named_buffers())))
        if not self._batch_checked and self.optim.reference_batch is not None and self._trainer is not None:
            self._batch_checked = True
            mismatch = self.optim.batch_mismatch(len(labels), self.trainer.world_size,
                                                 self.trainer.accumulate_grad_batches)
            if mismatch:
                rank_zero_warn(mismatch)
        return total

    def _momentum_follows_network(self, batch_idx: int) -> None:
        """The momentum copy's EMA step, once per optimiser step (its first micro-batch), before the batch's
        forward: that forward moves BatchNorm's running statistics by this rank's images, and a copy taken after
        it gave keys that depended on the rest of the batch, and other statistics on every DDP rank."""
        accumulated = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if batch_idx % accumulated == 0:
            assert self.momentum_contrast is not None
            self.momentum_contrast.update(self.backbone, self.global_head)

    def _momentum_contrast_loss(self, images: Tensor, labels: Tensor, features: Mapping[str, Tensor],
                                sync: bool = False) -> Tensor:
        contrast = self.momentum_contrast
        assert contrast is not None
        queries = self.global_head.embed(self.head_features("global", features))
        loss, with_positive = contrast.loss(queries, labels, images, owner=self)
        self.log("train/momentum_contrast/loss", loss, batch_size=len(labels), sync_dist=sync)
        self.log("train/momentum_contrast/with_positive", with_positive / max(1, len(labels)), batch_size=len(labels),
                 sync_dist=sync)
        return contrast.config.weight * loss

    def setup(self, stage: str) -> None:
        check_precision(str(self.trainer.precision))
        if stage == "fit":
            decorrelate_ranks(self.trainer.global_rank)
            allow_unreached_parameters(self.trainer, unreached_stages(
                {role: head.stages for role, head in self.heads.items()}, self.frozen, self.detach))

    def on_fit_start(self) -> None:
        # Lightning never calls train() before fitting: apply the frozen-module / freeze_bn modes here,
        # also when resuming (where no imprinting pass below would call it)
        self.train(self.training)
        self._quiet_intended_eval_modules()
        self._fitted_here = True
        if self.trainer.limit_train_batches == 0:  # Lightning then ends fit without a word, exit status 0
            rank_zero_warn("trainer.limit_train_batches is 0: fit trains nothing")
        if not is_resuming(self.trainer):  # a resumed run restores every tensor from its checkpoint
            self.check_frozen_heads_are_trained()
            self.warn_if_frozen_backbone_is_random()
            self.warn_if_sparsifier_learns_on_a_random_verifier()
            self.warn_if_one_class_trains_a_classifier()
        if self.momentum_contrast is not None:
            if not is_resuming(self.trainer):  # the copy starts as the network (after init_from)
                self.momentum_contrast.reset(self.backbone, self.global_head)
            elif not self._momentum_restored:
                rank_zero_warn("the resumed checkpoint holds no momentum_contrast copy (its run trained without it): "
                               "the copy starts as the network, with an empty queue")
                self.momentum_contrast.reset(self.backbone, self.global_head)
        # fresh start or after init_from only: a resumed checkpoint already holds the trained classifier
        imprint_heads(self, dict(self.heads.items()), self.frozen, self.num_classes)

    def on_train_start(self) -> None:
        # Lightning applies a resumed run's place in the epoch (the training loader's state) only when it
        # builds the loader after restoring the checkpoint; a run bounded by max_epochs has it built earlier,
        # by configure_optimizers' estimated_stepping_batches, and would restart the epoch from its first batch
        fit_loop = self.trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()
        if is_resuming(self.trainer):
            self._resync_learning_rates()

    def _resync_learning_rates(self) -> None:
        """A resumed run's optimiser comes back with the lr its old schedule set for the next step; the
        schedule itself is rebuilt from this run's step bound. When ``max_steps`` changed, the first resumed
        step trained at the old schedule's lr: set it from the new one (unchanged runs: the same value)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)

    def optimizer_groups(self) -> list[dict]:
        """The parameter groups of the optimiser: the backbone's and each trained head's, split by decay."""
        self.check_trained_heads_have_losses()  # Lightning asks for them before on_fit_start: the clearer error first
        groups = []
        if "backbone" not in self.frozen:
            lr = self.optim.lr * self.optim.backbone_lr_mult
            groups.append({"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr})
        for role, head in self.heads.items():
            if role not in self.frozen:
                lr = self.optim.lr * self.optim.head_lr_mult.get(role, 1.0)
                groups.extend(g for g in head.parameter_groups(lr) if g["params"])
        if not groups:
            raise UsageError(f"everything is frozen (model.freeze: {sorted(self.frozen)}): nothing to train. A "
                             "model that only evaluates needs no fit: test/extract/evaluate it as it is")
        return split_decay(groups, self.optim.weight_decay)

    def configure_optimizers(self) -> Any:
        return build_optimizer(self.optim, self.optimizer_groups(), self.trainer.estimated_stepping_batches)

    def _check_optimizer_state_fits(self, checkpoint: Mapping[str, Any]) -> None:
        """Resuming restores the optimiser's state: refuse, in one line, a state of another optimiser or of
        other parameter groups (a changed ``freeze`` or weight decay), which Lightning fails on with a bare
        ``KeyError`` or ``ValueError``."""
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or not isinstance(states[0], Mapping):
            return
        stored_sizes = [len(g.get("params", [])) for g in states[0].get("param_groups", [])]
        sizes = [len(g["params"]) for g in self.optimizer_groups()]
        record = ((checkpoint.get(ARCHITECTURE_KEY) or {}).get("module") or {}).get("optim") or {}
        stored_name = record.get("name", self.optim.name)
        if stored_sizes == sizes and stored_name == self.optim.name:
            return
        what = (f"optimiser {stored_name} -> {self.optim.name}" if stored_name != self.optim.name
                else f"parameter groups of {stored_sizes} -> {sizes} tensors (freeze or weight decay changed?)")
        raise UsageError(
            f"cannot resume: the checkpoint's optimiser state does not fit this run ({what}). Resume with the "
            f"checkpoint's settings, or start a new run from its weights with --model.init_from <checkpoint>"
        )


#: the trainer precisions this module runs in: fp32 weights, with or without autocast
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def check_precision(precision: str) -> None:
    """Refuse, before anything runs, a precision that casts the weights themselves (``bf16-true``, ``16-true``,
    ``64-true``): the heads keep parts of their arithmetic in fp32 on purpose (GeM's power, the margins, DELG's
    attention, the CVNet MLP's pooled input) and feed it to layers that such a precision has cast."""
    if precision not in SUPPORTED_PRECISIONS:
        raise UsageError(f"trainer.precision {precision!r} is not supported: the weights stay fp32 here, with "
                         f"autocast for speed; use one of {list(SUPPORTED_PRECISIONS)} (the GPU recipes: bf16-mixed)")


def _check_losses(role: str, head: Head, losses: Mapping[str, Any]) -> None:
    """A trained head's ``losses``: each a scalar tensor, at least one when the head has parameters to train
    (a plugin's mistakes named in one line, not Lightning's or autograd's error later)."""
    where = f"head {role!r} ({type(head).__name__}).losses"
    if not losses and any(p.requires_grad for p in head.parameters()):
        raise UsageError(f"{where} returned no loss, but the head has parameters to train (it is not in "
                         "model.freeze): return at least one scalar loss, or freeze it")
    for name, value in losses.items():
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UsageError(f"{where} returned {name!r} of shape {shape}; each loss must be a scalar tensor "
                             "(reduce it, e.g. .mean())")
