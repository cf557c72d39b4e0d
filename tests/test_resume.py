"""Fault tolerance: the demo recipe stopped by SIGTERM (preemption) or killed (SIGKILL) right after a
mid-epoch checkpoint, then resumed, ends with weights bitwise equal to an uninterrupted run's, on 1
process and on 2 (gloo); the offline W&B run keeps its id across the restarts.

The runs are CLI processes forked from an import server (``helpers.ForkedRun``; DDP ranks started as
torchrun starts them), with ``helpers.KillAfterStep`` to SIGKILL every rank at the start of the batch
after a given step; the killed 2-process run is the real console script, whose rank 0 re-launches
``sys.argv`` for rank 1. Reference and interrupted runs go in parallel to keep the wall time down.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from _validated_linear import fit as fit_validated
from helpers import CLI, REPO, TINY_DATA, ForkedRun, ddp_env, finished, run_main, start_ddp

MAX_STEPS = 12  # 80 training images, batch 8: 10 batches per epoch on 1 process, 5 per rank on 2


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments/demo.yaml with a checkpoint every 3 steps (all kept) and no test-time gallery."""
    cfg = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    callbacks = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("RetrievalGallery")]
    for cb in callbacks:
        if cb["class_path"].endswith(".ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=3, save_top_k=-1)
    cfg["trainer"]["callbacks"] = callbacks
    path = tmp_path_factory.mktemp("resume_cfg") / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def args(config: Path, cache_root: Path, out: Path, *extra: str, wandb: bool = False) -> list[str]:
    logger = [f"--trainer.logger.init_args.save_dir={out}/wandb", "--trainer.log_every_n_steps=1"] if wandb \
        else ["--trainer.logger=false"]
    return ["fit", "--config", str(config), f"--data.init_args.root={cache_root}", *TINY_DATA,
            f"--trainer.max_steps={MAX_STEPS}", f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false", *logger, *extra]


def kill_after(step: int) -> list[str]:
    return ["--trainer.callbacks+=helpers.KillAfterStep", f"--trainer.callbacks.step={step}"]


def finish(runs: ForkedRun | list[ForkedRun], expect: int | None = 0) -> str:
    """Wait for the run (every rank); its exit code must be ``expect`` (``None``: any). What it printed."""
    done = finished(runs, expect)
    return done.stdout + done.stderr


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def assert_bitwise_equal(resumed: Path, reference: Path) -> None:
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} tensors differ, e.g. {sorted(differ.items(), key=lambda x: -x[1])[:3]}"


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb" / "wandb").glob("offline-run-*"))


def logged_steps(run: Path) -> set[int]:
    """``trainer/global_step`` values in an offline run file (protobuf items: key, then value_json)."""
    data = next(run.glob("run-*.wandb")).read_bytes()
    found = re.finditer(rb"\x13trainer/global_step\x82\x01([\x01-\x7f])", data)
    return {int(data[m.end():m.end() + m.group(1)[0]]) for m in found}


def wait_for(path: Path, proc: ForkedRun, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
def test_preempted_then_killed_run_resumes_bitwise_in_the_same_wandb_run(config: Path, cache_root: Path,
                                                                          tmp_path: Path) -> None:
    """SIGTERM (preemption) -> on-exception checkpoint -> ``--ckpt_path last`` -> SIGKILL right after a
    mid-epoch checkpoint -> resumed from it: the weights of an uninterrupted run, one W&B run id."""
    ref, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = ForkedRun(args(config, cache_root, ref), tmp_path)

    first = ForkedRun(args(config, cache_root, out, wandb=True), tmp_path)
    wait_for(out / "checkpoints" / "step=0000003.ckpt", first)
    first.send_signal(signal.SIGTERM)  # what SLURM sends before preempting a job
    log = finish(first, expect=None)  # Lightning exits with SystemExit (code 0) after the checkpoint
    preempted = out / "checkpoints" / "on_exception.ckpt"
    assert preempted.exists(), log[-4000:]
    step = torch.load(preempted, weights_only=True)["global_step"]
    kill_at = 3 * (step // 3 + 1)  # the next interval checkpoint, mid-epoch (10 batches per epoch)
    assert 3 <= step < kill_at < MAX_STEPS  # stopped early, with a checkpoint of where it stopped

    log = finish(ForkedRun(args(config, cache_root, out, "--ckpt_path=last", *kill_after(kill_at), wandb=True),
                           tmp_path), expect=-signal.SIGKILL)
    assert f"Restoring states from the checkpoint path at {preempted}" in log  # "last" is the newest
    assert "imprinted" not in log  # the trained classifier is not replaced by a fresh imprint
    killed = out / "checkpoints" / f"step={kill_at:07d}.ckpt"
    assert killed.exists()

    finish(ForkedRun(args(config, cache_root, out, f"--ckpt_path={killed}", wandb=True), tmp_path))
    finish(reference)
    assert_bitwise_equal(out / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")

    runs = offline_runs(out)
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(runs) == 3 and len(ids) == 1, runs  # three processes, one continued run
    # each restart logs only the steps after its checkpoint: no step twice in the run's history (what the
    # SIGKILLed process had not yet handed to W&B is lost with it)
    steps = [logged_steps(r) for r in runs]
    assert steps[0] == set(range(step)), steps
    assert steps[1] <= set(range(step, kill_at)), steps
    assert steps[2] == set(range(kill_at, MAX_STEPS)), steps
    stored = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["ResumeState"]
    assert stored["wandb"]["run_id"] in ids


@pytest.mark.slow
def test_sigkilled_ddp_run_resumes_bitwise(config: Path, cache_root: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "reference", tmp_path / "killed"
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=9"]
    reference = start_ddp(args(config, cache_root, ref, *ddp), tmp_path)
    # the console script, as a user runs it: rank 0 re-launches sys.argv for rank 1, and both die
    env = ddp_env(extra_pythonpath=str(REPO / "tests"))
    killed = subprocess.run([CLI, *args(config, cache_root, out, *ddp, *kill_after(3))], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-6000:]
    ckpt = out / "checkpoints" / "step=0000003.ckpt"  # mid-epoch (5 batches per rank); the resume crosses epochs
    assert ckpt.exists()
    assert len(torch.load(ckpt, weights_only=True)["callbacks"]["ResumeState"]["rng"]) == 2  # both ranks' states
    finish(start_ddp(args(config, cache_root, out, *ddp, f"--ckpt_path={ckpt}"), tmp_path))
    finish(reference)
    assert_bitwise_equal(out / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module", params=["cvnet_demo", "cvnet_ds_demo"])
def verifier_config(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments/cvnet_demo.yaml (pair batches, hard negatives mined every epoch, a frozen global model;
    the resume callbacks of the GLDv2 stage configs) with a checkpoint every 3 steps (all kept); and the
    sparsifier stage, its verifier trained along (no checkpoint to start from), whose Gumbel noise comes
    from the global random generator that the resume restores, and whose run is bounded by max_epochs
    (Lightning then builds the training loader before it restores the loader's place in the epoch)."""
    cfg = yaml.safe_load((REPO / "experiments" / f"{request.param}.yaml").read_text())
    if request.param == "cvnet_ds_demo":
        cfg["model"]["freeze"] = ["backbone", "global"]
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c for c in cfg["trainer"]["callbacks"]}
    assert {"ModelCheckpoint", "PreemptionCheckpoint", "ResumeState", "HardNegativeMining"} <= set(callbacks)
    callbacks["ModelCheckpoint"]["init_args"].update(every_n_train_steps=3, save_top_k=-1)
    path = tmp_path_factory.mktemp("resume_verifier_cfg") / f"{request.param}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sigkilled_verifier_stage_resumes_bitwise(verifier_config: Path, cache_root: Path, tmp_path: Path) -> None:
    """The verifier stage's sampler state (pair groups, crops, the mined table of the epoch it stopped in)
    comes back exactly: killed mid-epoch and resumed, it ends with an uninterrupted run's weights. Epochs
    are 10 steps: the uninterrupted run keeps epoch 0's table in epoch 1 (its frozen global model did
    not change), the run killed in epoch 1 loads the table it saved when it resumes (the verifier stage), or
    mines it again where the file is gone (the sparsifier stage)."""
    ref, out = tmp_path / "reference", tmp_path / "killed"
    steps = "--trainer.max_steps=15"
    reference = ForkedRun(args(verifier_config, cache_root, ref, steps), tmp_path)
    killed = ForkedRun(args(verifier_config, cache_root, out, steps, *kill_after(12)), tmp_path)
    log = finish(killed, expect=-signal.SIGKILL)
    ckpt = out / "checkpoints" / "step=0000012.ckpt"
    assert ckpt.exists(), log[-3000:]
    saved, = (out / "mining").glob("table-*.npy")
    mines_again = verifier_config.stem == "cvnet_ds_demo"
    if mines_again:
        saved.unlink()
    resumed = finish(ForkedRun(args(verifier_config, cache_root, out, steps, f"--ckpt_path={ckpt}"), tmp_path))
    if mines_again:
        assert "hard-negative mining, epoch 1: 80 images" in resumed
    else:
        assert f"hard-negative mining, epoch 1: the table of an earlier run of the same global model and pool " \
               f"loaded ({saved})" in resumed
    assert "hard-negative mining, epoch 1: the table of epoch 0 kept" in finish(reference)
    assert_bitwise_equal(out / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")


def test_preemption_checkpoint_only_after_a_training_step(tmp_path: Path) -> None:
    """A run that fails before its first step leaves no checkpoint for the next ``fit`` to resume;
    one that fails later does (so a corrected command continues where it stopped)."""
    import lightning.pytorch as pl

    from retrieval_lightning.callbacks import PreemptionCheckpoint
    from test_module import _TinyData, make

    class FailAt(pl.Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.step:
                raise RuntimeError(f"failed at step {self.step}")

    for step in (0, 2):
        out = tmp_path / f"step{step}"
        trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", default_root_dir=out,
                             callbacks=[PreemptionCheckpoint(dirpath=str(out)), FailAt(step)])
        with pytest.raises(RuntimeError, match=f"failed at step {step}"):
            trainer.fit(make(num_classes=3), datamodule=_TinyData())
        saved = out / "on_exception.ckpt"
        assert saved.exists() == (step > 0)
        if step:
            assert torch.load(saved, weights_only=True)["global_step"] == step
    # resumed from that step-2 checkpoint and failing before it trains a step of its own: the restored
    # step count is not this run's, so no new file shadows the checkpoint it resumed
    resumed = saved.rename(tmp_path / "step2.ckpt")
    trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path / "step2",
                         callbacks=[PreemptionCheckpoint(dirpath=str(tmp_path / "step2")), FailAt(2)])
    with pytest.raises(RuntimeError, match="failed at step 2"):
        trainer.fit(make(num_classes=3), datamodule=_TinyData(), ckpt_path=resumed)
    assert not saved.exists()


def test_a_sigterm_inside_a_gradient_accumulation_stops_where_the_optimiser_steps(tmp_path: Path) -> None:
    """Lightning stops for SIGTERM after any batch; inside an accumulation the checkpoint held none of the
    accumulated gradients, and the resumed run stepped without that micro-batch (not bitwise). Held until
    the batch that steps, the resumed run ends as an uninterrupted one (2 micro-batches per step, dropout)."""
    accumulating = dict(accumulate_grad_batches=2, max_steps=6, limit_val_batches=0)
    uninterrupted, _ = fit_validated(tmp_path / "whole", **accumulating)
    # after the backward pass of the first micro-batch of step 3 (global step 2 while it trains)
    fit_validated(tmp_path / "stopped", signal_at=dict(at="after backward", step=2), **accumulating)
    ckpt = tmp_path / "stopped" / "on_exception.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3  # after its second micro-batch, not its first
    resumed, _ = fit_validated(tmp_path / "resumed", ckpt, **accumulating)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))


EPOCH_END_VALIDATION = dict(val_check_interval=1.0, max_steps=40, checkpoint_every=100)  # 16 batches per epoch
EVERY_2ND_EPOCH = dict(val_check_interval=8, check_val_every_n_epoch=2, max_steps=40, checkpoint_every=8)
STOPS = {  # how the run stops (a signal, or a checkpoint of the uninterrupted run), the step it resumes from
    "sigterm inside a validation": ({}, dict(at="validation", step=6), 6),
    "ctrl-c inside a validation": ({}, dict(at="validation", step=6, signum=signal.SIGINT), 6),
    "step checkpoint before a validation": ({}, "step=6.ckpt", 6),
    "step checkpoint, no validation due": ({}, "step=4.ckpt", 4),
    "checkpoint at a validation's end": ({}, "validated-step=6.ckpt", 6),
    "sigterm in a validation inside an accumulation": (dict(accumulate_grad_batches=2),
                                                       dict(at="validation", step=4), 5),
    "sigterm in a validation's only batch": (dict(limit_val_batches=1), dict(at="validation", step=6, batch=0), 6),
    "sigterm at an epoch's end": (EPOCH_END_VALIDATION, dict(at="epoch end", step=16), 16),
    "step checkpoint on an epoch's last batch, validation due": (EVERY_2ND_EPOCH, "step=32.ckpt", 32),
    "step checkpoint on an epoch's last batch, none due": (EVERY_2ND_EPOCH, "step=16.ckpt", 16),
    "checkpoint at an epoch's end": (EPOCH_END_VALIDATION, "epoch-step=16.ckpt", 16),
    "checkpoint at an epoch's end, validating every 5 batches": (dict(EPOCH_END_VALIDATION, val_check_interval=5),
                                                                 "epoch-step=16.ckpt", 16),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_resumed_run_validates_as_an_uninterrupted_one(tmp_path: Path, stop: str) -> None:
    """A validation due after the batch a checkpoint was written at, and not ended, runs whole when the run
    resumes (Lightning skipped it: metrics and gallery missing): cut by a SIGTERM or Ctrl-C, or not yet started
    when a step checkpoint was written (the GLDv2 recipes write one on every validation step). It runs from
    the random states it started with, at the uninterrupted run's logger step. None runs when none was due or
    it had ended; Lightning decided from an epoch's last batch after rolling over to the next epoch (batch
    index -1, the next epoch's number) and validated when nothing was due, or skipped what was. A signal
    inside a validation after a batch that did not step the optimiser waits for the batch that does (its
    gradients are in no checkpoint). A stop once the run's batch and validation were counted resumed one logger
    step ahead. A checkpoint written as an epoch ends (``every_n_epochs``) resumed inside the finished epoch and
    skipped 15 of the next epoch's 16 batches. Every case then ends with the uninterrupted run's weights, but
    a step checkpoint on an epoch's last batch with none due: there Lightning's resume still draws the
    validation loader's seed from the global generator, so only which validations run is checked."""
    trainer_args, how, resume_at = STOPS[stop]
    uninterrupted, validated = fit_validated(tmp_path / "whole", **trainer_args)
    if isinstance(how, dict):
        fit_validated(tmp_path / "stopped", signal_at=how, **trainer_args)
        ckpt = tmp_path / "stopped" / "on_exception.ckpt"
    else:
        ckpt = tmp_path / "whole" / how
    assert torch.load(ckpt, weights_only=True)["global_step"] == resume_at
    resumed, revalidated = fit_validated(tmp_path / "resumed", ckpt, **trainer_args)
    ended = {"checkpoint at a validation's end", "sigterm in a validation's only batch", "sigterm at an epoch's end",
             "checkpoint at an epoch's end"}
    expected = [v for v in validated if v[0] > resume_at or (v[0] == resume_at and stop not in ended)]
    if stop.endswith("none due"):
        assert [v[:3] for v in revalidated] == [v[:3] for v in expected] == [(24, 23, 3.0), (32, 31, 3.0)]
        return
    assert revalidated == expected
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))


def test_a_validation_cut_short_runs_again_with_a_time_based_interval(tmp_path: Path) -> None:
    """``val_check_interval`` as wall time (0.2 s; steps take 50 ms): the resumed run's clock starts when it
    does, and its first validation came only 0.2 s later, after training on, so the one cut short never ran.
    Which steps validate depends on the clock, so the run is compared with itself: the cut validation runs
    first, at its step, whole."""
    timed = dict(val_check_interval=timedelta(seconds=0.2), max_steps=12, step_seconds=0.05, checkpoint_every=100)
    _, stopped = fit_validated(tmp_path / "stopped", signal_at=dict(at="validation", step=None), **timed)
    ckpt = tmp_path / "stopped" / "on_exception.ckpt"
    cut_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < cut_at < 12 and stopped == []  # the first validation was cut
    _, revalidated = fit_validated(tmp_path / "resumed", ckpt, **timed)
    assert revalidated[0][0] == cut_at and revalidated[0][2] == 3.0


def test_a_run_stopped_in_its_last_validation_says_how_to_get_its_metrics(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """At ``max_steps`` a resumed fit has nothing to train and Lightning skips its loop, that validation with it:
    the stop and the resume say so, and which command gives the metrics."""
    fit_validated(tmp_path / "stopped", signal_at=dict(at="validation", step=9), max_steps=9)
    assert "this validation is the run's last (step 9)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="the validation of step 9 did not end before this checkpoint.*validate"):
        _, revalidated = fit_validated(tmp_path / "resumed", tmp_path / "stopped" / "on_exception.ckpt", max_steps=9)
    assert revalidated == []


def test_ddp_ranks_sigterminated_at_different_points_stop_together_and_resume_exactly(tmp_path: Path) -> None:
    """2 gloo ranks. Lightning's SIGTERM handler broadcasts from rank 0 inside the handler, into whatever
    collective the other rank is in: a SIGTERM reaching rank 0 as a step starts and rank 1 after its backward
    pass (its gradients' all-reduce done) hung both ranks without a checkpoint, and so did rank 1 signalled twice
    (the scheduler's SIGTERM and the one Lightning's launcher forwards from rank 0) inside a validation. The
    ranks now agree on the signals after each step and each validation batch: stopped in a training step, then
    in a validation, each time with a checkpoint, the run resumes to the uninterrupted run's validations (the
    cut one run again on both ranks) and weights."""
    script = Path(__file__).parent / "_validated_linear.py"

    def run(out: Path, ckpt: Path | None, stop: str = "") -> dict:
        finished(start_ddp([str(out), str(ckpt or "-"), stop], tmp_path, script=script), timeout=60)
        return torch.load(out / "fit.pt", weights_only=True)

    whole = run(tmp_path / "whole", None)
    assert [v[0] for v in whole["seen"]] == [3, 6]  # 8 batches per rank and epoch: every 3rd batch of an epoch
    out, ckpt = tmp_path / "stopped", tmp_path / "stopped" / "on_exception.ckpt"
    assert [v[0] for v in run(out, None, "training")["seen"]] == [3]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 5  # after the step both ranks were signalled in
    assert run(out, ckpt, "validation")["seen"] == []  # stopped inside step 6's validation
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6
    resumed = run(out, ckpt)
    assert resumed["seen"] == whole["seen"][1:]
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])


def test_under_ddp_only_a_stop_every_rank_takes_writes_the_exception_checkpoint(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Writing a checkpoint is a collective: after one rank's own error the others (in the step's
    all-reduce) never join it, and every rank hung (measured with 2 gloo processes: until SIGKILL). A
    SIGTERM or the agreed Ctrl-C stops every rank at one batch, and those still write it."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import retrieval_lightning.callbacks.preemption as preemption

    written = []
    monkeypatch.setattr(OnExceptionCheckpoint, "on_exception", lambda self, trainer, module, exc: written.append(exc))
    monkeypatch.setattr(preemption, "_reset_finished_epochs_batch_counter", lambda trainer: None)
    callback = preemption.PreemptionCheckpoint(dirpath="ckpts")
    callback._trained = True
    for world_size, exception, writes in ((2, RuntimeError("boom"), False), (2, KeyboardInterrupt(), False),
                                          (2, SIGTERMException(), True),
                                          (2, preemption.CoordinatedStop("Ctrl-C"), True),
                                          (1, RuntimeError("boom"), True)):
        written.clear()
        for rank in (1, 0):
            trainer = SimpleNamespace(world_size=world_size, global_step=5, global_rank=rank, is_global_zero=rank == 0)
            callback.on_exception(trainer, None, exception)
        assert written == ([exception] * 2 if writes else []), (world_size, exception)
    said = capsys.readouterr().err  # once (rank 0's), for the two errors under DDP
    assert said.count("no ckpts/on_exception.ckpt written: under DDP an error (not a preemption or a Ctrl-C") == 2


def test_fit_without_ckpt_path_resumes_only_a_run_of_the_same_settings(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Lightning resumes this directory's last checkpoint by itself (an on-exception checkpoint is
    configured): a requeued job continues, but a changed setting must not silently get the old run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from retrieval_lightning.callbacks import PreemptionCheckpoint
    from retrieval_lightning.implicit_resume import ResumeMismatchError
    from retrieval_lightning.optim import OptimConfig
    from retrieval_lightning.trainer import RetrievalTrainer
    from test_module import _TinyData, make

    def fit(max_steps: int, lr: float, ckpt_path: str | None = None) -> RetrievalTrainer:
        trainer = RetrievalTrainer(
            max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu", default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True),
                       PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))])
        trainer.fit(make(num_classes=3, optim=OptimConfig(lr=lr)), datamodule=_TinyData(), ckpt_path=ckpt_path)
        return trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit(2, 0.01).global_step == 2
    # a fresh start: no warning about the "last" checkpoint Lightning looked for by itself
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    assert fit(3, 0.01).global_step == 3  # the same run, continued (a requeue)
    with pytest.raises(ResumeMismatchError, match=r"other settings: model.optim.lr: 0.01 -> 0.5\. .*"
                                                  r"--trainer.default_root_dir.*--model.init_from"):
        fit(4, 0.5)
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    assert fit(4, 0.5, ckpt_path=last).global_step == 4  # asked for explicitly: resumed as told
    # `--ckpt_path last`, the README's resume command: resumed as told too, and what differs is said, as for a
    # named file (it was neither listed nor refused: a changed setting was silently applied or ignored)
    with caplog.at_level(logging.INFO):
        assert fit(5, 0.7, ckpt_path="last").global_step == 5
    assert re.search(r"--ckpt_path last resumes \S*last.ckpt, whose run had other settings.*"
                     r"model.optim.lr: 0.5 -> 0.7", caplog.text), caplog.text


def test_resuming_with_another_optimiser_or_frozen_part_is_one_clear_error(tmp_path: Path) -> None:
    """The optimiser's state of the checkpoint must fit the run's optimiser: Lightning fails with a bare
    KeyError (SGD -> AdamW) or ValueError (other parameter groups); here one line says what to do."""
    import lightning.pytorch as pl

    from retrieval_lightning.checkpoints import IncompatibleWeightsError
    from retrieval_lightning.errors import UsageError
    from retrieval_lightning.optim import OptimConfig
    from test_module import _TinyData, make

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", default_root_dir=tmp_path)

    first = trainer(2)
    first.fit(make(num_classes=3), datamodule=_TinyData())
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    for changed, said in ((dict(freeze=["backbone"]), "parameter groups of"),
                          (dict(optim=OptimConfig(name="adamw")), "optimiser sgd -> adamw"),
                          (dict(optim=OptimConfig(weight_decay=1e-4)), "parameter groups of")):
        with pytest.raises(UsageError, match=f"cannot resume.*{said}.*--model.init_from"):
            trainer(4).fit(make(num_classes=3, **changed), datamodule=_TinyData(), ckpt_path=ckpt)
    # another model's checkpoint (here a head of another width, its groups changed too) is named as that
    with pytest.raises(IncompatibleWeightsError, match=r"heads\.global\.") as other:
        trainer(4).fit(make(num_classes=3, head={"dim": 16}, freeze=["backbone"]), datamodule=_TinyData(),
                       ckpt_path=ckpt)
    assert "parameter groups" not in str(other.value)
    resumed = trainer(4)
    resumed.fit(make(num_classes=3), datamodule=_TinyData(), ckpt_path=ckpt)  # the same settings resume
    assert resumed.global_step == 4


class SignalAt(pl.Callback):
    """Ctrl-C (SIGINT) during the batch of global step ``sigint_step``; SIGTERM as epoch ``sigterm_epoch`` ends."""

    def __init__(self, sigint_step: int = -1, sigterm_epoch: int = -1) -> None:
        self.sigint_step, self.sigterm_epoch = sigint_step, sigterm_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.sigint_step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.sigterm_epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_ctrl_c_mid_epoch_and_sigterm_at_an_epoch_end_resume_bitwise(config: Path, cache_root: Path,
                                                                        tmp_path: Path) -> None:
    """Ctrl-C stops at the end of the batch it hit, and SIGTERM right after an epoch stops before the next
    one's data: both on-exception checkpoints resume to the weights of an uninterrupted run (before, the
    Ctrl-C checkpoint's loader skipped the batch being trained, and the epoch-end one skipped a whole epoch)."""
    def fit(out: Path, *extra: str) -> None:
        run_main(args(config, cache_root, out, *extra), cwd=tmp_path)

    fit(tmp_path / "reference")
    out, signals = tmp_path / "interrupted", ["--trainer.callbacks+=test_resume.SignalAt"]
    try:
        with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt's checkpoint
            fit(out, *signals, "--trainer.callbacks.sigint_step=4")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C once it stopped
    stopped = torch.load(out / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert stopped["global_step"] == 5  # the batch Ctrl-C hit was finished
    with pytest.raises(SystemExit):
        fit(out, "--ckpt_path=last", *signals, "--trainer.callbacks.sigterm_epoch=0")
    stopped = torch.load(out / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert (stopped["global_step"], stopped["epoch"]) == (10, 1)  # 10 batches per epoch: stopped between epochs
    fit(out, "--ckpt_path=last")
    assert_bitwise_equal(out / "checkpoints" / "last.ckpt", tmp_path / "reference" / "checkpoints" / "last.ckpt")


class EpochOfEachStep(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.seen.append((trainer.global_step, trainer.current_epoch))


@pytest.mark.parametrize("step_checkpoint_at_the_stop", [False, True])
@pytest.mark.parametrize("stop", [6, 8])
def test_a_run_extended_past_its_max_steps_counts_epochs_as_an_uninterrupted_one(
        tmp_path: Path, stop: int, step_checkpoint_at_the_stop: bool) -> None:
    """Stopped by ``max_steps`` inside an epoch (step 6 of 4-batch epochs) or at its end (step 8), then
    resumed with a larger ``max_steps``: every step is in the epoch of an uninterrupted run (Lightning
    took the unfinished epoch as done, or counted the finished one twice, so the epoch ran one ahead from
    there: logged, and against ``max_epochs``). ``last.ckpt`` is written at the end of training, or at
    the epoch loop's end when a step checkpoint fell on the stop (which Lightning resumed right)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
    from torch.utils.data import DataLoader

    from retrieval_lightning.callbacks import ResumeState

    class FourBatches(BoringModel):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32, 8), batch_size=2)

    def fit(out: Path, max_steps: int, ckpt_path: Path | None = None) -> list[tuple[int, int]]:
        epochs = EpochOfEachStep()
        every = stop if step_checkpoint_at_the_stop else 100
        trainer = pl.Trainer(default_root_dir=out, max_steps=max_steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[epochs, ResumeState(), ModelCheckpoint(
                                 dirpath=out / "checkpoints", save_last=True, every_n_train_steps=every)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the boring model's own warnings (no workers, no logger)
            trainer.fit(FourBatches(), ckpt_path=ckpt_path)
        return epochs.seen

    first = fit(tmp_path / "extended", stop)
    resumed = fit(tmp_path / "extended", 13, tmp_path / "extended" / "checkpoints" / "last.ckpt")
    assert first + resumed == fit(tmp_path / "uninterrupted", 13)
    assert resumed[0] == (stop, stop // 4)


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def test_a_run_resumed_with_a_larger_max_steps_trains_every_step_at_the_new_schedules_lr(tmp_path: Path) -> None:
    """The linear decay spans the run's ``max_steps``; resumed with more steps, the schedule is rebuilt, but the
    optimiser came back with the lr the old schedule set for the next step, and the first resumed step trained at
    it (here 0: the old schedule had decayed to its end)."""
    from retrieval_lightning.optim import OptimConfig
    from test_module import _TinyData, make

    def fit(max_steps: int, ckpt_path: Path | None = None) -> list[tuple[int, float]]:
        rates = LearningRates()
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", default_root_dir=tmp_path, callbacks=[rates])
        trainer.fit(make(num_classes=3, optim=OptimConfig(lr=0.4)), datamodule=_TinyData(), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / "stopped.ckpt")
        return rates.seen

    assert [lr for _, lr in fit(3)] == pytest.approx([0.4, 0.4 * 2 / 3, 0.4 / 3])
    resumed = fit(6, tmp_path / "stopped.ckpt")
    assert [step for step, _ in resumed] == [3, 4, 5]
    assert [lr for _, lr in resumed] == pytest.approx([0.4 * (1 - step / 6) for step in (3, 4, 5)])


def test_a_mid_epoch_resume_with_a_loader_that_cannot_keep_its_place_says_so(tmp_path: Path) -> None:
    """A plain ``DataLoader`` restarts a resumed epoch from its first batch (Lightning says nothing): the run
    then trains the epoch's first batches twice and is not the uninterrupted one (found with 3-batch epochs
    and gradient accumulation). A ``ResumableDataLoader`` keeps its place and resumes without the warning."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from datamodules.sampling import ResumableDataLoader, ShuffleSampler
    from retrieval_lightning.callbacks import ResumeState
    from test_module import _TinyData, make

    class Positioned(_TinyData):
        def train_dataloader(self):
            items = self.items

            class BySeededIndex(torch.utils.data.Dataset):  # the sampler yields (index, augmentation seed)
                def __len__(self) -> int:
                    return len(items)

                def __getitem__(self, key: tuple[int, int]) -> dict:
                    return items[key[0]]

            return ResumableDataLoader(BySeededIndex(), batch_size=4, sampler=ShuffleSampler(len(items)))

    def fit(data: type, out: Path, max_steps: int, ckpt_path: Path | None = None) -> list[str]:
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", default_root_dir=out, callbacks=[ResumeState(), ModelCheckpoint(
                                 dirpath=out, every_n_train_steps=2, save_top_k=-1)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(make(num_classes=3), datamodule=data(), ckpt_path=ckpt_path)
        return [str(w.message) for w in caught if "cannot restore its place" in str(w.message)]

    said = {}
    for data in (_TinyData, Positioned):
        out = tmp_path / data.__name__
        assert not fit(data, out, 2)
        said[data] = fit(data, out, 3, out / "epoch=0-step=2.ckpt")  # 3 batches per epoch: resumed inside epoch 0
    assert not said[Positioned]
    assert len(said[_TinyData]) == 1 and said[_TinyData][0].startswith(
        "resumed inside epoch 0, but the training loader (DataLoader) cannot restore its place in the epoch")
