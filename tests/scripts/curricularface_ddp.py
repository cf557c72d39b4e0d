"""Two gloo processes train CurricularFace on different batches; both must end with the same ``t``,
equal to the moving average of the target cosine over the union of their batches."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval_lightning.layers import CurricularFaceMargin


def batch_for(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    n = 3 + rank  # unequal batch sizes: the statistic must weight by count, not by rank
    return torch.rand(n, 5, generator=g) * 2 - 1, torch.randint(0, 5, (n,), generator=g)


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    margin = CurricularFaceMargin(scale=1.0, margin=0.5, momentum=0.01).train()
    for step in range(3):
        cos, labels = batch_for(rank, step)
        margin(cos, labels)
    with open(os.path.join(out, f"t{rank}.json"), "w") as f:
        json.dump(float(margin.t), f)
    dist.destroy_process_group()


def expected_t(world: int) -> float:
    t = 0.0
    for step in range(3):
        targets = []
        for rank in range(world):
            cos, labels = batch_for(rank, step)
            targets.append(cos.clamp(-1 + 1e-7, 1 - 1e-7).gather(1, labels[:, None]).flatten())
        t = (1 - 0.01) * t + 0.01 * float(torch.cat(targets).mean())
    return t


if __name__ == "__main__":
    port, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected_t(2), f)
