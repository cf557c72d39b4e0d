"""Shared fixtures: keep W&B offline and every run's files inside tmp dirs; small thread counts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "photos"

# under pytest-xdist every worker has a core of its own: one thread each, or the workers fight over the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_dir = tmp_path_factory.mktemp("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A collected test forks CLI runs: start their import server (about 10 s of imports) in the background."""
    helpers = sys.modules.get("helpers")
    if helpers is None:
        return
    forking = {id(getattr(helpers, name)) for name in helpers.FORKING}
    modules = {item.module for item in session.items if getattr(item, "module", None) is not None}
    if any(id(value) in forking for module in modules for value in vars(module).values()):
        helpers.start_fork_server()


#: what ``seed_everything`` (a test's, or an in-process CLI run's) leaves in the environment, where an unseeded
#: sampler or a later run would read it
SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _seeding_left_as_found() -> Iterator[None]:
    before = {name: os.environ.get(name) for name in SEED_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _no_forked_run_outlives_its_test() -> Iterator[None]:
    yield
    helpers = sys.modules.get("helpers")
    if helpers is not None:
        helpers.kill_leftover_runs()


@pytest.fixture(autouse=True)
def _no_progress_bar_outlives_its_test() -> Iterator[None]:
    """A run stopped by an error in this process leaves Lightning's bar registered (a real run's process ends
    there), and the CLI, seeing an open bar, starts its error line on a new line: the next test's output differs."""
    yield
    from tqdm.std import tqdm

    instances = getattr(tqdm, "_instances", None)
    if instances:
        instances.clear()


@pytest.fixture(scope="session", autouse=True)
def _default_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A run that names no data root builds its data set under the default cache: a tmp dir here, not the
    home directory of whoever runs the tests."""
    saved = os.environ.get("RETRIEVAL_LIGHTNING_CACHE")
    os.environ["RETRIEVAL_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("default_cache"))
    yield
    if saved is None:
        os.environ.pop("RETRIEVAL_LIGHTNING_CACHE", None)
    else:
        os.environ["RETRIEVAL_LIGHTNING_CACHE"] = saved


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One minilandmarks cache for the whole session (built once, reused by every test)."""
    return tmp_path_factory.mktemp("rl_cache")
