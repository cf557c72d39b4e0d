"""Helpers for tests that run the CLI: a tiny shared minilandmarks build and subprocess runners."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
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


def ddp_env() -> dict[str, str]:
    """Environment for a 2-process gloo run: one thread per process, a free loopback port."""
    env = cli_env(threads=1)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env
