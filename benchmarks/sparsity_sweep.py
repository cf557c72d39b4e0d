"""CVNet-DS on minilandmarks: stored bytes per database image vs re-ranked mAP, by keep ratio.

One demo verifier (``experiments/cvnet_demo.yaml``, or ``--verifier-ckpt``) and the sparsifiers
trained on it, one per ``--seeds`` value (``experiments/cvnet_ds_demo.yaml``; or ``--sparsifier-ckpt``,
comma-separated). That config fine-tunes the verifier along, so each sparsifier then comes with a
verifier of its own: every setting is scored with each one's own verifier and a row is their mean, and
the verifier stage's own model is scored dense too (row ``dense, verifier stage``: the store CVNet-DS
replaces). For every setting (dense; learned selection, top-k by feature norm and random at each
keep ratio) the minilandmarks test split goes through the core's re-ranked evaluation
(:func:`retrieval_lightning.retrieval.rerank_eval.extract_entries` writes the query and database
stores, database entries sparsified; :func:`~retrieval_lightning.retrieval.rerank_eval.evaluate_reranked`
shortlists, densifies, scores and fuses with the model's ``rerank`` settings). Bytes per database
image are the store's own (``FeatureStore.bytes_per_image``). The dense verifier entries are
extracted once and re-sparsified per setting (the backbone would give the same ones every time).
Every setting is also compared with the dense verifier's scores on the same shortlists, without
labels (:func:`fidelity`: score MAD and Kendall tau), which 10 queries' mAP is too coarse to show, and every
gap in mAP is printed with its 95 % interval over the test queries (a paired bootstrap of the per-query APs).
``--fills`` and ``--values`` score every selection with several dropped-location fills and stored
value types in one run. Also prints the stored bytes at the default setting for 768x1024 R50
shapes against the official dense fp32 conv4 map (12 MiB).

    .venv/bin/python benchmarks/sparsity_sweep.py [--verifier-ckpt PATH] [--sparsifier-ckpt PATH]
        [--ratios 0.08,0.15] [--fills 0,1.5] [--values int8,int4]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
R50_LEVELS = [(24, 32), (34, 45), (48, 64)]  # CVNet pyramid at 768x1024 (REFERENCE.md §2)
R50_CONV4_FP32 = 48 * 64 * 1024 * 4
RATIOS = (0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0)
#: the row of the verifier stage's own model, dense, when the sparsifier stage fine-tuned the verifier
BEFORE = "dense, verifier stage"
SELECTIONS = ("learned", "norm", "random", "norm+spread")  # the last only for a sparsifier with spread > 0
STYLES = ("o-", "s--", "^:", "d-.")


def selections_of(trained: Any) -> tuple[str, ...]:
    """The selections a sweep compares: learned, the issue's two baselines (plain top-k by norm,
    random) and, when the sparsifier spreads its picks, top-k by norm spread alike (what the
    spreading alone does)."""
    return SELECTIONS if getattr(trained, "spread", 0) > 0 else SELECTIONS[:3]


def fit(config: str, out: str, extra: list[str]) -> str:
    """Train with the CLI's parser and trainer; return the final checkpoint path."""
    from retrieval_lightning.cli import run_lightning_cli

    args = ["--config", str(REPO / config), f"--trainer.default_root_dir={out}", *extra]
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)  # train from scratch, not fit's implicit resume
    cli = run_lightning_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = Path(out) / "final.ckpt"
    cli.trainer.save_checkpoint(str(path))
    return str(path)


def load(config: str, ckpt: str, extra: Sequence[str] = ()):
    """The model of ``ckpt`` (self-contained) and the datamodule of ``config`` (with ``extra`` overrides)."""
    from retrieval_lightning.cli import run_lightning_cli
    from retrieval_lightning.module import RetrievalModule

    cli = run_lightning_cli(["--config", str(REPO / config), "--trainer.logger=false", *extra], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("test")
    return RetrievalModule.load_from_checkpoint(ckpt).eval(), cli.datamodule


class SweepModel:
    """The module's re-ranking inference API with the sparsifier swapped per setting (``None`` =
    dense); dense entries and global descriptors computed once per image (keyed by its pixels)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.verifier = module.rerank_head
        self.rerank_prefix = module.rerank_prefix
        self.sparsifier: Any = None
        self._entries: dict[str, dict[str, Tensor]] = {}
        self._desc: dict[str, Tensor] = {}

    @property
    def training(self) -> bool:
        return self.module.training

    def eval(self) -> "SweepModel":
        self.module.eval()
        return self

    def train(self, mode: bool = True) -> "SweepModel":
        self.module.train(mode)
        return self

    @staticmethod
    def _key(image: Tensor) -> str:
        return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def _unread(self) -> set[str]:
        """What only a selection reads (the row norms): a dense store (no sparsifier) does not hold it."""
        sparsifier = self.module.sparsifier
        return set() if sparsifier is None else sparsifier.consumed_kinds(self.verifier.entry_kinds())

    def rerank_entry_kinds(self, database: bool = True) -> dict:
        kinds = self.verifier.entry_kinds()
        if database and self.sparsifier is not None:
            return self.sparsifier.entry_kinds(kinds)
        return {name: kind for name, kind in kinds.items() if name not in self._unread()}

    def rerank_entries(self, images: Sequence[Tensor], database: bool = True,
                       resize_factors: Tensor | None = None) -> list[dict[str, Tensor]]:
        keys = [self._key(img) for img in images]  # the verifier's entries do not depend on resize_factors
        todo = [i for i, k in enumerate(keys) if k not in self._entries]
        if todo:  # with the row norms every selection reads
            fresh = self.module.dense_entries([images[i] for i in todo])
            self._entries.update({keys[i]: e for i, e in zip(todo, fresh)})
        dense = [self._entries[k] for k in keys]
        if database and self.sparsifier is not None:
            return self.sparsifier.sparsify(dense)
        unread = self._unread()
        return [{k: v for k, v in e.items() if k not in unread} for e in dense]

    def selection_input(self, image: Tensor) -> dict[str, Tensor]:
        """One image's dense entry with the row norms, as the sweep's selections read it."""
        self.rerank_entries([image])
        return self._entries[self._key(image)]

    def densify_entries(self, entries: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return self.sparsifier.densify(entries) if self.sparsifier is not None else entries

    def score_entries(self, query, candidates, seeds) -> Tensor:
        return self.module.score_entries(query, candidates, seeds)

    def embed_batch(self, images: Sequence[Tensor]) -> Tensor:
        keys = [self._key(img) for img in images]
        todo = [i for i, k in enumerate(keys) if k not in self._desc]
        for i in todo:  # one at a time: eval images differ in size
            self._desc[keys[i]] = self.module.embed_batch([images[i]])[0].cpu()
        return torch.stack([self._desc[k] for k in keys])


def evaluate(model: SweepModel, eval_set: Any, directory: Path, setting: dict,
             config: Any) -> tuple[dict[str, Any], Tensor]:
    """Re-ranked metrics, stored bytes per database image and the verifier's shortlist scores
    (``{query: (positions, scores)}``) of one setting, through the core; and the global
    descriptors (queries first)."""
    from retrieval_lightning.retrieval.rerank_eval import evaluate_reranked, extract_entries

    identity = {"benchmark": "sparsity_sweep", "weights": model.module.entry_identity()["weights_sha256"], **setting}
    descriptors, query_store, db_store = extract_entries(model, eval_set, directory, identity, progress=False)
    result = evaluate_reranked(model, eval_set, descriptors, query_store, db_store, config, progress=False)
    row = {"mAP_M": result.metrics["mAP_M"], "mAP_H": result.metrics["mAP_H"], **per_query_ap(result),
           "bytes": sum(db_store.bytes_per_image.values()), "scores": result.extra["rerank_scores"]}
    return row, descriptors


def per_query_ap(result: Any) -> dict[str, list[float]]:
    """Each query's AP-M and AP-H (``ap_M``, ``ap_H``): what the paired intervals between two rows need."""
    from retrieval_lightning.evaluation import AP_PER_QUERY

    return {f"ap_{s}": [float(v) for v in result.extra[AP_PER_QUERY][s]] for s in ("M", "H")}


def same_verifier(a: Any, b: Any) -> bool:
    """Whether two modules' verifiers hold identical weights."""
    first, second = a.rerank_head.state_dict(), b.rerank_head.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def group_by_verifier(modules: Sequence[Any]) -> list[list[int]]:
    """Positions of ``modules`` grouped by identical verifier weights, in first-seen order: sparsifiers
    trained with the verifier frozen share one; each fine-tuned along with its sparsifier has its own."""
    groups: list[list[int]] = []
    for i, module in enumerate(modules):
        for group in groups:
            if same_verifier(module, modules[group[0]]):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def stage_verifier(path: str | None, sparsifier_ckpt: str, modules: Sequence[Any]) -> Any | None:
    """The verifier stage's model (``path``, else the ``init_from`` the first sparsifier checkpoint
    was trained with) when the sparsifier stage fine-tuned its verifier, else ``None``.

    Why: the dense row of a fine-tuned sparsifier is scored with that fine-tuned verifier, which the
    sparsifier stage also trained; what CVNet-DS replaces is the verifier stage's dense store, so
    that is the other comparison a user wants."""
    from retrieval_lightning.checkpoints import load_tensor_file
    from retrieval_lightning.module import RetrievalModule

    path = path or (load_tensor_file(sparsifier_ckpt).get("hyper_parameters") or {}).get("init_from")
    if not path:
        return None
    if not Path(path).is_file():
        print(f"note: the verifier stage's checkpoint {path} is not found (pass --verifier-ckpt): no "
              f"'{BEFORE}' row", flush=True)
        return None
    before = RetrievalModule.load_from_checkpoint(path).eval()
    if before.rerank_head is None or any(same_verifier(before, m) for m in modules):
        return None
    return before


def sweep(model: SweepModel, learned: Sequence[Any], eval_set: Any, stores: Path, args: argparse.Namespace,
          t0: float) -> list[dict[str, Any]]:
    """The rows of one verifier: global only, dense, then every selection x keep ratio x fill x values,
    ``learned`` being the sparsifiers trained with this verifier (their mean)."""
    from retrieval_lightning.evaluation import evaluate_eval_set

    trained, config = learned[0], model.module.rerank
    rows: list[dict[str, Any]] = []
    model.sparsifier = None
    dense, descriptors = evaluate(model, eval_set, stores / "dense", {"setting": "dense"}, config)
    glob = evaluate_eval_set(eval_set, descriptors)
    rows.append({"setting": "global only", "ratio": None, "bytes": None, "mAP_M": glob.metrics["mAP_M"],
                 "mAP_H": glob.metrics["mAP_H"], **per_query_ap(glob)})
    dense_scores = dense.pop("scores")
    rows.append({"setting": "dense", "ratio": 1.0, **dense, **fidelity(dense_scores, dense_scores)})
    print(json.dumps(rows[-2]), json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    fills = [trained.fill_sigma] if args.fills is None else [float(f) for f in args.fills.split(",")]
    values = [trained.value_dtype] if args.values is None else args.values.split(",")
    for fill, value_dtype in ((f, v) for f in fills for v in values):
        for selection in selections_of(trained):
            for ratio in (float(r) for r in args.ratios.split(",")):
                setting = {"setting": selection, "ratio": ratio, "values": value_dtype, "fill_sigma": fill}
                runs = []
                for run, head in enumerate(variants(selection, learned, trained, args.random_draws)):
                    head.keep_ratio, head.budget, head.fill_sigma, head.value_dtype = ratio, None, fill, value_dtype
                    model.sparsifier = head
                    directory = stores / f"{selection}-{ratio}-fill{fill}-{value_dtype}-run{run}"
                    row = evaluate(model, eval_set, directory, {**setting, "run": run}, config)[0]
                    runs.append({**row, **fidelity(row.pop("scores"), dense_scores)})
                rows.append({**setting, **mean_of_runs(runs)})
                print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    return rows


def merge_verifiers(per_verifier: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several verifiers (same settings, same order) -> one row per setting: the mean over the
    verifiers, each verifier's value kept under ``<name>_runs`` (its own runs' mean)."""
    merged = []
    for same in zip(*per_verifier):
        row = dict(same[0])
        for key in ("mAP_M", "mAP_H", "score_mad", "kendall_tau", "bytes"):
            if all(r.get(key) is not None for r in same):
                row[key] = float(np.mean([r[key] for r in same]))
                row[f"{key}_runs"] = [r[key] for r in same]
        for key in ("ap_M", "ap_H"):
            row[key] = np.mean([r[key] for r in same], axis=0).tolist()
            row[f"{key}_runs"] = [r[key] for r in same]
        merged.append(row)
    return merged


def variants(selection: str, learned: Sequence[Any], trained: Any, random_draws: int) -> list[Any]:
    """The heads one setting is scored with, each a copy sharing its trained parameters (only the
    stored form and scoring differ): one per trained sparsifier (learned), one per random draw
    (random), one (norm: top-k by norm does not depend on training or chance)."""
    bases = {"learned": learned, "random": [trained] * max(random_draws, 1)}.get(selection, [trained])
    heads = []
    for draw, base in enumerate(bases):
        head = copy.copy(base)
        head.selection, head.random_draw = selection.split("+")[0], draw
        if selection == "norm":
            head.spread = 0.0  # the baseline: plain top-k by feature norm
        heads.append(head)
    return heads


def mean_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's runs (sparsifier seeds or random draws) -> their mean, with every run's mAP-M/H,
    score MAD and Kendall tau kept under ``<name>_runs``."""
    keys = ("mAP_M", "mAP_H", "score_mad", "kendall_tau", "bytes")
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"{k}_runs": [r[k] for r in runs] for k in keys[:4]} if len(runs) > 1 else {})
    out.update({k: np.mean([r[k] for r in runs], axis=0).tolist() for k in ("ap_M", "ap_H")})  # per query
    return out


def with_range(row: dict[str, Any], key: str) -> str:
    """``mean`` or ``mean (min - max)`` of a row's runs."""
    runs = row.get(f"{key}_runs")
    return f"{row[key]:.2f}" + (f" ({min(runs):.2f} – {max(runs):.2f})" if runs else "")


def fidelity(scores: dict, dense: dict) -> dict[str, float]:
    """How far a setting's verifier scores are from the dense verifier's on the same shortlists,
    without labels: mean absolute difference and mean per-query Kendall tau of the two orders.

    Why: 10 queries' mAP moves by points when a few ranks swap, while these use every shortlisted
    pair (K per query), so they separate settings that mAP on the demo cannot.
    """
    from scipy.stats import kendalltau

    diffs, taus = [], []
    for query, (positions, values) in scores.items():
        ref_positions, ref = dense[query]
        order = {int(p): i for i, p in enumerate(ref_positions)}
        ref = np.asarray(ref, dtype=np.float64)[[order[int(p)] for p in positions]]
        values = np.asarray(values, dtype=np.float64)
        diffs.append(np.abs(values - ref))
        if len(values) > 1:
            tau = kendalltau(values, ref).statistic
            taus.append(1.0 if np.isnan(tau) else float(tau))  # nan: constant scores on both sides
    return {"score_mad": float(np.concatenate(diffs).mean()), "kendall_tau": float(np.mean(taus))}


def r50_bytes(head: Any) -> dict[str, float]:
    """Stored bytes per image at the head's setting for R50 shapes at 768x1024 (256-ch levels)."""
    from heads._sparse import codec
    from retrieval_lightning.head import EntryKind

    dense = {}
    for i in range(3):
        dense[f"level{i}"] = EntryKind("float16", (256,), True)
        dense[f"level{i}_hw"] = EntryKind("int32", (2,))
    sizes = [h * w for h, w in R50_LEVELS]
    dense_rows = {f"level{i}": n for i, n in enumerate(sizes)}
    return {"sparse": head.stored_bytes(dense, sizes), "dense_fp16_levels": codec.bytes_per_image(dense, dense_rows),
            "conv4_fp32": R50_CONV4_FP32, "kept": sum(head._counts(sizes))}


def r50_entry() -> dict[str, Tensor]:
    """A dense verifier entry of R50 shapes at 768x1024 (random 256-channel fp16 rows)."""
    gen = torch.Generator().manual_seed(0)
    entry: dict[str, Tensor] = {}
    for i, (h, w) in enumerate(R50_LEVELS):
        entry[f"level{i}"] = torch.randn(h * w, 256, generator=gen).half()
        entry[f"level{i}_hw"] = torch.tensor([h, w], dtype=torch.int32)
    return entry


def r50_select_ms(head: Any, repeats: int = 3) -> tuple[float, float]:
    """Milliseconds to sparsify one R50-shaped entry by norm with plain top-k and with the head's spread."""
    entry, out = r50_entry(), []
    for spread in (0.0, head.spread):
        probe = copy.copy(head)
        probe.selection, probe.spread = "norm", spread
        start = time.perf_counter()
        for _ in range(repeats):
            probe.sparsify([entry])
        out.append((time.perf_counter() - start) / repeats * 1000)
    return out[0], out[1]


def r50_densify_ms(head: Any, repeats: int = 10) -> dict[float, float]:
    """Milliseconds to turn one R50-shaped (768x1024) sparse entry back into the verifier's dense
    levels, with dropped locations zero and filled as ``head`` fills them (random rows)."""
    entry = r50_entry()
    probe = copy.copy(head)
    probe.selection = "norm"
    sparse = probe.sparsify([entry])
    out = {}
    for fill in sorted({0.0, head.fill_sigma}):
        probe.fill_sigma = fill
        probe.densify(sparse)
        start = time.perf_counter()
        for _ in range(repeats):
            probe.densify(sparse)
        out[fill] = (time.perf_counter() - start) / repeats * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier-config", default="experiments/cvnet_demo.yaml")
    parser.add_argument("--config", default="experiments/cvnet_ds_demo.yaml")
    parser.add_argument("--verifier-ckpt", default=None,
                        help="the verifier stage's checkpoint to train the sparsifiers from (default: train it with "
                             "--verifier-config); with --sparsifier-ckpt, the one their dense row is also compared "
                             "with (default: their init_from)")
    parser.add_argument("--sparsifier-ckpt", default=None,
                        help="comma-separated trained sparsifier checkpoints to score instead of training them")
    parser.add_argument("--output", default="outputs/sparsity_sweep")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seed_everything values: one sparsifier trained per seed; the learned "
                             "rows are their mean (each scored with its own verifier when it was fine-tuned along; "
                             "ignored with --sparsifier-ckpt)")
    parser.add_argument("--random-draws", type=int, default=5,
                        help="random selections drawn per setting; the random rows are their mean")
    parser.add_argument("--data-args", default="",
                        help="space-separated data overrides for both fits and the evaluation, given with "
                             "'=' (the value starts with '--'), e.g. "
                             "--data-args='--data.init_args.photo_dirs=[more/photos]'")
    parser.add_argument("--sparsifier-args", default="",
                        help="space-separated overrides for the sparsifier's fit, e.g. "
                             "'--model.optim.lr=0.03 --trainer.max_epochs=12'")
    parser.add_argument("--fills", default=None,
                        help="comma-separated fill_sigma values to score with (0: dropped locations are zero); "
                             "default: the sparsifier's own")
    parser.add_argument("--values", default=None,
                        help="comma-separated stored value types to score with (float16, int8, int4); "
                             "default: the sparsifier's own")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sp_ckpts = args.sparsifier_ckpt.split(",") if args.sparsifier_ckpt else []
    verifier_ckpt = args.verifier_ckpt
    if not sp_ckpts:
        ckpt = args.verifier_ckpt or fit(args.verifier_config, str(out / "verifier"), args.data_args.split())
        verifier_ckpt = ckpt
        print(f"verifier checkpoint: {ckpt} ({time.time() - t0:.0f} s)", flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            overrides = [f"--model.init_from={ckpt}", f"--seed_everything={seed}", *args.data_args.split(),
                         *args.sparsifier_args.split()]
            sp_ckpts.append(fit(args.config, str(out / f"sparsifier_seed{seed}"), overrides))
    print(f"sparsifier checkpoints: {', '.join(sp_ckpts)} ({time.time() - t0:.0f} s)", flush=True)

    from retrieval_lightning.module import RetrievalModule

    module, datamodule = load(args.config, sp_ckpts[0], args.data_args.split())
    modules = [module] + [RetrievalModule.load_from_checkpoint(c).eval() for c in sp_ckpts[1:]]
    eval_set = datamodule.eval_sets("test")[0]
    config = module.rerank
    groups = group_by_verifier(modules)
    if len(groups) > 1:
        print(f"{len(groups)} different verifiers (fine-tuned along with their sparsifiers): each setting is scored "
              "with each sparsifier's own verifier, and a row is the mean over them", flush=True)
    per_verifier, models = [], [SweepModel(modules[members[0]]) for members in groups]
    for number, (members, model) in enumerate(zip(groups, models)):
        stores = out / "stores" / (f"verifier{number}" if len(groups) > 1 else "")
        per_verifier.append(sweep(model, [modules[i].sparsifier for i in members], eval_set, stores, args, t0))
    rows = per_verifier[0] if len(per_verifier) == 1 else merge_verifiers(per_verifier)
    before = stage_verifier(verifier_ckpt, sp_ckpts[0], modules)
    if before is not None:
        row = evaluate(SweepModel(before), eval_set, out / "stores" / "verifier_stage", {"setting": BEFORE},
                       module.rerank)[0]
        row.pop("scores")
        rows.insert(2, {"setting": BEFORE, "ratio": 1.0, **row})
        print(json.dumps(rows[2]), f"({time.time() - t0:.0f} s)", flush=True)
    model, trained = models[0], module.sparsifier

    nq = eval_set.n_queries
    print(f"\nminilandmarks test: {nq} queries, {len(eval_set.dataset) - nq} database images; re-ranking k={config.k} "
          f"({config.shortlist}), fusion {config.fusion} {config.weight}; sparse values {trained.value_dtype} "
          f"(scale {trained.int8_scale}), default keep ratio {trained.keep_ratio}, sparsifier trained with "
          f"fill_sigma {trained.fill_sigma}; learned: the mean of {len(modules)} trained sparsifier(s), random: of "
          f"{max(args.random_draws, 1)} draw(s)" + (f", every row the mean over {len(groups)} verifiers" if
                                                      len(groups) > 1 else "") + ", (min – max) of several")
    print("| selection | keep ratio | values | dropped locations | bytes / db image | KiB at R50 768x1024 "
          "| re-ranked mAP-M | re-ranked mAP-H | score MAD vs dense | Kendall tau vs dense |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    r50 = r50_bytes(trained)
    for r in rows:
        b = "-" if r["bytes"] is None else f"{r['bytes']:.0f}"
        fill = r.get("fill_sigma")
        dropped = "-" if fill is None else ("zero" if fill == 0 else f"filled (sigma {fill:g})")
        if r["setting"] in SELECTIONS:
            at_ratio = copy.copy(trained)
            at_ratio.keep_ratio, at_ratio.budget, at_ratio.value_dtype = r["ratio"], None, r["values"]
            kib = f"{r50_bytes(at_ratio)['sparse'] / 1024:.1f}"
        else:
            kib = f"{r50['dense_fp16_levels'] / 1024:.1f}" if r["setting"] in ("dense", BEFORE) else "-"
        mad, tau = (f"{r[k]:.4f}" if k in r else "-" for k in ("score_mad", "kendall_tau"))
        print(f"| {r['setting']} | {r['ratio'] if r['ratio'] is not None else '-'} | {r.get('values', '-')} | "
              f"{dropped} | {b} | {kib} | {with_range(r, 'mAP_M')} | {with_range(r, 'mAP_H')} | {mad} | {tau} |")
    default = {"ratio": trained.keep_ratio, "values": trained.value_dtype, "fill_sigma": trained.fill_sigma}
    print_gaps(rows, {"setting": "learned", **default})
    if len(groups) > 1:
        print_per_verifier(rows, default, [checkpoint_label(sp_ckpts[members[0]]) for members in groups])
    print(f"\nR50 768x1024 at the default setting: {r50['kept']} of {sum(h * w for h, w in R50_LEVELS)} locations, "
          f"{r50['sparse'] / 1024:.1f} KiB per image (goal <= 120 KiB); dense fp16 levels "
          f"{r50['dense_fp16_levels'] / 2**20:.2f} MiB ({r50['dense_fp16_levels'] / r50['sparse']:.1f}x); "
          f"official fp32 conv4 map {r50['conv4_fp32'] / 2**20:.1f} MiB ({r50['conv4_fp32'] / r50['sparse']:.1f}x, "
          "goal >= 100x)")
    ms = r50_densify_ms(trained)
    print("densifying one R50 768x1024 sparse entry for scoring: " +
          ", ".join(f"dropped {'zero' if f == 0 else f'filled (sigma {f:g})'} {t:.1f} ms" for f, t in ms.items()) +
          " (the verifier then takes ~380 ms per pair, benchmarks/cvnet_rerank.py)")
    if trained.spread > 0:
        plain_ms, spread_ms = r50_select_ms(trained)
        print(f"selecting the kept locations of one R50 768x1024 entry (top-k by norm): plain {plain_ms:.1f} ms, "
              f"spread {trained.spread:g} {spread_ms:.1f} ms ({spread_ms / plain_ms:.1f}x; once per database image, "
              "offline)")
    plot(rows, out / "sparsity_sweep.png", {"setting": "learned", **default})
    plot_kept(model, trained, eval_set, out / "kept_locations.png")
    (out / "sparsity_sweep.json").write_text(json.dumps({"rows": rows, "r50": r50, "checkpoints": sp_ckpts}, indent=1))
    print(f"plots: {out / 'sparsity_sweep.png'}, {out / 'kept_locations.png'} ({time.time() - t0:.0f} s total)")
    return 0


def at_setting(row: dict, setting: dict) -> bool:
    """Whether a result row has every value of ``setting`` (e.g. the default keep ratio, values and fill)."""
    return all(row.get(k) == v for k, v in setting.items())


def print_gaps(rows: list[dict], default: dict) -> None:
    """The learned selection at the default setting against each dense row and each other selection at that
    setting, in mAP-M/H points, with the 95 % interval over the test queries (paired bootstrap of the per-query
    differences, averaged over the verifiers: the spread the queries give, not another training seed's)."""
    from retrieval_lightning.metrics import paired_bootstrap

    learned = [r for r in rows if at_setting(r, default)]
    if not learned:
        return
    same_bytes = {k: v for k, v in default.items() if k != "setting"}
    selections = [r for r in rows if r["setting"] in SELECTIONS and r["setting"] != default["setting"]]
    others = [r for r in rows if r["setting"] in ("dense", BEFORE)]
    others += [r for r in selections if at_setting(r, same_bytes)]
    for other in others:
        gaps = ", ".join(f"{key[4:]} {paired_bootstrap(learned[0][f'ap_{key[4:]}'], other[f'ap_{key[4:]}'])}"
                         for key in ("mAP_M", "mAP_H"))
        runs = learned[0].get("mAP_H_runs"), other.get("mAP_H_runs")
        per_run = (" (per verifier: " + ", ".join(f"{a - b:+.2f}" for a, b in zip(*runs)) + ")"
                   if all(runs) else "")
        print(f"learned at the default setting minus {other['setting']}: {gaps}{per_run}")


def checkpoint_label(path: str) -> str:
    """A short name for a checkpoint: its file stem, or for ``final``/``last`` the run directory above
    (``outputs/sweep/sparsifier_seed4/final.ckpt`` -> ``sparsifier_seed4``)."""
    p = Path(path)
    if p.stem not in ("final", "last"):
        return p.stem
    parent = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return parent.name or p.stem


def print_per_verifier(rows: list[dict], default: dict, labels: Sequence[str]) -> None:
    """mAP-H of every selection at the default setting, one line per fine-tuned verifier (the table
    averages them), with the learned selection's gap to dense in mAP-H and mAP-M and the gap's 95 %
    interval over the test queries (paired bootstrap): whether the queries can tell the two apart."""
    from retrieval_lightning.metrics import paired_bootstrap

    dense = next(r for r in rows if r["setting"] == "dense")
    at_default = {r["setting"]: r for r in rows if at_setting(r, default)}
    shown = [name for name in SELECTIONS if name in at_default]
    if "learned" not in at_default or not all("mAP_H_runs" in at_default[n] for n in shown):
        return
    print(f"\nper verifier, mAP-H at the default setting (keep ratio {default['ratio']}, {default['values']}):")
    print("| sparsifier | dense | " + " | ".join(shown) + " | learned − dense, mAP-H [95 % over queries] | mAP-M |")
    print("|---" * (len(shown) + 4) + "|")
    learned = at_default["learned"]
    for i, label in enumerate(labels):
        cells = [f"{at_default[n]['mAP_H_runs'][i]:.2f}" for n in shown]
        gap_h = paired_bootstrap(learned["ap_H_runs"][i], dense["ap_H_runs"][i])
        gap_m = paired_bootstrap(learned["ap_M_runs"][i], dense["ap_M_runs"][i])
        print(f"| {label} | {dense['mAP_H_runs'][i]:.2f} | " + " | ".join(cells) + f" | {gap_h} | {gap_m} |")


def plot_kept(model: SweepModel, trained: Any, eval_set: Any, path: Path, images: int = 4) -> None:
    """Which locations each selection keeps at the default setting, on database images of the
    first queries' landmarks: the finest level's kept cells (the conv4 grid) over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    nq = eval_set.n_queries
    chosen: list[int] = []
    for query in eval_set.ground_truth:
        chosen += [int(i) for i in sorted([*query.get("easy", []), *query.get("hard", [])]) if int(i) not in chosen][:2]
        if len(chosen) >= images:
            break
    chosen = chosen[:images]
    if not chosen:  # no query has a positive in the database: nothing to show
        return
    selections = selections_of(trained)
    fig, axes = plt.subplots(len(chosen), len(selections), figsize=(3.2 * len(selections), 2.6 * len(chosen)),
                             squeeze=False)
    for row, db in enumerate(chosen):
        image = eval_set.dataset[nq + db]["image"]
        entry = model.selection_input(image)  # the dense entry the sweep already made
        level = sorted(k for k in entry if k.endswith("_hw"))[-1][: -len("_hw")]  # the finest level
        h, w = (int(v) for v in entry[f"{level}_hw"])
        height, width = image.shape[1:]
        for col, selection in enumerate(selections):
            head = variants(selection, [trained], trained, 1)[0]
            kept = head.sparsify([entry])[0][f"{level}_pos"].long()
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            for p in kept.tolist():
                y, x = divmod(p, w)
                ax.add_patch(Rectangle((x * width / w, y * height / h), width / w, height / h,
                                       facecolor="yellow", edgecolor="black", alpha=0.45, lw=0.5))
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{selection}: {len(kept)} of {h * w} cells", fontsize=9)
    fig.suptitle(f"kept locations at keep ratio {trained.keep_ratio:g}, finest level (the cell counts: the "
                 "first row's image); database images of the first queries' landmarks", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot(rows: list[dict], path: Path, default: dict | None = None) -> None:
    """mAP-M, mAP-H and the Kendall tau against dense, each against stored KiB per database image:
    one colour per (dropped-location fill, stored values), one marker per selection; ``default``
    (a row's setting, ratio, values and fill) is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = sorted({(r["fill_sigma"], r["values"]) for r in rows if "fill_sigma" in r})
    colours = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, key in zip(axes, ("mAP_M", "mAP_H", "kendall_tau")):
        for (fill, values), color in zip(forms, colours):
            for selection, style in zip(SELECTIONS, STYLES):
                pts = [(r["bytes"] / 1024, r[key]) for r in rows
                       if r["setting"] == selection and (r["fill_sigma"], r["values"]) == (fill, values)]
                if not pts:
                    continue
                dropped = "zero" if fill == 0 else f"filled, sigma {fill:g}"
                label = f"{selection} ({values}, dropped: {dropped})" if len(forms) > 1 else selection
                ax.plot(*zip(*pts), style, color=color, label=label)
        ring = [r for r in rows if default and at_setting(r, default)]
        if ring:
            ax.plot(ring[0]["bytes"] / 1024, ring[0][key], "o", ms=14, mfc="none", mec="k", label="default setting")
        before = [r for r in rows if r["setting"] == BEFORE]
        for r, color in ((rows[1], "k"), (rows[0], "grey"), *((r, "tab:olive") for r in before)):
            if key in r:
                ax.axhline(r[key], color=color, lw=0.8, label=r["setting"])
        ax.set_xscale("log")
        ax.set_xlabel("stored KiB per database image")
        ax.set_ylabel("Kendall tau of the verifier's scores vs dense" if key == "kendall_tau" else f"re-ranked {key}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle("CVNet-DS sparsifier on minilandmarks")
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
