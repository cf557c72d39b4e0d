"""``evaluate`` at +1M scale: metrics from a memory-mapped fp16 store against holding the descriptors in memory.

``test`` gathers every eval item's fp32 descriptor on every rank, then scores them; ``evaluate`` scores
the store ``extract`` wrote, memory-mapped, in chunks. This builds a synthetic revisitop-style eval set
(default: 70 queries + 1,000,000 database items, 512-D, fp16 store; each query is a noisy copy of a
database row, its "easy" positive; three noisier copies are its "hard" positives; two random rows junk), then evaluates it in a
fresh subprocess per path, so memory is measured from "after imports" (peak RSS minus RSS before the
store is opened; memory-mapped pages that are read count in RSS):

- ``memory``: the store's rows read into one fp32 tensor (what ``test`` holds), then evaluated;
- ``store``: :func:`retrieval_lightning.retrieval.store_eval.stored_descriptors` (the memory map as a
  tensor) evaluated by the same :func:`retrieval_lightning.evaluation.evaluate_eval_set`.

Both see the same fp16 values and score them in fp32, so their metrics must be equal.

    python benchmarks/evaluate_store.py              # 1M x 512
    python benchmarks/evaluate_store.py --n 200000   # a smaller run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _fresh_process import peak_growth_mib, start_peak

N_QUERIES = 70


def build(directory: Path, n: int, dim: int, seed: int = 0) -> None:
    """Queries first, then the database, as ``extract`` stores an eval set; ground truth beside it."""
    import torch

    from retrieval_lightning.retrieval.store import FeatureStore, KindSpec

    gen = torch.Generator().manual_seed(seed)
    total = N_QUERIES + n
    builder = FeatureStore.create(directory / "store", {"global": KindSpec("float16", (dim,))}, total,
                                  {"synthetic": seed, "n": n, "dim": dim}, overwrite=True)
    builder.index[:] = np.arange(total)
    out = builder.array("global")
    for a in range(N_QUERIES, total, 65536):
        b = min(a + 65536, total)
        out[a:b] = torch.nn.functional.normalize(torch.randn(b - a, dim, generator=gen), dim=1).half().numpy()
    rows = np.sort(torch.randperm(n, generator=gen)[: N_QUERIES * 6].numpy()).reshape(N_QUERIES, 6)
    base = torch.from_numpy(np.asarray(out[N_QUERIES + rows[:, 0]], dtype=np.float32))

    def noisy(scale: float) -> np.ndarray:
        noise = torch.randn(base.shape, generator=gen) / dim**0.5
        return torch.nn.functional.normalize(base + scale * noise, dim=1).half().numpy()

    out[:N_QUERIES] = noisy(0.6)
    for j, scale in zip(range(1, 4), (2.0, 3.0, 4.0)):  # hard positives: further from the query
        out[N_QUERIES + rows[:, j]] = noisy(scale)
    builder.commit()
    truth = [{"bbx": [0, 0, 1, 1], "easy": [int(r[0])], "hard": [int(x) for x in r[1:4]], "junk": [int(x) for x in r[4:]]}
             for r in rows]
    (directory / "gnd.json").write_text(json.dumps(truth))


def measure(mode: str, directory: Path) -> dict:
    """Evaluate in this (fresh) process; time and peak RSS growth after imports."""
    import torch

    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.evaluation import evaluate_eval_set
    from retrieval_lightning.retrieval.store import FeatureStore
    from retrieval_lightning.retrieval.store_eval import stored_descriptors

    truth = json.loads((directory / "gnd.json").read_text())
    torch.set_num_threads(2)
    before = start_peak()
    start = time.perf_counter()
    store = FeatureStore.open(directory / "store")
    eval_set = EvalSet("synthetic", range(len(store)), N_QUERIES, "revisitop", truth)
    descriptors = stored_descriptors(eval_set, store)
    if mode == "memory":
        descriptors = descriptors.float().clone()  # what `test` gathers: every item's fp32 descriptor
    result = evaluate_eval_set(eval_set, descriptors)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "peak_growth_mib": peak_growth_mib(before),
            "store_mib": store.nbytes / 2**20, "metrics": result.metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database items")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--measure", choices=("memory", "store"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.dir))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build(Path(tmp), args.n, args.dim)
        print(f"built a store of {N_QUERIES} queries + {args.n:,} items x {args.dim} fp16 "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        runs = {}
        for mode in ("memory", "store"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--dir", tmp, "--n", str(args.n)],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode] = json.loads(out.strip().splitlines()[-1])
    base, store = runs["memory"], runs["store"]
    print(f"store on disk: {store['store_mib']:.0f} MiB")
    print("| path | time (s) | peak RSS growth (MiB) | growth / store size |")
    print("|---|---|---|---|")
    for run in (base, store):
        print(f"| {run['mode']} | {run['seconds']:.1f} | {run['peak_growth_mib']:.0f} | "
              f"{run['peak_growth_mib'] / run['store_mib']:.2f} |")
    print(f"memory ratio store / memory: {store['peak_growth_mib'] / base['peak_growth_mib']:.2f}; "
          f"time ratio: {store['seconds'] / base['seconds']:.2f}")
    same = base["metrics"] == store["metrics"]
    print(f"metrics equal: {same} (mAP M / H {store['metrics']['mAP_M']:.2f} / {store['metrics']['mAP_H']:.2f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
