"""Under DDP a user error raised by every rank is printed once (rank 0's), and one raised otherwise on another
rank is printed by that rank, tagged with it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from helpers import CLI, REPO, ForkedRun, cli_env, ddp_env, finished
from retrieval_lightning import rank_errors

ERROR = "error: rerank.k must be >= 1, got 0"


@pytest.fixture
def run_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rank_errors.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.setattr(rank_errors.rank_zero_only, "rank", rank)


def test_another_rank_is_silent_about_rank_zeros_error_and_tags_its_own(run_env: None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_errors, "WAIT_FOR_RANK_ZERO_S", 0.2)
    as_rank(monkeypatch, 1)  # before rank 0 has reported anything: its own lines, tagged
    assert rank_errors.report_once(ERROR + "\n  detail") == "error (rank 1): rerank.k must be >= 1, got 0\n  detail"
    as_rank(monkeypatch, 0)
    assert rank_errors.report_once(ERROR) == ERROR  # rank 0 prints, and records what it printed
    as_rank(monkeypatch, 1)  # this process plays rank 1 here: its parent is rank 0's parent, as under torchrun
    assert rank_errors.report_once(ERROR) is None
    assert rank_errors.report_once("error: image 7 is unreadable") == "error (rank 1): image 7 is unreadable"
    monkeypatch.setenv("MASTER_PORT", "29518")  # another run's rank 1: nothing of this run's rank 0 applies
    assert rank_errors.report_once(ERROR) == "error (rank 1): rerank.k must be >= 1, got 0"


def test_a_restarted_run_reads_its_own_rank_zero_not_the_failed_attempts(run_env: None,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's ``--max-restarts`` starts the ranks again from the same agent on the same port: the first
    attempt's report (error A) stayed in the folder and was read by the second attempt's rank 1, which then hid
    its own error A (rank 0 printed B) or printed B a second time."""
    monkeypatch.setattr(rank_errors, "WAIT_FOR_RANK_ZERO_S", 0.2)
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(rank_errors.os, "getpid", lambda: 1001)  # the first attempt's rank 0 ...
    assert rank_errors.report_once("error: A") == "error: A"  # (no restart count set)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    as_rank(monkeypatch, 1)  # the second attempt's rank 1, before its rank 0 reported: the first's is not its own
    assert rank_errors.report_once("error: A") == "error (rank 1): A"
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(rank_errors.os, "getpid", lambda: 1002)  # ... and the second's, from the same agent
    assert rank_errors.report_once("error: B") == "error: B"
    assert len(list(rank_errors._run_folder().glob("*.txt"))) == 2
    as_rank(monkeypatch, 1)
    assert rank_errors.report_once("error: B") is None
    assert rank_errors.report_once("error: A") == "error (rank 1): A"


def test_a_rank_launched_by_rank_zero_knows_it_after_rank_zero_exits(run_env: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's launcher starts rank 1 from rank 0: rank 0 may print, exit, and leave rank 1 re-parented."""
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(rank_errors, "_PARENT_AT_START", 4242)  # as rank 0, started by some shell
    name = os.fsdecode(b"/data/img_\xff.jpg")  # a path from a non-UTF-8 file name: a lone surrogate
    text = f"error: image {name} is unreadable"
    assert rank_errors.report_once(text) == text
    as_rank(monkeypatch, 1)
    monkeypatch.setattr(rank_errors, "_PARENT_AT_START", os.getpid())  # rank 1 was started by rank 0 ...
    monkeypatch.setattr(rank_errors.os, "getppid", lambda: 1)  # ... which has exited since
    monkeypatch.setattr(rank_errors, "WAIT_FOR_RANK_ZERO_S", 0.2)
    assert rank_errors.report_once(text) is None
    assert not list(rank_errors._run_folder().glob(".*.tmp"))


def test_another_rank_waits_for_rank_zeros_report(run_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 may fail a moment after the others (it was loading a checkpoint, say)."""
    late = threading.Timer(0.3, lambda: rank_errors._record(rank_errors._run_folder(), ERROR))
    as_rank(monkeypatch, 1)
    late.start()
    try:
        assert rank_errors.report_once(ERROR) is None
    finally:
        late.join()


def test_outside_ddp_nothing_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_errors.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    as_rank(monkeypatch, 0)
    assert rank_errors.report_once(ERROR) == ERROR
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_ranks_print_a_shared_error_once_and_a_rank_only_error_tagged(tmp_path: Path) -> None:
    """Two CLI processes started as torchrun starts a run's ranks, failing at start-up."""
    temp = tmp_path / "tmp"
    temp.mkdir()

    def ranks(*overrides: str) -> list[ForkedRun]:
        env = {**ddp_env(), "TMPDIR": str(temp)}
        args = ["fit", "--config", str(REPO / "experiments/demo.yaml"), "--trainer.strategy=ddp",
                "--trainer.devices=2", "--trainer.logger=false", f"--data.init_args.root={tmp_path / 'data'}"]
        return [ForkedRun([*args, override], tmp_path, {**env, "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
                for rank, override in enumerate(overrides)]

    def errors(run: ForkedRun) -> list[str]:
        return [line for line in finished(run, expect=2).stderr.splitlines() if "error" in line]

    shared = "error: the configuration cannot be built: rerank.k must be >= 1, got 0"
    assert [errors(run) for run in ranks("--model.rerank.k=0", "--model.rerank.k=0")] == [[shared], []]
    assert [errors(run) for run in ranks("--model.rerank.k=0", "--model.rerank.shard_size=0")] == [
        [shared], ["error (rank 1): the configuration cannot be built: rerank.shard_size must be >= 1 (images per "
                   "shard file), got 0"]]
    assert len(list(temp.glob("retrieval-lightning-errors/127.0.0.1-*/*.txt"))) == 2  # one report per run


@pytest.mark.slow
def test_lightnings_launcher_prints_an_error_of_both_ranks_once(tmp_path: Path) -> None:
    """The console script under ``--trainer.strategy=ddp``: rank 0 re-launches the command as rank 1 (its child),
    and both fail at set-up on a data root without ground truth; both write to this one stderr."""
    import subprocess

    done = subprocess.run([CLI, "test", "--config", str(REPO / "experiments/eval_revisitop.yaml"),
                           f"--data.init_args.root={tmp_path / 'none'}", "--trainer.strategy=ddp",
                           "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.logger=false"],
                          cwd=tmp_path, env={**cli_env(), "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: revisitop dataset 'roxford5k': no ground truth found")


def test_a_rank_stopped_by_another_ranks_failure_prints_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """When one rank fails alone (a label only its batch holds), the others' collective fails with gloo's "connection
    closed by peer" and printed ~120 lines of traceback around the one error line that mattered."""
    import retrieval_lightning.cli as cli

    def peer_gone(argv):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:41727")

    monkeypatch.setattr(cli, "_dispatch", peer_gone)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # one process: an error of its own
        cli.main(["fit"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["fit"]) == 1
    assert capsys.readouterr().err == ("error (rank 1): stopped: another rank of this run failed (its error is "
                                       "printed above or below)\n")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(["fit", "--traceback"])

    def own_bug(argv):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "_dispatch", own_bug)
    with pytest.raises(RuntimeError, match="mat1"):  # a failure of this rank's own keeps its traceback
        cli.main(["fit"])


def test_the_ranks_a_failed_process_launched_are_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning kills the ranks it launched only on Ctrl-C: when rank 0 failed alone in `test` or `extract` (no
    collective in every batch), rank 1 went on embedding its shard, holding its GPU, after the command returned.
    A rank that stops by itself within the grace period is left to do so; one still running is killed."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from retrieval_lightning import launched_ranks

    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launcher = SimpleNamespace(procs=[quick, stuck])
    monkeypatch.setattr(launched_ranks, "_LAUNCHERS", [launcher])
    start = time.monotonic()
    assert launched_ranks.stop_launched_ranks(grace_s=3.0) == 1
    assert launcher.procs == []  # Lightning's watcher reads this list: emptied, it kills no one for the exit codes
    assert quick.returncode == 0 and stuck.returncode is not None and stuck.returncode < 0
    assert time.monotonic() - start < 10
    launched_ranks.remember_launcher(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))  # one process: none
