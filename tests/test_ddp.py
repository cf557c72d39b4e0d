"""DDP on 2 CPU processes (gloo): `fit` produces a checkpoint, and a 2-process evaluation of that
checkpoint gives exactly the 1-process metrics, identical on both ranks.

Run as CLI subprocesses: ``strategy="ddp"`` re-launches ``sys.argv``, which inside pytest is pytest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, TINY_DATA, ddp_env, read_metrics, run_cli, run_main

DEMO = str(REPO / "experiments/demo.yaml")


def common(cache_root: Path, out: Path) -> list[str]:
    return ["--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA, "--trainer.logger=false",
            f"--trainer.default_root_dir={out}", "--trainer.callbacks+=retrieval_lightning.callbacks.MetricsToJson",
            f"--trainer.callbacks.output_dir={out}/metrics"]


@pytest.mark.slow
def test_ddp_fit_then_exact_ddp_evaluation(cache_root: Path, tmp_path: Path) -> None:
    fit_dir = tmp_path / "fit"
    run_cli(["fit", *common(cache_root, fit_dir), "--trainer.strategy=ddp", "--trainer.devices=2",
             "--trainer.max_steps=3"], cwd=tmp_path, env=ddp_env())
    ckpts = sorted(fit_dir.rglob("*.ckpt"))
    assert ckpts, f"no checkpoint under {fit_dir}"
    ckpt = str(ckpts[-1])

    one = tmp_path / "one"
    run_main(["test", *common(cache_root, one), "--trainer.devices=1", f"--ckpt_path={ckpt}"],
             cwd=tmp_path, threads=1)  # in this process: one thread, as each DDP process
    two = tmp_path / "two"
    run_cli(["test", *common(cache_root, two), "--trainer.strategy=ddp", "--trainer.devices=2",
             f"--ckpt_path={ckpt}"], cwd=tmp_path, env=ddp_env())

    single = read_metrics(one / "metrics", "test")
    rank0, rank1 = read_metrics(two / "metrics", "test", 0), read_metrics(two / "metrics", "test", 1)
    assert {"test/minilandmarks/mAP_E", "test/minilandmarks/mAP_M", "test/minilandmarks/mAP_H"} <= set(single)
    assert rank0 == single
    assert rank1 == single
