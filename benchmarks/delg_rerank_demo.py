"""Does DELG re-ranking help on ``minilandmarks``? Global-only vs re-ranked mAP, fp16 vs binarised local features.

Trains ``experiments/delg_demo.yaml`` (the joint global + local recipe; or takes ``--checkpoint``), then
tests the trained model on the ``minilandmarks`` test split twice through the module's own evaluation
(``Trainer.test``: global ranking, top-K shortlist re-ranked by the ``delg_local`` head's inlier counts):
once with fp16 local descriptors and once with sign-binarised ones (``binarize: true``, Hamming matching).
Prints mAP Easy/Medium/Hard of each, and the bytes per image of every stored kind, read from the
re-ranking stores' manifests (``FeatureStore.bytes_per_image``). With ``--untrained`` the same is
measured first for the starting model (ImageNet backbone, GeM, random local head).

    .venv/bin/python benchmarks/delg_rerank_demo.py [--checkpoint CKPT] [--untrained] [--hamming 30,36,48]
        [extra CLI overrides ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _demo_runs import cli_args, train
from retrieval_lightning.cli import run_lightning_cli
from retrieval_lightning.evaluation import AP_PER_QUERY
from retrieval_lightning.metrics import paired_bootstrap
from retrieval_lightning.retrieval.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments/delg_demo.yaml")
SET = "minilandmarks"
METRICS = ("mAP_E", "mAP_M", "mAP_H")


def evaluate(out: Path, checkpoint: Path | None, binarize: bool, overrides: list[str],
             max_hamming: int | None = None) -> dict[str, Any]:
    """One ``Trainer.test``: global and re-ranked metrics, bytes per image of the stored entries."""
    extra = [f"--model.heads.local.init_args.binarize={str(binarize).lower()}"]
    if max_hamming is not None:
        extra.append(f"--model.heads.local.init_args.max_hamming={max_hamming}")
    if checkpoint is not None:
        extra.append(f"--model.init_from={checkpoint}")
    cli = run_lightning_cli(cli_args(CONFIG, out, [*overrides, *extra]), run=False)
    start = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    seconds = time.perf_counter() - start
    stores = sorted((out / "rerank_store" / "test" / SET).glob("*/database/store"))
    if len(stores) != 1:
        raise RuntimeError(f"expected one database store under {out}, found {stores}")
    glob, reranked = cli.model.last_eval_global[SET], cli.model.last_eval[SET]
    return {
        "global": glob.metrics,
        "reranked": reranked.metrics,
        # the mAP-H gain's 95 % interval over the test queries (paired bootstrap)
        "gain_H": paired_bootstrap(reranked.extra[AP_PER_QUERY]["H"], glob.extra[AP_PER_QUERY]["H"]),
        "bytes": FeatureStore.open(stores[0]).bytes_per_image,
        "global_bytes": 2 * cli.model.global_head.dim,  # fp16 global descriptor
        "seconds": seconds,
    }


def table(name: str, fp16: dict[str, Any], binary: dict[str, Any]) -> str:
    def local_bytes(result: dict[str, Any]) -> str:
        return ", ".join(f"{kind} {value:.0f}" for kind, value in sorted(result["bytes"].items()))

    rows = [
        ("global only (fp16 global descriptor)", fp16["global"], f"global {fp16['global_bytes']}"),
        ("re-ranked, fp16 local descriptors", fp16["reranked"], local_bytes(fp16)),
        ("re-ranked, binarised local descriptors", binary["reranked"], local_bytes(binary)),
    ]
    lines = [f"\n## {name}", "| ranking | mAP E | mAP M | mAP H | stored bytes per image (database store manifest) |",
             "|---|---|---|---|---|"]
    for label, metrics, stored in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics[m]:.2f}" for m in METRICS) + f" | {stored} |")
    assert fp16["global"] == binary["global"], "the global ranking must not depend on the local storage"
    desc = {True: "descriptor_bits", False: "descriptors"}
    per_feature = []
    for result, key in ((fp16, desc[False]), (binary, desc[True])):
        kps = next(v for k, v in result["bytes"].items() if k.endswith("keypoints"))
        per_feature.append(next(v for k, v in result["bytes"].items() if k.endswith(key)) / max(kps / 8, 1e-9))
    lines.append(f"descriptor bytes per local feature: fp16 {per_feature[0]:.0f}, binarised {per_feature[1]:.0f}; "
                 f"mAP-H re-ranked minus global [95 % over queries]: fp16 {fp16['gain_H']}, "
                 f"binarised {binary['gain_H']}; "
                 f"test time fp16 {fp16['seconds']:.0f} s, binarised {binary['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a self-contained checkpoint of the recipe (skips training)")
    parser.add_argument("--output", default="outputs/delg_rerank_demo")
    parser.add_argument("--untrained", action="store_true", help="also test the starting model")
    parser.add_argument("--hamming", default="", help="comma-separated max_hamming values: binarised runs of the "
                        "trained model with each (the default threshold is d/3 - 1 bits)")
    args, overrides = parser.parse_known_args()
    out = Path(args.output).resolve()
    reports: list[str] = []

    def report(text: str) -> None:
        """Each table as soon as it is measured; all of them again at the end, below the runs' logs."""
        reports.append(text)
        print(text, flush=True)

    if args.untrained:
        before = [evaluate(out / f"untrained-{kind}", None, kind == "binary", overrides) for kind in ("fp16", "binary")]
        report(table("untrained: ImageNet EfficientNet-Lite0 + GeM, random local head", *before))
    if args.checkpoint:
        checkpoint, fit_seconds = Path(args.checkpoint), None
    else:
        checkpoint, fit_seconds = train(CONFIG, out / "fit", overrides)
    after = [evaluate(out / f"trained-{kind}", checkpoint, kind == "binary", overrides) for kind in ("fp16", "binary")]
    trained = f"trained: {checkpoint}" + (f" (fit {fit_seconds:.0f} s)" if fit_seconds is not None else "")
    report(table(trained, *after))
    if args.hamming:
        lines = ["\n## trained, binarised, by Hamming threshold", "| max_hamming | mAP E | mAP M | mAP H |", "|---|---|---|---|"]
        for bits in (int(b) for b in args.hamming.split(",")):
            result = evaluate(out / f"trained-binary-h{bits}", checkpoint, True, overrides, max_hamming=bits)
            lines.append(f"| {bits} | " + " | ".join(f"{result['reranked'][m]:.2f}" for m in METRICS) + " |")
        report("\n".join(lines))
    if len(reports) > 1:
        print("\n# summary (the tables above, together)\n" + "\n".join(reports))


if __name__ == "__main__":
    main()
