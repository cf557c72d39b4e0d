"""Whether the process that owns a work folder or an in-use marker still runs: a live run's files are kept, a
crashed one's removed."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import Any

import pytest

from retrieval_lightning.retrieval import workdirs
from retrieval_lightning.retrieval.workdirs import process_alive


def test_a_live_process_is_alive_and_an_ended_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid) and process_alive(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


class FakeKernel32:
    """Windows' answers for one pid: whether it opens (and the error if not) and its exit code."""

    def __init__(self, opens: bool, exit_code: int = 259) -> None:
        self.opens, self.exit_code, self.closed = opens, exit_code, False

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        assert access == 0x1000 and not inherit  # PROCESS_QUERY_LIMITED_INFORMATION: no right to touch it
        return 42 if self.opens else 0

    def GetExitCodeProcess(self, handle: int, code: Any) -> int:
        code._obj.value = self.exit_code
        return 1

    def CloseHandle(self, handle: int) -> int:
        self.closed = True
        return 1


@pytest.mark.parametrize("opens, exit_code, last_error, alive", [
    (True, 259, 0, True),  # STILL_ACTIVE
    (True, 0, 0, False),  # exited, handle still held by someone
    (False, 0, 87, False),  # ERROR_INVALID_PARAMETER: no such process
    (False, 0, 5, True),  # ERROR_ACCESS_DENIED: another user's live process
])
def test_on_windows_liveness_is_asked_of_the_process_table_not_signalled(
        monkeypatch: pytest.MonkeyPatch, opens: bool, exit_code: int, last_error: int, alive: bool) -> None:
    """On Windows ``os.kill(pid, 0)`` is no probe: signal 0 is CTRL_C_EVENT, sent to the owner's console group
    (another signal number terminates it). Only Linux and macOS run here, so Windows' answers are played back."""
    kernel32 = FakeKernel32(opens, exit_code)

    def no_kill(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}) would interrupt or end the run that owns the folder")

    monkeypatch.setattr(workdirs, "ON_WINDOWS", True)
    monkeypatch.setattr(os, "kill", no_kill)
    monkeypatch.setattr(workdirs, "_kernel32", lambda: kernel32)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: last_error, raising=False)
    assert process_alive(1234) is alive
    assert kernel32.closed == opens  # a handle opened is closed
