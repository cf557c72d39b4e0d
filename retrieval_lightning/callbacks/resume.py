"""Random states of every rank in the checkpoint, restored on resume (bitwise-exact continuation).

Why: Lightning's checkpoint holds weights, optimiser and loop state, but not the random number
generators, so a resumed run draws different dropout masks and augmentations than the run it
continues. This callback gathers every rank's torch / CUDA / numpy / Python states into the
checkpoint (rank 0 writes it) and, on resume, gives each rank its own back just before the first
training batch, after everything that runs on a resume only (checkpoint loading, sanity checks).
It also records the W&B run id and step, which :func:`retrieval_lightning.loggers.continue_wandb_run`
reads to continue the same run, and corrects the loop state Lightning writes for a run stopped by
``max_steps``, so that a run extended past it numbers its epochs as an uninterrupted run. A run stopped
before a validation it was due to run ended (a SIGTERM inside it, a step checkpoint written just before
it) runs that validation again when it resumes, from the random states it started with.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
import torch.distributed as dist


def collect_rng_states() -> dict[str, Any]:
    """This process's generator states: torch, CUDA (if initialised), numpy, Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # plain types: weights_only loading works
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)  # every rank saves its checkpoint dict together (Lightning)
        return out
    return [obj]


class ResumeState(pl.Callback):
    """Checkpoint every rank's random states (and the W&B run id); restore them on resume. Also writes
    the loop state of a run stopped by ``max_steps`` as a resume expects it
    (:func:`record_a_max_steps_stop_as_resumable`), and re-runs on resume a validation that did not end
    (:func:`rerun_an_unfinished_validation`)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._validated_step = -1  # the global step of fit's last validation that ran to its end
        self._before_validation: dict[str, Any] | None = None  # random states a validation starts from
        self._rerunning = False  # resumed with a validation to run again, if one is due there

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # taken here, not in on_validation_start: Lightning draws the validation loader's seed before that
        self._before_validation = collect_rng_states() if trainer.enable_validation else None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rerunning and not trainer.sanity_checking:
            self._rerunning = False
            count_the_rerun_validations_step_once(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._rerunning = False  # no validation was due where the run resumed

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_step = trainer.global_step
            self._before_validation = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        world_size = trainer.world_size if trainer is not None else 1
        # stopped inside a validation (SIGTERM), the resumed run runs it again: from the states it started with
        validating = trainer is not None and trainer.validating and not trainer.sanity_checking
        rng = self._before_validation if validating and self._before_validation is not None else collect_rng_states()
        state: dict[str, Any] = {"rng": _gather(rng, world_size), "validated_step": self._validated_step}
        run = _wandb_run(trainer)
        if run is not None:
            state["wandb"] = {"run_id": run.id, "step": int(run.step)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        record_a_max_steps_stop_as_resumable(trainer, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        states = self._pending.get("rng", [])
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds random states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}: random states not restored (the run will not be bitwise "
                           "identical to an uninterrupted one)")
        else:
            restore_rng_states(states[trainer.global_rank])
        validated = self._pending.get("validated_step")
        if validated is not None:  # older checkpoints: Lightning's own choice
            self._validated_step = validated
            if validated != trainer.global_step:
                self._rerunning = rerun_an_unfinished_validation(trainer)
        self._pending = None


def rerun_an_unfinished_validation(trainer: pl.Trainer) -> bool:
    """Have a resumed run validate first if its checkpoint's step was due a validation it never finished.

    Lightning resumes a checkpoint written after a training batch by skipping the validation due after that
    batch: one a SIGTERM stopped half-way (the on-exception checkpoint), or one that had not started (a step
    checkpoint on a validation step, as the GLDv2 recipes write every 5,000 or 10,000 steps). Its metrics and
    gallery were then missing from the run. Marked as stopped mid-evaluation with no batch done, the loop runs
    that validation whole before the next training batch, if one is due here at all (Lightning decides, as for
    an uninterrupted run); the random states restored are those it started with."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    stage = getattr(sys.modules[type(loop).__module__], "RestartStage", None)
    if stage is None or not hasattr(loop, "_restart_stage"):  # a Lightning without mid-evaluation restarts
        rank_zero_warn("this Lightning cannot re-run on resume a validation the checkpoint stopped before its end: "
                       "it is skipped")
        return False
    loop._restart_stage = stage.RESTARTED_MID_EVALUATION
    loop.batch_progress.current.reset()  # from its first batch: the stopped run's outputs are not in the checkpoint
    return True


def count_the_rerun_validations_step_once(trainer: pl.Trainer) -> None:
    """The logger's step (``_batches_that_stepped``) as the validation re-run starts, as an uninterrupted run's.

    From a checkpoint written at a training batch's end, Lightning counts that batch as it resumes (its count is
    written before the batch adds it), and again after the validation that follows it: once too many for the
    rest of the run. Stopped inside the validation, the checkpoint's count resumes right."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop.restarted_on_train_batch_end and not epoch_loop._should_accumulate():
        epoch_loop._batches_that_stepped -= 1


def record_a_max_steps_stop_as_resumable(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Write the loop state of a run that stopped at ``max_steps`` so that a run resumed from it with a
    larger ``max_steps`` numbers its epochs as an uninterrupted run would.

    By the time ``last.ckpt`` is written at the end of training, Lightning has counted the epoch that
    ``max_steps`` ended as completed, which its resume logic does not expect. Stopped inside an epoch, the
    resumed run took that unfinished epoch as done; stopped at an epoch's last batch, it counted the epoch
    a second time. Either way its epoch ran one ahead for the rest of the run (its data did not: the
    loaders keep their place), in the logged ``epoch``, against ``max_epochs`` and in every-n-epochs
    callbacks. Inside an epoch, the epoch is written as a step checkpoint inside it holds it; at its end,
    the batch counter is reset, as the next epoch's start would (as for a SIGTERM at an epoch's end)."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if loop is None or trainer.max_steps == -1 or trainer.global_step < trainer.max_steps:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    total = epochs["total"]
    if not total["completed"] == total["processed"] == total["started"] == total["ready"] > 0:
        return  # written before the epoch was counted done (a step checkpoint on the last step): resumes right
    if batches["current"]["ready"] == 0:
        return  # between epochs already (a checkpoint this function wrote, loaded again)
    if batches["is_last_batch"] or batches["current"]["ready"] >= trainer.num_training_batches:
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False
        return
    for progress in epochs.values():  # "total" and "current"
        progress["processed"] = progress["completed"] = progress["ready"] - 1
    checkpoint["epoch"] = epochs["current"]["completed"]


def _wandb_run(trainer: pl.Trainer | None) -> Any:
    if trainer is None:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            return logger.experiment
    return None
