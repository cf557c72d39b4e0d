"""Random states of every rank in the checkpoint, restored on resume (bitwise-exact continuation).

Why: Lightning's checkpoint holds weights, optimiser and loop state, but not the random number
generators, so a resumed run draws different dropout masks and augmentations than the run it
continues. This callback gathers every rank's torch / CUDA / numpy / Python states into the
checkpoint (rank 0 writes it) and, on resume, gives each rank its own back just before the first
training batch, after everything that runs on a resume only (checkpoint loading, sanity checks).
It also records the W&B run id and step, which :func:`retrieval_lightning.loggers.continue_wandb_run`
reads to continue the same run, and corrects the loop state Lightning writes for a run stopped by
``max_steps``, so that a run extended past it numbers its epochs as an uninterrupted run. A checkpoint
written before the end of a validation that was due (a SIGTERM inside it, a step checkpoint just before it)
has the resumed run run that validation whole, from the random states it started with; one written as an
epoch ends resumes at the next epoch's start; the logger's step resumes where an uninterrupted run's is.
"""

from __future__ import annotations

from contextlib import contextmanager
import random
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

from retrieval_lightning.callbacks.unfinished_validation import (
    record_as_after_the_batch,
    run_again_on_resume,
    validation_due_here,
    validation_pending,
    warn_if_left_unrun,
)
from retrieval_lightning.distributed import gather_objects


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
    """Every rank's ``obj`` (every rank saves its checkpoint dict together, as Lightning does)."""
    return gather_objects(obj) if world_size > 1 else [obj]


class ResumeState(pl.Callback):
    """Checkpoint every rank's random states (and the W&B run id); restore them on resume. Also writes
    the loop state of a run stopped by ``max_steps`` as a resume expects it
    (:func:`record_a_max_steps_stop_as_resumable`), and runs again on resume a validation the checkpoint was
    written before the end of (:mod:`retrieval_lightning.callbacks.unfinished_validation`)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        # random states after the latest training batch, until a validation that follows it ends
        self._before_validation: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # taken here, not in on_validation_start: Lightning draws the validation loader's seed before that
        self._before_validation = collect_rng_states() if trainer.enable_validation else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._before_validation = None  # runs before the checkpoint callbacks (Lightning puts those last)

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        world_size = trainer.world_size if trainer is not None else 1
        pending = trainer is not None and validation_pending(trainer, started=self._before_validation is not None)
        # before a validation that the resumed run runs again: the states it started from
        rng = self._before_validation if pending and self._before_validation is not None else collect_rng_states()
        state: dict[str, Any] = {"rng": _gather(rng, world_size), "validation_pending": pending}
        run = _wandb_run(trainer)
        if run is not None:
            state["wandb"] = {"run_id": run.id, "step": int(run.step)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        record_a_max_steps_stop_as_resumable(trainer, checkpoint)
        # as state_dict() decided it for this checkpoint (Lightning writes the callbacks' states first): the
        # clock of a time-based interval could decide otherwise a moment later
        pending = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("validation_pending", False)
        if pending and not trainer.validating:
            record_as_after_the_batch(checkpoint)
            return
        record_an_epoch_end_as_the_next_epochs_start(trainer, checkpoint)
        count_a_counted_batch_once(trainer, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            warn_if_the_loader_restarts_the_epoch(trainer)
        if self._pending is None:
            return
        states = self._pending.get("rng", [])
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds random states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}: random states not restored (the run will not be bitwise "
                           "identical to an uninterrupted one)")
        else:
            restore_rng_states(states[trainer.global_rank])
        if self._pending.get("validation_pending"):  # older checkpoints: Lightning's own choice
            run_again_on_resume(trainer)
        self._pending = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None and self._pending.get("validation_pending"):  # the fit loop never started
            warn_if_left_unrun(trainer, trainer.global_step)
        self._pending = None


def warn_if_the_loader_restarts_the_epoch(trainer: pl.Trainer) -> None:
    """A run resumed inside an epoch continues from the batch after the checkpoint only when its training loader
    keeps its place (``state_dict`` / ``load_state_dict``, as every datamodule here builds it:
    ``datamodules.sampling.ResumableDataLoader``). A plain ``DataLoader`` starts the epoch again from its first
    batch, without a word from Lightning: the rest of that epoch trains on the batches already seen."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    if done == 0:
        return  # resumed at an epoch's start
    loaders = [loader for loader in tree_flatten(trainer.train_dataloader)[0] if isinstance(loader, DataLoader)]
    plain = sorted({type(loader).__name__ for loader in loaders
                    if not (callable(getattr(loader, "state_dict", None))
                            and callable(getattr(loader, "load_state_dict", None)))})
    if plain:
        rank_zero_warn(f"resumed inside epoch {trainer.current_epoch}, but the training loader "
                       f"({', '.join(plain)}) cannot restore its place in the epoch: it starts the epoch again from "
                       "its first batch, so the run is not the uninterrupted one. Build it as "
                       "datamodules.sampling.ResumableDataLoader (or any loader with state_dict/load_state_dict)")


def record_an_epoch_end_as_the_next_epochs_start(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint written as an epoch ends (``ModelCheckpoint(every_n_epochs=...)`` saves in
    ``on_train_epoch_end``), before Lightning counts the epoch as done, written as the next epoch's start (as
    a SIGTERM at an epoch's end is). Lightning resumed it inside the finished epoch: the next epoch's first
    batch was taken as the finished one's last, then another epoch began, and the rest of the next epoch's
    data was never trained on (measured: 15 of 16 batches skipped)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    if "epoch_progress" not in loop or "epoch_loop.batch_progress" not in loop:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    current = epochs["current"]
    if not current["ready"] == current["started"] == current["processed"] == current["completed"] + 1:
        return  # inside an epoch, or the epoch already counted as done
    if not (batches["is_last_batch"] or batches["current"]["ready"] >= trainer.num_training_batches):
        return
    for progress in epochs.values():  # "total" and "current"
        progress["completed"] = progress["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    checkpoint["epoch"] = current["completed"]


@contextmanager
def _loops_as_written(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> Iterator[None]:
    """The fit loop's progress counters as the checkpoint holds them (where a resumed run starts), meanwhile."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = {"epoch_progress": trainer.fit_loop.epoch_progress,
                "epoch_loop.batch_progress": trainer.fit_loop.epoch_loop.batch_progress}
    saved = {key: counter.state_dict() for key, counter in progress.items()}
    try:
        for key, counter in progress.items():
            if key in loop:
                counter.load_state_dict(loop[key])
        yield
    finally:
        for key, counter in progress.items():
            counter.load_state_dict(saved[key])


def count_a_counted_batch_once(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """The logger's step (``_batches_that_stepped``) of a checkpoint written once a training batch was counted
    (a SIGTERM that Lightning stops for after a batch and its validation, or at an epoch's end; an epoch-end
    checkpoint). Where Lightning's resume takes a validation as due, it skips it and counts that batch again,
    so the resumed run logged every step one ahead of an uninterrupted run. The count written is the one it
    had before."""
    if trainer.validating or trainer.sanity_checking or getattr(trainer, "_val_check_time_interval", None) is not None:
        return
    written = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("current", {})
    if written.get("processed") != written.get("completed"):
        return  # at a batch's hooks: not yet counted
    with _loops_as_written(trainer, checkpoint):  # Lightning decides where the resumed run starts
        due = not trainer.fit_loop.epoch_loop._should_accumulate() and validation_due_here(trainer)
    state = checkpoint["loops"]["fit_loop"].get("epoch_loop.state_dict", {})
    if due and state.get("_batches_that_stepped", 0) > 0:
        state["_batches_that_stepped"] -= 1


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
