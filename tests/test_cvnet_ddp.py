"""The CVNet stack under 2-process DDP (gloo).

- Training: the verifier stage (pair batches, hard negatives mined from the global descriptors on
  every rank's share of the pool and gathered into one file both ranks map, each rank searching the
  nearest for its share of the rows; Hide-and-Seek and patch-shuffled negatives on) on 2
  processes with 2 groups per batch each ends with the weights of 1 process with 4 groups per batch.
  Each rank takes every other group of the epoch's list, the ranks' per-pair losses are averaged,
  the mined table is the same, and the batch transforms draw per group of the step over both ranks,
  so the two runs see the same groups, crops, negatives, hidden patches and mosaics at every step.
- Evaluation: the sparsifier stage's ``evaluate`` of an extracted store (every image stored sparsified,
  the queries' dense entries extracted beside it) on 2 processes gives the 1-process metrics, each
  rank re-ranking half of the queries. The exact DDP ``test`` (every item embedded once, gathered,
  de-duplicated by index; global and re-ranked metrics) is in ``test_delg_ddp.py``; the demo's DDP
  ``fit`` is in ``test_resume.py`` (bitwise resume on 2 processes).

The 1-process runs are in this process (one thread, as each DDP process); the DDP ranks are CLI
processes forked as torchrun starts them (``helpers.run_ddp``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, TINY_DATA, run_ddp, run_main

SET = "minilandmarks"


def verifier_args(cache_root: Path, out: Path, groups_per_batch: int, config: Path | None = None) -> list[str]:
    config = config or REPO / "experiments/cvnet_demo.yaml"
    return ["fit", "--config", str(config), f"--data.init_args.root={cache_root}",
            *TINY_DATA, f"--data.init_args.pairs.groups_per_batch={groups_per_batch}", "--trainer.logger=false",
            f"--trainer.default_root_dir={out}", "--trainer.max_steps=2", "--model.optim.warmup_steps=0",
            # the random batch transforms on: they draw as one process with the whole batch would
            "--data.init_args.pairs.shuffled_negatives=1",
            '--data.init_args.hide_and_seek={"start": 0.3, "end": 0.3, "warmup_steps": 0}']


def sparsifier_args(command: str, cache_root: Path, out: Path, verifier: Path, *extra: str) -> list[str]:
    return [command, "--config", str(REPO / "experiments/cvnet_ds_demo.yaml"), f"--data.init_args.root={cache_root}",
            *TINY_DATA, "--trainer.logger=false", f"--trainer.default_root_dir={out}",
            f"--model.init_from={verifier}", "--model.eval_scales=[1.0]", "--model.rerank.k=6", *extra]


def printed_metrics(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.startswith("test/")}


def verifier_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("heads.verifier.")}


@pytest.mark.slow
def test_verifier_ddp_fit_and_sparse_ddp_evaluate_equal_one_process(cache_root: Path, tmp_path: Path) -> None:
    from retrieval_lightning.cli import run_lightning_cli

    # the mining's nearest-neighbour search in chunks of 16 of the 80 pool rows: the ranks take 3 and 2 of them
    cfg = yaml.safe_load((REPO / "experiments/cvnet_demo.yaml").read_text())
    mining, = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(".HardNegativeMining")]
    mining["init_args"]["chunk"] = 16
    config = tmp_path / "cvnet_demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    two = tmp_path / "fit2"
    # the mined pool's gathered descriptors spilled to one file both ranks map (unlinked once they have)
    spill = ["--model.spill.min_bytes=0", f"--model.spill.dir={two / 'spill'}"]
    run_ddp([*verifier_args(cache_root, two, 2, config), *spill], cwd=tmp_path)
    assert (two / "spill").is_dir() and not any((two / "spill").iterdir())
    one = tmp_path / "fit1"
    run_main(verifier_args(cache_root, one, 4, config), cwd=tmp_path, threads=1)
    start = {f"heads.verifier.{k}": v for k, v in run_lightning_cli(
        verifier_args(cache_root, tmp_path / "init", 4)[1:], run=False).model.heads["verifier"].state_dict().items()}

    ddp, single = verifier_weights(two / "checkpoints/last.ckpt"), verifier_weights(one / "checkpoints/last.ckpt")
    assert ddp.keys() == single.keys() == start.keys()
    moved = torch.cat([(single[k].float() - start[k].float()).flatten() for k in start]).norm()
    apart = torch.cat([(ddp[k].float() - single[k].float()).flatten() for k in start]).norm()
    # trained, and alike up to the order of the sums (measured: 8e-5 of the change)
    assert moved > 1e-3 and apart < 1e-3 * moved, (moved, apart)

    verifier = two / "checkpoints/last.ckpt"
    # the sparsifier stage's `evaluate` of an extracted (sparse) store on 2 processes: each re-ranks half of the
    # queries, and the metrics are those of 1 process
    features = tmp_path / "features"
    run_main(sparsifier_args("extract", cache_root, tmp_path / "extract", verifier, f"--output_dir={features}"),
             cwd=tmp_path)
    assert '_pos"' in (features / SET / "store" / "manifest.json").read_text()  # every image stored sparsified
    evaluate = sparsifier_args("evaluate", cache_root, tmp_path / "evaluate", verifier, f"--features_dir={features}")
    single_eval = printed_metrics(run_main(evaluate, cwd=tmp_path, threads=1).stdout)
    ddp_eval = run_ddp(evaluate, cwd=tmp_path)
    assert printed_metrics(ddp_eval.stdout) == single_eval and f"test/{SET}/reranked/mAP_M" in single_eval
    assert re.search(r"re-ranking minilandmarks \(rank 0\):[^\r\n]*/5 \[", ddp_eval.stderr)  # 5 of the 10 queries
