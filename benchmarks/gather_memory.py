"""Peak memory of gathering every rank's descriptors (what ``test`` does under DDP), whole against sliced.

``test`` all-gathers each eval set's global descriptors so that every rank computes the same metrics.
Gathered whole, the communication device holds every rank's rows twice (the gathered parts, then their
concatenation); under NCCL that device is the GPU, where ROxford+1M at 2048-D fp32 would need 16 GB.
:func:`retrieval_lightning.retrieval.gather._all_gather_rows` moves the rows in slices of
``GATHER_SLICE_BYTES`` (256 MiB over all ranks) and assembles the result on the CPU.

Each slice's rows are written straight to their place in the de-duplicated, sorted result, so the
CPU holds the result once instead of the gathered rows plus their sorted copy.

This runs 2 gloo processes (the communication device is the CPU here, so the saving shows in RSS)
that each hold ``n / 2`` rows of ``dim`` fp32 values and gather them, in fresh processes per path:
the baseline gathers whole and de-duplicates after (the code before slicing, kept here), then
``gather_dedupe``. It prints each rank's peak RSS growth over its RSS before the gather, and checks
that both give the same rows.

    python benchmarks/gather_memory.py                 # 1,000,000 x 256 fp32 (1 GB gathered)
    python benchmarks/gather_memory.py --n 200000
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, resource, sys, time
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from retrieval_lightning.retrieval import gather

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    def gather_whole(rows, local):
        # the gather before slicing: every rank's padded rows at once, concatenated, then de-duplicated
        n = torch.tensor([rows.numel()])
        counts = [torch.zeros_like(n) for _ in range(2)]
        dist.all_gather(counts, n)
        counts = [int(c) for c in counts]
        def whole(t):
            padded = torch.zeros(max(counts), *t.shape[1:], dtype=t.dtype)
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(2)]
            dist.all_gather(parts, padded)
            return torch.cat([p[:c] for p, c in zip(parts, counts)])
        return gather.dedupe_sort(whole(rows), desc=whole(local))

    def main(rank, port, n, dim, mode, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        rows = torch.arange(rank, n, 2)
        local = torch.randn(rows.numel(), dim, generator=torch.Generator().manual_seed(rank))
        dist.barrier()
        before = rss_kib()
        start = time.perf_counter()
        if mode == "whole":
            index, arrays = gather_whole(rows, local)
        else:
            index, arrays = gather.gather_dedupe(None, rows, desc=local)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        digest = hashlib.sha256(arrays["desc"].numpy().tobytes()).hexdigest()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"growth_mib": (peak - before) / 1024, "local_mib": local.numel() * 4 / 2**20,
                       "seconds": seconds, "digest": digest, "rows": int(index.numel())}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, n, dim, mode, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        mp.start_processes(main, args=(port, n, dim, mode, out), nprocs=2, start_method="spawn")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, dim: int, mode: str) -> list[dict]:
    """Gather in 2 fresh gloo processes, ``whole`` (the baseline) or ``sliced`` (``gather_dedupe``)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        subprocess.run([sys.executable, str(script), str(_free_port()), str(n), str(dim), mode, tmp],
                       check=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows over both ranks")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    total_mib = args.n * args.dim * 4 / 2**20
    whole = run(args.n, args.dim, "whole")
    sliced = run(args.n, args.dim, "sliced")
    assert whole[0]["digest"] == whole[1]["digest"] == sliced[0]["digest"] == sliced[1]["digest"], \
        "the sliced gather gave other rows than the whole one"
    print(f"{args.n:,} rows x {args.dim} fp32 over 2 gloo ranks: {total_mib:,.0f} MiB gathered on every rank")
    print("| gather | peak RSS growth, rank 0 / 1 (MiB) | x gathered size | seconds, rank 0 |")
    print("|---|---|---|---|")
    for name, res in (("whole, then de-duplicated (before)", whole),
                      ("sliced into sorted rows (`gather_dedupe`)", sliced)):
        growth = [r["growth_mib"] for r in res]
        print(f"| {name} | {growth[0]:,.0f} / {growth[1]:,.0f} | {max(growth) / total_mib:.2f} | "
              f"{res[0]['seconds']:.2f} |")
    ratio = max(r["growth_mib"] for r in sliced) / max(r["growth_mib"] for r in whole)
    print(f"sliced / whole peak growth: {ratio:.2f}x; identical rows on both ranks and in both runs")


if __name__ == "__main__":
    main()
