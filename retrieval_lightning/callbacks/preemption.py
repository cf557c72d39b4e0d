"""The on-exception checkpoint of a preempted or interrupted ``fit``, taken where every rank agrees to stop.

Why: a SLURM preemption sends SIGTERM, a user presses Ctrl-C. Each rank notices the signal at its own point
of its own batch, but writing a checkpoint is a collective, and so is every training step under DDP: ranks
that stop at different batches hang. Lightning's own SIGTERM handler broadcasts from rank 0 inside the signal
handler; that broadcast meets whatever collective the other rank is in at that moment (measured on 2 gloo
ranks: SIGTERM to rank 0 before its forward and to rank 1 after its backward hung both until killed, without
a checkpoint). Here a signal only sets a flag; the ranks agree on the flags in one small all-reduce after each
training batch that steps the optimiser and after each validation batch, and stop together.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
import torch
from torch.distributed import ReduceOp

from retrieval_lightning.divergence import TrainingDivergedError, non_finite_tensors


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's on-exception checkpoint (SIGTERM / preemption, Ctrl-C, a crash mid-run), written only once
    this process has trained a step (a resumed run's restored step count does not count).

    Why: with this callback configured, a ``fit`` without ``--ckpt_path`` resumes from the newest of
    ``last.ckpt`` and ``on_exception.ckpt`` (Lightning's fault-tolerant default). A run that failed
    before its first step (a frozen head nobody trained, an unreadable image in the sanity check)
    would otherwise leave a checkpoint of that failed start, and the corrected command would resume
    it: the broken model back, or a loop restored mid-sanity-check that trains nothing.

    So that the checkpoint is one a run resumes exactly, and every rank writes it:

    - **SIGTERM** stops every rank after the same training batch, one where the optimiser stepped (no
      checkpoint holds accumulated gradients), or after the same batch of a validation (which the resumed
      run then runs again: :class:`~retrieval_lightning.callbacks.ResumeState`). Forwarded to the ranks
      Lightning's launcher started, as Lightning does; a second SIGTERM changes nothing.
    - **Ctrl-C** stops at the end of the training batch being trained (one where the optimiser stepped), or of
      the validation batch, on every rank; a checkpoint taken mid-step would hold a loader that fetched a batch
      the model never finished. A second Ctrl-C stops at once.
    - **SIGTERM at an epoch's end**: Lightning stops after counting the epoch as done but before resetting
      its batch counter, so a resumed run would take the next epoch as done too and skip its data. The
      counter is reset before the checkpoint is written.
    """

    _trained = False
    _interrupted = False  # Ctrl-C seen by this process
    _terminated = False  # SIGTERM seen by this process
    _agree_per_validation_batch = False
    _handlers: dict[int, Any] = {}
    _trainer: pl.Trainer | None = None
    _pid = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interrupted = self._terminated = False
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._handlers = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
                              signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm)}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The handlers of before ``fit`` trained, after a stop too (Lightning ignores Ctrl-C while it shuts
        down, and puts back its own SIGTERM handler's predecessor after this, if this runs first)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._handlers.items():
            if signal.getsignal(signum) in (self._on_sigint, self._on_sigterm) and previous is not None:
                signal.signal(signum, previous)
        self._handlers = {}

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the trainer stops them
            return
        if self._interrupted:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nCtrl-C: stopping after this batch with a checkpoint to resume from (Ctrl-C again to stop at "
              "once)", file=sys.stderr, flush=True)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid or self._terminated:  # a DataLoader worker, or a second SIGTERM
            return
        self._terminated = True
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        print(f"[rank: {rank}] SIGTERM: stopping with a checkpoint at a batch every rank agrees on",
              file=sys.stderr, flush=True)
        launcher = trainer.strategy.launcher if trainer is not None else None
        if launcher is not None:  # the ranks this process started (Lightning's launcher) stop with it
            launcher.kill(signum)
        self._call_other_sigterm_handlers(signum, frame)

    def _call_other_sigterm_handlers(self, signum: int, frame: Any) -> None:
        """Handlers Lightning composed with its own (one registered before ``fit``), without Lightning's
        notifier: its broadcast is the one this callback replaces."""
        lightning = self._handlers.get(signal.SIGTERM)
        connector = getattr(self._trainer, "_signal_connector", None)
        notifier = getattr(connector, "_sigterm_notifier_fn", None)
        for handler in getattr(lightning, "signal_handlers", []):
            if callable(handler) and handler != notifier:
                handler(signum, frame)

    def _agree(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        """(Ctrl-C, SIGTERM): whether any rank saw each. A collective: every rank calls it at the same batch."""
        if trainer.world_size == 1:
            return self._interrupted, self._terminated
        flags = torch.tensor([self._interrupted, self._terminated], dtype=torch.int32,
                             device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        interrupted, terminated = (bool(flag) for flag in flags.tolist())
        return interrupted, terminated

    def _stop_for_sigterm(self, trainer: pl.Trainer) -> None:
        """Lightning stops where it checks its flag next: after this batch (training or validation)."""
        self._terminated = True
        trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._trained = True
        # only where the optimiser stepped: accumulated gradients are not in a checkpoint (every rank is at the
        # same batch, so every rank takes part in this all-reduce or none does)
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self._stop_for_agreed_signals(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a SIGTERM since the epoch's last batch: stop before the next epoch's data (Lightning stops once it counted
        # the epoch as done); Ctrl-C waits for the next batch, as Lightning has not yet counted it
        if self._agree(trainer)[1]:
            self._stop_for_sigterm(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A SIGTERM stops a validation of ``fit`` at a batch all ranks agree on when every rank has as many
        batches (Lightning's DDP sampler pads the eval sets to equal shares); otherwise at its end."""
        self._agree_per_validation_batch = False
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.world_size == 1:
            self._agree_per_validation_batch = True
            return
        batches = float(sum(trainer.num_val_batches))
        bounds = torch.tensor([batches, -batches], dtype=torch.float64, device=trainer.strategy.root_device)
        most, minus_least = trainer.strategy.reduce(bounds, reduce_op=ReduceOp.MAX).tolist()
        self._agree_per_validation_batch = batches < float("inf") and most == -minus_least

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._agree_per_validation_batch and self._stops_in_this_validation(trainer):
            self._stop_for_agreed_signals(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if not self._agree_per_validation_batch and self._stops_in_this_validation(trainer):
            self._stop_for_agreed_signals(trainer)  # before the next training batch

    @staticmethod
    def _stops_in_this_validation(trainer: pl.Trainer) -> bool:
        """Not after a batch inside a gradient accumulation: its gradients are in no checkpoint (the signal
        waits for the batch where the optimiser steps)."""
        return not trainer.fit_loop.epoch_loop._should_accumulate()

    def _stop_for_agreed_signals(self, trainer: pl.Trainer) -> None:
        """Inside or right after a validation: Ctrl-C stops now, SIGTERM where Lightning checks next. The
        validation cut short runs again when the run resumes (:class:`~retrieval_lightning.callbacks.ResumeState`),
        so neither waits for the rest of a long one."""
        interrupted, terminated = self._agree(trainer)
        last = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps  # Lightning skips a finished fit
        if (interrupted or terminated) and trainer.validating and last:
            if trainer.is_global_zero:
                print(f"this validation is the run's last (step {trainer.global_step}): a resumed fit has nothing to "
                      "train and does not run it; `retrieval-lightning validate` with the same --config and the "
                      "checkpoint gives its metrics", file=sys.stderr, flush=True)
        if interrupted:
            raise CoordinatedStop("Ctrl-C")
        if terminated:
            self._stop_for_sigterm(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a resumed run that fails while it starts (other settings than its checkpoint's) has global_step > 0
        # from the checkpoint; its on-exception file would be newer than last.ckpt and shadow it
        if not (self._trained and trainer.global_step > 0):
            if isinstance(exception, (SIGTERMException, CoordinatedStop)) and trainer.is_global_zero:
                print(f"no {self.ckpt_path} written: this run had not trained a step (a checkpoint it resumed "
                      "from still holds where it stood)", file=sys.stderr, flush=True)
            return
        if isinstance(exception, TrainingDivergedError) or (
                pl_module is not None and non_finite_tensors(dict(pl_module.named_parameters()))):
            if trainer.is_global_zero:  # a diverged state resumed diverges again; the last finite one is kept
                print(f"no {self.ckpt_path} written: the run diverged (NaN/Inf), and its latest checkpoint is "
                      "its last finite state", file=sys.stderr, flush=True)
            return
        if trainer.world_size > 1 and not isinstance(exception, (SIGTERMException, CoordinatedStop)):
            # one rank failed alone (an error, an unreadable image): saving is a collective the other ranks,
            # waiting in the step's all-reduce, never join, and every rank would hang until a timeout
            if trainer.is_global_zero:
                print(f"no {self.ckpt_path} written: under DDP an error (not a preemption or a Ctrl-C every rank "
                      "agreed on) writes none, saving being a collective a failed rank cannot join; resume from "
                      "last.ckpt or the latest step checkpoint", file=sys.stderr, flush=True)
            return
        _reset_finished_epochs_batch_counter(trainer)
        if not isinstance(exception, (SIGTERMException, CoordinatedStop)):
            _rewind_unapplied_batch(trainer)
        super().on_exception(trainer, pl_module, exception)


class CoordinatedStop(KeyboardInterrupt):
    """The Ctrl-C stop every rank agreed on, at the same batch (a checkpoint is then a collective they all join)."""


def _rewind_unapplied_batch(trainer: pl.Trainer) -> None:
    """An error inside a step (a head's bug, an out-of-memory in the step or moving the batch to the device) comes
    after its batch was fetched and before the optimiser applied it: the loaders would be saved one batch on, and
    the resumed run would never train on that batch. Loaders that can (a ``rewind_to(batches)`` method, as the
    shipped datamodules' have) go back to the epoch's processed batches."""
    fit_loop = getattr(trainer, "fit_loop", None)
    combined = getattr(fit_loop, "_combined_loader", None)
    if fit_loop is None or combined is None:
        return
    processed = fit_loop.epoch_loop.batch_progress.current.processed
    for loader in combined.flattened:
        rewind_to = getattr(loader, "rewind_to", None)
        if callable(rewind_to):
            rewind_to(processed)


def _reset_finished_epochs_batch_counter(trainer: pl.Trainer) -> None:
    """Between an epoch counted as done and the next one's start, the batch counter still holds the finished
    epoch's count: reset it, as the next epoch's start would, so the checkpoint resumes at that epoch's start."""
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    if epochs.ready == epochs.completed and batches.current.ready > 0:
        batches.reset_on_run()
