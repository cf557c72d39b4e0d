"""Does the demo CVNet verifier help? Global-only vs re-ranked mAP over training seeds, with diagnostics.

For each seed, trains ``experiments/cvnet_demo.yaml`` (or takes ``--checkpoint``) and tests it on the
``minilandmarks`` test split through the module's own evaluation (``Trainer.test``: global ranking,
K = 20 shortlist re-scored by the verifier, fused as the official tester does: global cosine + 0.5 x
verifier). The test split has 10 queries, so one training run says little: several seeds are run. A seed
changes the verifier's initialisation and, as an unset ``pairs.seed`` follows ``seed_everything``,
the pair groups and crops; ``--data-seed-offset K`` pins ``pairs.seed`` = seed + K instead (the runs of
docs/cvnet_demo_experiments.md used 10). On the demo the data draw moves mAP-H more than the initialisation.
Diagnostics of the verifier alone, over every query x database pair of the split:

- per-query AUC of positives (easy + hard) against non-junk negatives, verifier score vs global cosine;
- the score of an image against itself (a verifier that matches structure gives it ~1; one that
  learnt the training landmarks' look gives it no more than an unrelated pair).

    .venv/bin/python benchmarks/cvnet_demo_rerank.py [--seeds 0,1,2] [--checkpoint CKPT] [CLI overrides ...]

docs/cvnet_demo_experiments.md's "previous recipe" row, for example, adds ``--model.optim.lr=0.001
--trainer.max_steps=200 --config previous.yaml``, where ``previous.yaml`` holds ``data: {init_args: {pairs:
{groups_per_batch: 4, same_image_positives: 0, crops_per_image: null, distinct_labels: true}}}`` and the
Hide-and-Seek block of the earlier config (``start 0, end 0.3, warmup_steps 150, grid 4``). A file, because
jsonargparse refuses a nested ``=null`` on the command line (``--data.init_args.pairs.crops_per_image=null``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _demo_runs import cli_args, train
from retrieval_lightning.cli import run_lightning_cli
from retrieval_lightning.evaluation import AP_PER_QUERY
from retrieval_lightning.metrics import paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments/cvnet_demo.yaml")
SET = "minilandmarks"


def split(gt: dict, n_database: int) -> tuple[list[int], list[int]]:
    """A query's positives (easy + hard) and negatives (neither positive nor junk) among the database."""
    positives = [*gt.get("easy", []), *gt.get("hard", [])]
    excluded = set(positives) | set(gt.get("junk", []))
    return positives, [i for i in range(n_database) if i not in excluded]


def mean_auc(scores: np.ndarray, ground_truth: list[dict]) -> float:
    """Mean over queries of P(positive scores above a negative), ties counting half."""
    values = []
    for q, gt in enumerate(ground_truth):
        positives, negatives = split(gt, scores.shape[1])
        if not positives or not negatives:
            continue
        pos, neg = scores[q, positives][:, None], scores[q, negatives][None]
        values.append(float((pos > neg).mean() + 0.5 * (pos == neg).mean()))
    return float(np.mean(values))


@torch.no_grad()
def diagnostics(module: Any, datamodule: Any) -> dict[str, float]:
    """Verifier vs global AUC over all pairs; self-pair scores against the best unrelated pair."""
    eval_set = next(s for s in datamodule.eval_sets("test") if s.name == SET)
    nq = eval_set.n_queries
    images = [eval_set.dataset[i]["image"] for i in range(len(eval_set.dataset))]
    module.eval()
    desc = module.embed_batch(images).float()
    entries = module.rerank_entries(images, database=False)
    database = entries[nq:]
    verifier = np.stack([
        module.score_entries(entries[q], database, list(range(len(database)))).float().numpy() for q in range(nq)
    ])
    cosine = (desc[:nq] @ desc[nq:].T).numpy()
    self_scores = [float(module.score_entries(e, [e], [0])[0]) for e in database]
    return {
        "auc_verifier": mean_auc(verifier, eval_set.ground_truth),
        "auc_global": mean_auc(cosine, eval_set.ground_truth),
        "self_min": min(self_scores), "self_median": float(np.median(self_scores)),
        "unrelated_max": float(max(verifier[q, split(gt, len(database))[1]].max()
                                   for q, gt in enumerate(eval_set.ground_truth))),
    }


def run_seed(out: Path, seed: int | None, checkpoint: str | None, overrides: list[str],
             data_seed_offset: int | None = None) -> dict[str, Any]:
    """Fit (unless a checkpoint is given), test, diagnose one model."""
    extra = [*overrides] + ([f"--seed_everything={seed}"] if seed is not None else [])
    if seed is not None and data_seed_offset is not None:  # also draw other pair groups (and crops), not only another init
        extra.append(f"--data.init_args.pairs.seed={seed + data_seed_offset}")
    fit_seconds = 0.0
    if checkpoint is None:
        path, fit_seconds = train(CONFIG, out / "fit", extra)
        checkpoint = str(path)
    cli = run_lightning_cli(cli_args(CONFIG, out / "test", [*extra, f"--model.init_from={checkpoint}"]), run=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    glob, reranked = cli.model.last_eval_global[SET], cli.model.last_eval[SET]
    return {
        "global": glob.metrics,
        "reranked": reranked.metrics,
        # the gain's 95 % interval over the test queries: whether they can tell re-ranking from global only
        "gain_H": paired_bootstrap(reranked.extra[AP_PER_QUERY]["H"], glob.extra[AP_PER_QUERY]["H"]),
        "gain_M": paired_bootstrap(reranked.extra[AP_PER_QUERY]["M"], glob.extra[AP_PER_QUERY]["M"]),
        "ap_H": {name: result.extra[AP_PER_QUERY]["H"].tolist() for name, result in (("global", glob),
                                                                                    ("reranked", reranked))},
        "fit_seconds": fit_seconds,
        **diagnostics(cli.model, cli.datamodule),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (seed_everything), comma-separated")
    parser.add_argument("--checkpoint", default=None, help="evaluate this model instead of training")
    parser.add_argument("--output", default="outputs/cvnet_demo_rerank")
    parser.add_argument("--data-seed-offset", type=int, default=None,
                        help="set pairs.seed = seed + offset per run (by default an unset pairs.seed is the run's "
                             "seed, so the groups and crops already vary with it)")
    args, overrides = parser.parse_known_args()
    seeds: list[int | None] = [None] if args.checkpoint else [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        result = run_seed(Path(args.output) / f"seed{seed}", seed, args.checkpoint, overrides, args.data_seed_offset)
        rows.append((seed, result))
        print(f"seed {seed}: done ({result['fit_seconds']:.0f} s fit)", flush=True)
        # after every seed, so a long run stopped early keeps what it measured
        results = {str(s): {k: v for k, v in r.items() if not k.startswith("gain_")} for s, r in rows}
        (Path(args.output) / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| seed | global E / M / H | re-ranked E / M / H | change M, H [95 % over queries] "
          "| AUC verifier / global | self-pair min / median | best unrelated |")
    print("|---|---|---|---|---|---|---|")
    for seed, r in rows:
        g, v = r["global"], r["reranked"]
        print(f"| {seed} | {g['mAP_E']:.2f} / {g['mAP_M']:.2f} / {g['mAP_H']:.2f} "
              f"| {v['mAP_E']:.2f} / {v['mAP_M']:.2f} / {v['mAP_H']:.2f} | {r['gain_M']}, {r['gain_H']} "
              f"| {r['auc_verifier']:.3f} / {r['auc_global']:.3f} | {r['self_min']:.2f} / {r['self_median']:.2f} "
              f"| {r['unrelated_max']:.2f} |")
    gain = [r["reranked"]["mAP_H"] - r["global"]["mAP_H"] for _, r in rows]
    print(f"\nmAP-H change from re-ranking: mean {np.mean(gain):+.2f}, per seed {', '.join(f'{x:+.2f}' for x in gain)}")
    if len(rows) > 1:  # each query's gain averaged over the seeds, resampled over the queries
        pooled = paired_bootstrap(*(np.mean([r["ap_H"][k] for _, r in rows], axis=0) for k in ("reranked", "global")))
        print(f"the mean change's 95 % interval over the {pooled.n} test queries (seeds averaged per query): {pooled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
