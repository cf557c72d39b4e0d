"""A validation of ``fit`` that a checkpoint was written before the end of is run whole when the run resumes.

Why: Lightning resumes a checkpoint written after a training batch by skipping the validation due after that
batch, and its metrics and gallery were missing from the run. That covers a SIGTERM or Ctrl-C inside the
validation (the on-exception checkpoint) and a step checkpoint written on a validation step just before it
(the GLDv2 recipes write one every 5,000 or 10,000 steps). From a checkpoint on an epoch's last batch
Lightning also decided after rolling over to the next epoch (batch index -1, the next epoch's number), so it
ran validations nobody was due and skipped due ones.

Here the decision is taken when the checkpoint is written, where the uninterrupted run takes it. A checkpoint
written on a training batch's end that a validation follows is recorded as one written after that batch's
end, as a checkpoint written inside the validation is; on resume, the validation loop is marked as stopped
before its first batch, so that Lightning runs it whole before the next training batch, at that batch's place
and with its logger step. The random states restored are those the validation started from
(:class:`~retrieval_lightning.callbacks.ResumeState`).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn


def validation_pending(trainer: pl.Trainer, started: bool) -> bool:
    """Whether a checkpoint written now is one before the end of a validation of ``fit`` that is due: inside
    it (``started``: it began after the last training batch and has not ended), or at the end of a training
    batch it follows (with a time-based ``val_check_interval``, if its time is up now)."""
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or not trainer.enable_validation:
        return False
    if trainer.validating:
        return started
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    if batches.processed != batches.completed + 1:
        return False  # not at a training batch's end (its hooks run between the two counts)
    return validation_due_here(trainer)


def validation_due_here(trainer: pl.Trainer) -> bool:
    """Lightning's own decision, from the fit loop's counters as they are now: a validation follows this batch."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    return fetcher is not None and trainer.enable_validation and bool(
        trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))


def record_as_after_the_batch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written at a training batch's end, before the validation that follows, in the loop state
    of one written after the batch ended (as inside the validation): Lightning resumes such a checkpoint at that
    batch's place, where it rolled a finished epoch over first from the other."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if loop is None:
        return
    for part in ("total", "current"):
        if loop[part]["processed"] == loop[part]["completed"] + 1:
            loop[part]["completed"] = loop[part]["processed"]


def run_again_on_resume(trainer: pl.Trainer) -> None:
    """Mark the validation loop as stopped before its first batch: Lightning's first training step of the
    resumed run then runs it whole (its own restart of a validation cut mid-batch, from the start)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    stage = getattr(sys.modules[type(loop).__module__], "RestartStage", None)
    if stage is None or not hasattr(loop, "_restart_stage"):  # a Lightning without mid-evaluation restarts
        rank_zero_warn("this Lightning cannot run again on resume a validation the checkpoint was written before "
                       "the end of: it is skipped")
        return
    loop._restart_stage = stage.RESTARTED_MID_EVALUATION
    loop.batch_progress.current.reset()  # from its first batch: the stopped run's outputs are not in the checkpoint
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        trainer._last_val_time = float("-inf")  # its time was up: the resumed run's clock started just now


def warn_if_left_unrun(trainer: pl.Trainer, step: int) -> None:
    """A checkpoint at ``max_steps`` before its validation ended: the resumed fit has nothing to train, and
    Lightning skips the whole loop (the validation with it)."""
    rank_zero_warn(f"the validation of step {step} did not end before this checkpoint, and the run has nothing left "
                   "to train: `retrieval-lightning validate` with the same --config and this --ckpt_path gives its "
                   "metrics")
