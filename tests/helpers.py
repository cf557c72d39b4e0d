"""Helpers for tests that run the CLI: a tiny shared minilandmarks build and subprocess runners."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("retrieval-lightning"))

#: overrides that turn experiments/demo.yaml into a seconds-long CPU run
TINY_DATA = [
    "--data.init_args.build_size=128",
    "--data.init_args.image_size=96",
    "--data.init_args.eval_max_side=96",
    "--data.init_args.batch_size=8",
]


def cli_env(extra_pythonpath: str | None = None, threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("WANDB_API_KEY", None)
    # a W&B service started by an in-process run would be shared by every child (it is advertised in
    # WANDB_SERVICE) and keep a SIGKILLed child's run id "in use": each CLI process gets its own, as a job would
    env.pop("WANDB_SERVICE", None)
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_pythonpath, env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *args], cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"retrieval-lightning {' '.join(args)} failed ({proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_main(args: list[str], cwd: Path, status: int = 0, threads: int | None = None) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process (no interpreter start-up and imports: seconds per run saved).

    Returns what it printed, as :func:`run_cli` does; ``status`` is the exit status expected;
    ``threads``: torch threads for the run (1 to match a DDP process's arithmetic exactly).
    """
    import contextlib
    import io

    import torch

    from retrieval_lightning.cli import main

    previous, before, out, err = Path.cwd(), torch.get_num_threads(), io.StringIO(), io.StringIO()
    os.chdir(cwd)
    torch.set_num_threads(threads or before)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            returned = main(args)
    finally:
        os.chdir(previous)
        torch.set_num_threads(before)
    if returned != status:
        raise AssertionError(f"retrieval-lightning {' '.join(args)} returned {returned}, expected {status}:\n"
                             f"--- stdout\n{out.getvalue()[-4000:]}\n--- stderr\n{err.getvalue()[-6000:]}")
    return subprocess.CompletedProcess(args, returned, out.getvalue(), err.getvalue())


def read_metrics(directory: Path, stage: str, rank: int = 0) -> dict[str, float]:
    return json.loads((directory / f"{stage}_rank{rank}.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(extra_pythonpath: str | None = None) -> dict[str, str]:
    """Environment for a 2-process gloo run: one thread per process, a free loopback port."""
    env = cli_env(extra_pythonpath, threads=1)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


# --- CLI processes forked from a server that imported the package once -------------------------------------
# A fresh interpreter spends 7 - 10 s importing lightning, timm and torchvision on a slow CPU, more than a tiny
# run's own work; a DDP run pays it twice in a row (rank 0 re-launches sys.argv for rank 1). Tests that need a
# separate process (to be killed, to run DDP ranks, to latch W&B's settings) fork it from a server that holds
# those imports. The ranks of a DDP run are started the way torchrun starts them (LOCAL_RANK, MASTER_PORT set:
# Lightning launches nothing); test_resume's killed 2-process run keeps the console script's real re-launch.

_FORK_CONTEXT: multiprocessing.context.ForkServerContext | None = None


def fork_context() -> multiprocessing.context.ForkServerContext:
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        _start_quiet_resource_tracker()
        _FORK_CONTEXT = multiprocessing.get_context("forkserver")
        _FORK_CONTEXT.set_forkserver_preload(["retrieval_lightning.cli"])
    return _FORK_CONTEXT


def _start_quiet_resource_tracker() -> None:
    """multiprocessing's resource tracker (shared by the forked runs) with its stderr on /dev/null: runs killed on
    purpose leave loader semaphores, which it would report after pytest's summary as "leaked"."""
    from multiprocessing import resource_tracker

    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start_fork_server() -> None:
    """Start the import server now: it imports on the other core while the first tests run."""
    import multiprocessing.forkserver

    fork_context()
    multiprocessing.forkserver.ensure_running()


#: what a test module uses to fork runs (conftest starts the server early when one is collected)
FORKING = ("ForkedRun", "run_forked", "run_ddp", "start_ddp", "fork_context")


def _in_forked_child(args: list[str], script: str | None, cwd: str, env: dict[str, str], stdout: str,
                     stderr: str) -> None:
    """The console script's ``main`` (or ``python <script> <args>``) in a forked child, with ``env`` as its
    whole environment."""
    os.setsid()  # a process group of its own, as start_new_session: killpg reaches what it starts
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read from TMPDIR again, as at a fresh start
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    os.chdir(cwd)
    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # what the variable does at a fresh start
    rank_zero_only.rank = _get_rank() or 0  # read from the environment at import in a fresh process
    if script is not None:
        import runpy

        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
        sys.exit(0)
    sys.argv = [CLI, *args]
    from retrieval_lightning.cli import main

    sys.exit(main(args))


_LIVE: set[ForkedRun] = set()


class ForkedRun:
    """One CLI process (or ``python <script>``) forked from the import server; ``poll``, ``send_signal`` and
    ``wait`` as ``Popen``'s. Still running when its test ends, it is killed (conftest), not waited for at exit."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                 script: Path | None = None) -> None:
        self.args = args
        self._dir = tempfile.TemporaryDirectory(prefix="forked_cli_")
        self._out, self._err = (os.path.join(self._dir.name, name) for name in ("stdout", "stderr"))
        self.process = fork_context().Process(target=_in_forked_child, args=(
            args, None if script is None else str(script), str(cwd), env or cli_env(), self._out, self._err))
        self.process.start()
        self.pid = self.process.pid
        _LIVE.add(self)

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the run and what it started (loader workers, W&B's service)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 420) -> subprocess.CompletedProcess:
        """Its exit status (negative: the signal that ended it) and what it printed."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill_group()
            self.process.join()
            raise AssertionError(f"retrieval-lightning {' '.join(self.args)} did not finish in {timeout} s:\n"
                                 f"{Path(self._err).read_text()[-6000:]}")
        done = subprocess.CompletedProcess(self.args, self.process.exitcode, Path(self._out).read_text(),
                                           Path(self._err).read_text())
        self._dir.cleanup()
        _LIVE.discard(self)
        return done


def kill_leftover_runs() -> None:
    """SIGKILL forked runs a failed test left behind (a rank waiting for a dead peer would hang pytest's exit)."""
    for run in list(_LIVE):
        run.kill_group()
        run.process.join()
        _LIVE.discard(run)


def start_ddp(args: list[str], cwd: Path, env: dict[str, str] | None = None, ranks: int = 2,
              script: Path | None = None) -> list[ForkedRun]:
    """The ranks of ``args`` (which set ``--trainer.devices=<ranks>``), or of ``python <script> <args>``, each
    forked, as torchrun starts them."""
    env = env or ddp_env()
    return [ForkedRun(args, cwd, {**env, "LOCAL_RANK": str(rank), "NODE_RANK": "0"}, script=script)
            for rank in range(ranks)]


def finished(runs: list[ForkedRun] | ForkedRun, expect: int | None = 0, timeout: float = 420
             ) -> subprocess.CompletedProcess:
    """Wait for every run (all ranks); each must exit with ``expect`` (None: any). Returns the first's."""
    done = [run.wait(timeout) for run in (runs if isinstance(runs, list) else [runs])]
    for rank, run in enumerate(done):
        if expect is not None and run.returncode != expect:
            raise AssertionError(f"retrieval-lightning {' '.join(run.args)} (process {rank}) exited "
                                 f"{run.returncode}, expected {expect}:\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n"
                                 f"{run.stderr[-6000:]}")
    return done[0]


def run_forked(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """:func:`run_cli` in a process forked from the import server."""
    return finished(ForkedRun(args, cwd, env))


def run_ddp(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A 2-process gloo run of ``args`` (``--trainer.strategy=ddp --trainer.devices=2`` added); rank 0's output."""
    return finished(start_ddp([*args, "--trainer.strategy=ddp", "--trainer.devices=2"], cwd, env))


class KillAfterStep(pl.Callback):
    """At the start of the batch after global step ``step`` (its checkpoint is on disk), die like a lost node
    (every rank: each runs the callback)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
