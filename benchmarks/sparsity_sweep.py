"""CVNet-DS on minilandmarks: stored bytes per database image vs re-ranked mAP, by keep ratio.

One demo verifier (trained here with ``experiments/cvnet_demo.yaml``, or ``--verifier-ckpt``), then
the sparsifier trained on it with ``experiments/cvnet_ds_demo.yaml`` (verifier frozen). On the
minilandmarks test split every (query, database) pair is scored by the verifier from dense entries
and from sparse ones (learned selection, top-k by feature norm, random) at each keep ratio;
scores are fused as CVNet does (global cosine + 0.5 x verifier) over the whole database (it is
smaller than K = 100) and mAP Medium/Hard computed with ``retrieval_lightning.metrics.revisitop``.
Also prints the stored bytes at the default setting for 768x1024 R50 shapes against the official
dense fp32 conv4 map (12 MiB).

    .venv/bin/python benchmarks/sparsity_sweep.py [--verifier-ckpt PATH] [--sparsifier-ckpt PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
R50_LEVELS = [(24, 32), (34, 45), (48, 64)]  # CVNet pyramid at 768x1024 (REFERENCE.md §2)
R50_CONV4_FP32 = 48 * 64 * 1024 * 4
RATIOS = (0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0)
SELECTIONS = ("learned", "norm", "random")


def fit(config: str, out: str, extra: list[str]) -> str:
    """Train with the CLI's parser and trainer; return the last checkpoint path."""
    from retrieval_lightning.cli import run_lightning_cli

    args = ["--config", str(REPO / config), f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", *extra]
    cli = run_lightning_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = Path(out) / "final.ckpt"
    cli.trainer.save_checkpoint(str(path))
    return str(path)


def load(config: str, ckpt: str):
    from retrieval_lightning.cli import run_lightning_cli

    cli = run_lightning_cli(["--config", str(REPO / config), f"--model.init_from={ckpt}",
                             "--trainer.logger=false"], run=False)
    cli.datamodule.prepare_data()
    return cli.model.eval(), cli.datamodule


def r50_bytes(head) -> dict[str, float]:
    """Stored bytes per image at the head's setting for R50 shapes at 768x1024 (256-ch levels)."""
    from heads._sparse import codec
    from retrieval_lightning.head import EntryKind

    dense = {}
    for i in range(3):
        dense[f"level{i}"] = EntryKind("float16", (256,), True)
        dense[f"level{i}_hw"] = EntryKind("int32", (2,))
    kinds = head.entry_kinds(dense)
    counts = head._counts([h * w for h, w in R50_LEVELS])
    rows = {name: counts[int(name[5])] for name in kinds if kinds[name].ragged}
    sparse = codec.bytes_per_image(kinds, rows)
    dense_rows = {f"level{i}": h * w for i, (h, w) in enumerate(R50_LEVELS)}
    return {"sparse": sparse, "dense_fp16_levels": codec.bytes_per_image(dense, dense_rows),
            "conv4_fp32": R50_CONV4_FP32, "kept": sum(counts)}


def entry_bytes(entries: list[dict[str, torch.Tensor]], kinds) -> float:
    """Mean stored bytes of these entries, as the feature store counts them (int64 offsets per ragged kind)."""
    total = sum(t.numel() * t.element_size() for e in entries for t in e.values())
    return total / len(entries) + 8 * sum(1 for k in kinds.values() if k.ragged)


def score_matrix(verifier, queries, database, densify=None) -> np.ndarray:
    out = np.zeros((len(queries), len(database)), dtype=np.float64)
    db = densify(database) if densify else database
    for q, entry in enumerate(queries):
        out[q] = verifier.score(entry, db, list(range(len(db)))).double().numpy()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier-config", default="experiments/cvnet_demo.yaml")
    parser.add_argument("--config", default="experiments/cvnet_ds_demo.yaml")
    parser.add_argument("--verifier-ckpt", default=None)
    parser.add_argument("--sparsifier-ckpt", default=None)
    parser.add_argument("--output", default="outputs/sparsity_sweep")
    parser.add_argument("--weight", type=float, default=0.5, help="CVNet fusion: global + weight * verifier")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = args.verifier_ckpt or fit(args.verifier_config, str(out / "verifier"), [])
    print(f"verifier checkpoint: {ckpt} ({time.time() - t0:.0f} s)", flush=True)
    sp_ckpt = args.sparsifier_ckpt or fit(args.config, str(out / "sparsifier"), [f"--model.init_from={ckpt}"])
    print(f"sparsifier checkpoint: {sp_ckpt} ({time.time() - t0:.0f} s)", flush=True)

    from retrieval_lightning.metrics.revisitop import evaluate_revisitop_from_scores

    model, datamodule = load(args.config, sp_ckpt)
    verifier, sparsifier = model.heads["verifier"], model.heads["sparsifier"]
    sparsifier.attach(verifier)
    eval_set = datamodule.eval_sets("test")[0]
    images = [eval_set.dataset[i]["image"] for i in range(len(eval_set.dataset))]
    nq = eval_set.n_queries
    with torch.no_grad():
        desc = model.embed_batch(images)
        entries = verifier.extract_entries(images, lambda x: model.backbone(x))
    global_scores = (desc[:nq] @ desc[nq:].T).double().numpy()
    queries, database = entries[:nq], entries[nq:]
    gnd = eval_set.ground_truth

    def metrics(verifier_scores: np.ndarray | None) -> tuple[float, float]:
        s = global_scores if verifier_scores is None else global_scores + args.weight * verifier_scores
        m = evaluate_revisitop_from_scores(s, gnd)
        return m["mAP_M"], m["mAP_H"]

    rows = [{"setting": "global only", "ratio": None, "bytes": None, **dict(zip(("mAP_M", "mAP_H"), metrics(None)))}]
    with torch.no_grad():
        dense_scores = score_matrix(verifier, queries, database)
    dense_bytes = entry_bytes(database, verifier.entry_kinds())
    rows.append({"setting": "dense", "ratio": 1.0, "bytes": dense_bytes,
                 **dict(zip(("mAP_M", "mAP_H"), metrics(dense_scores)))})
    print(f"dense done ({time.time() - t0:.0f} s)", flush=True)
    kinds = sparsifier.entry_kinds(verifier.entry_kinds())
    for selection in SELECTIONS:
        for ratio in RATIOS:
            head = copy.copy(sparsifier)
            head.selection, head.keep_ratio, head.budget = selection, ratio, None
            sparse = head.sparsify(database)
            with torch.no_grad():
                s = score_matrix(verifier, queries, sparse, head.densify)
            rows.append({"setting": selection, "ratio": ratio, "bytes": entry_bytes(sparse, kinds),
                         **dict(zip(("mAP_M", "mAP_H"), metrics(s))),
                         "max_diff_vs_dense": float(np.abs(s - dense_scores).max())})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nminilandmarks test: {nq} queries, {len(database)} database images; "
          f"values {sparsifier.value_dtype}, default keep ratio {sparsifier.keep_ratio}")
    print("| selection | keep ratio | bytes / db image | mAP-M | mAP-H |\n|---|---|---|---|---|")
    for r in rows:
        b = "-" if r["bytes"] is None else f"{r['bytes']:.0f}"
        print(f"| {r['setting']} | {r['ratio'] if r['ratio'] is not None else '-'} | {b} | "
              f"{r['mAP_M']:.2f} | {r['mAP_H']:.2f} |")
    r50 = r50_bytes(sparsifier)
    print(f"\nR50 768x1024 at the default setting: {r50['kept']} of {sum(h * w for h, w in R50_LEVELS)} locations, "
          f"{r50['sparse'] / 1024:.1f} KiB per image (goal <= 120 KiB); dense fp16 levels "
          f"{r50['dense_fp16_levels'] / 2**20:.2f} MiB ({r50['dense_fp16_levels'] / r50['sparse']:.1f}x); "
          f"official fp32 conv4 map {r50['conv4_fp32'] / 2**20:.1f} MiB ({r50['conv4_fp32'] / r50['sparse']:.1f}x, "
          "goal >= 100x)")
    plot(rows, out / "sparsity_sweep.png")
    (out / "sparsity_sweep.json").write_text(json.dumps({"rows": rows, "r50": r50}, indent=1))
    print(f"plot: {out / 'sparsity_sweep.png'} ({time.time() - t0:.0f} s total)")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("mAP_M", "mAP_H")):
        for selection, style in zip(SELECTIONS, ("o-", "s--", "^:")):
            pts = [(r["bytes"] / 1024, r[key]) for r in rows if r["setting"] == selection]
            ax.plot(*zip(*pts), style, label=selection)
        for r, color in ((rows[1], "k"), (rows[0], "grey")):
            ax.axhline(r[key], color=color, lw=0.8, label=r["setting"])
        ax.set_xscale("log")
        ax.set_xlabel("stored KiB per database image")
        ax.set_ylabel(f"re-ranked {key}")
        ax.legend(fontsize=8)
    fig.suptitle("CVNet-DS sparsifier on minilandmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
