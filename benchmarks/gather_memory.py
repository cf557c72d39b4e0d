"""Peak memory of gathering every rank's descriptors (what ``test`` does under DDP), whole against sliced.

``test`` all-gathers each eval set's global descriptors so that every rank computes the same metrics.
Gathered whole, the communication device holds every rank's rows twice (the gathered parts, then their
concatenation); under NCCL that device is the GPU, where ROxford+1M at 2048-D fp32 would need 16 GB.
:func:`retrieval_lightning.retrieval.gather._all_gather_rows` moves the rows in slices of
``GATHER_SLICE_BYTES`` (256 MiB over all ranks) and assembles the result on the CPU.

Each slice's rows are written straight to their place in the de-duplicated, sorted result, so the
CPU holds the result once instead of the gathered rows plus their sorted copy.

With a ``spill`` config (the module's default from 1 GiB up) the result is not held in each rank's memory
at all: it is gathered into one file per machine that every rank maps (:mod:`retrieval_lightning.retrieval.spill`),
so the machine holds the descriptors once, as page cache, however many ranks it runs.

This runs 2 gloo processes (the communication device is the CPU here, so the saving shows in RSS)
that each hold ``n / 2`` rows of ``dim`` fp32 values and gather them, in fresh processes per path:
the baseline gathers whole and de-duplicates after (the code before slicing, kept here), then
``gather_dedupe`` in memory, then ``gather_dedupe`` spilled to a file. It prints each rank's peak RSS
growth over its RSS before the gather, the anonymous memory each rank holds after it, and what the
machine holds for both ranks together (the sum of their proportional set sizes, which counts a page
the two share once), and checks that all give the same rows.

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
    import hashlib, json, os, sys, time
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from retrieval_lightning.retrieval import gather
    from retrieval_lightning.retrieval.spill import SpillConfig

    def kib(path, field):
        for line in open(path):
            if line.startswith(field + ":"):
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
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts at the RSS now
        before = kib("/proc/self/status", "VmRSS")
        anon_before, pss_before = kib("/proc/self/status", "RssAnon"), kib("/proc/self/smaps_rollup", "Pss")
        start = time.perf_counter()
        if mode == "whole":
            index, arrays = gather_whole(rows, local)
        elif mode == "sliced":
            index, arrays = gather.gather_dedupe(None, rows, desc=local)
        else:
            spill = SpillConfig(min_bytes=0, dir=f"{out}/spill")
            index, arrays = gather.gather_dedupe(None, rows, spill=spill, desc=local)
        seconds = time.perf_counter() - start
        arrays["desc"].sum()  # every page read once, as an evaluation reads them
        peak = kib("/proc/self/status", "VmHWM")
        anon = kib("/proc/self/status", "RssAnon") - anon_before
        pss = kib("/proc/self/smaps_rollup", "Pss") - pss_before
        digest = hashlib.sha256(arrays["desc"].numpy().tobytes()).hexdigest()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"growth_mib": (peak - before) / 1024, "local_mib": local.numel() * 4 / 2**20,
                       "anon_mib": anon / 1024, "pss_mib": pss / 1024,
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


def run(n: int, dim: int, mode: str, spill_root: str | None) -> list[dict]:
    """Gather in 2 fresh gloo processes, ``whole`` (the baseline), ``sliced`` (``gather_dedupe``) or ``spilled``
    (``gather_dedupe`` into a file under ``spill_root``, a temporary directory on a disk)."""
    with tempfile.TemporaryDirectory(dir=spill_root) as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        subprocess.run([sys.executable, str(script), str(_free_port()), str(n), str(dim), mode, tmp],
                       check=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows over both ranks")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spill-dir", default=None,
                        help="where the spilled run's file goes (default: the system's temporary directory; "
                             "a tmpfs there holds the file in memory, so give a disk)")
    args = parser.parse_args()
    total_mib = args.n * args.dim * 4 / 2**20
    runs = {mode: run(args.n, args.dim, mode, args.spill_dir) for mode in ("whole", "sliced", "spilled")}
    digests = {r["digest"] for res in runs.values() for r in res}
    assert len(digests) == 1, "the gathers gave different rows"
    print(f"{args.n:,} rows x {args.dim} fp32 over 2 gloo ranks: {total_mib:,.0f} MiB gathered on every rank")
    print("| gather | peak RSS growth, rank 0 / 1 (MiB) | anonymous memory after, rank 0 / 1 (MiB) | "
          "machine total after, both ranks (MiB) | x gathered size | seconds, rank 0 |")
    print("|---|---|---|---|---|---|")
    names = {"whole": "whole, then de-duplicated (before)", "sliced": "sliced into sorted rows (`gather_dedupe`)",
             "spilled": "spilled: one mapped file (`spill`)"}
    for mode, res in runs.items():
        growth, anon = [r["growth_mib"] for r in res], [r["anon_mib"] for r in res]
        machine = sum(r["pss_mib"] for r in res)
        print(f"| {names[mode]} | {growth[0]:,.0f} / {growth[1]:,.0f} | {anon[0]:,.0f} / {anon[1]:,.0f} | "
              f"{machine:,.0f} | {machine / total_mib:.2f} | {res[0]['seconds']:.2f} |")
    peak = {mode: max(r["growth_mib"] for r in res) for mode, res in runs.items()}
    machine = {mode: sum(r["pss_mib"] for r in res) for mode, res in runs.items()}
    print(f"sliced / whole peak growth: {peak['sliced'] / peak['whole']:.2f}x; spilled / sliced machine total: "
          f"{machine['spilled'] / machine['sliced']:.2f}x (1 / ranks per machine); identical rows everywhere")


if __name__ == "__main__":
    main()
