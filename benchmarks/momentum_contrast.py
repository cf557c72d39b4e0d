"""Cost of CVNet-Global's momentum-contrastive loss (``model.momentum_contrast``), measured in this run.

1. **Step time**: the same model (EfficientNet-Lite0 + GeM/CurricularFace head), batch and optimiser,
   trained with and without the contrast; the contrast adds the momentum copy's forward pass, its EMA
   update and the loss. Prints both per-step times and their ratio.
2. **Peak memory of the loss** on a few-class set, where every query has thousands of positive pairs
   in the queue: the pairs taken in recomputed chunks (``CHUNK_ELEMENTS``, the default) against all at
   once, each in a fresh process (peak RSS growth over the RSS before the loss, with glibc returning freed
   blocks at once so that RSS follows the live tensors), with the largest difference of the two losses and
   gradients.

    .venv/bin/python benchmarks/momentum_contrast.py [--steps 10 --batch 16 --size 128]
    .venv/bin/python benchmarks/momentum_contrast.py --queries 18 --classes 10 --queue 16384 --dim 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _fresh_process import peak_growth_mib, run_variant, start_peak


def step_times(steps: int, batch: int, size: int) -> dict[str, float]:
    from retrieval_lightning.backbone import Backbone
    from retrieval_lightning.momentum_contrast import MomentumContrastConfig
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.registry import HEADS

    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    labels = torch.arange(batch) % max(1, batch // 4)  # four images per class: the batch has positives
    out = {}
    for name, contrast in (("without", None), ("with", MomentumContrastConfig(queue_size=4096))):
        head = HEADS.get("gem_arcface")(margin="curricularface", margin_m=0.15, scale=30.0, learn_p=True)
        module = RetrievalModule(Backbone("efficientnet_lite0", weights="efficientnet_lite0_package"),
                                 {"global": head}, num_classes=int(labels.max()) + 1, momentum_contrast=contrast)
        module.log = lambda *args, **kwargs: None  # no Trainer: logging is not what is measured
        module.train()
        if module.momentum_contrast is not None:
            module.momentum_contrast.reset(module.backbone, module.global_head)
        optimiser = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        times = []
        for step in range(steps + 2):  # two warm-up steps
            start = time.perf_counter()
            loss = module.training_step({"image": images, "label": labels}, step)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            times.append(time.perf_counter() - start)
        out[name] = sum(times[2:]) / steps
    return out


def loss_memory(variant: str, queries: int, classes: int, queue: int, dim: int) -> dict:
    """Run in a fresh process: peak RSS growth of one loss forward + backward."""
    import retrieval_lightning.momentum_contrast as mc
    from retrieval_lightning.layers.margins import CurricularFaceMargin

    if variant == "whole":
        mc.CHUNK_ELEMENTS = 1 << 62
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(queue, dim, generator=g), dim=-1)
    key_labels = torch.arange(queue) % classes
    q = F.normalize(torch.randn(queries, dim, generator=g), dim=-1).requires_grad_()
    labels = torch.arange(queries) % classes
    margin = CurricularFaceMargin(scale=30.0, margin=0.15).train()
    before = start_peak()
    start = time.perf_counter()
    loss, with_positive = mc.contrastive_loss(margin, q, labels, keys, key_labels, torch.full((queries,), -1))
    loss.backward()
    seconds = time.perf_counter() - start
    grown = peak_growth_mib(before)
    pairs = int((labels[:, None] == key_labels[None, :]).sum())
    return {"variant": variant, "peak_growth_mib": grown, "seconds": seconds, "pairs": pairs,
            "loss": float(loss), "grad": q.grad.flatten().tolist()[:4096]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--queries", type=int, default=18)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--queue", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--memory-only", choices=["chunked", "whole"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory_only:
        print(json.dumps(loss_memory(args.memory_only, args.queries, args.classes, args.queue, args.dim)))
        return

    times = step_times(args.steps, args.batch, args.size)
    print(f"training step, batch {args.batch} at {args.size} px (EfficientNet-Lite0, CPU, {torch.get_num_threads()} "
          f"threads): without the contrast {times['without'] * 1000:.0f} ms, with it {times['with'] * 1000:.0f} ms "
          f"(x{times['with'] / times['without']:.2f})")
    runs = {variant: run_variant(__file__, ["--memory-only", variant, "--queries", str(args.queries), "--classes",
                                            str(args.classes), "--queue", str(args.queue), "--dim", str(args.dim)])
            for variant in ("chunked", "whole")}
    chunked, whole = runs["chunked"], runs["whole"]
    grad = max(abs(a - b) for a, b in zip(chunked["grad"], whole["grad"]))
    print(f"contrastive loss, {args.queries} queries of {args.classes} classes against a queue of {args.queue} "
          f"({chunked['pairs']} positive pairs, {args.dim}-D): peak RSS growth chunked "
          f"{chunked['peak_growth_mib']:.0f} MiB ({chunked['seconds']:.2f} s), all at once "
          f"{whole['peak_growth_mib']:.0f} MiB ({whole['seconds']:.2f} s); "
          f"largest difference: loss {abs(chunked['loss'] - whole['loss']):.2e}, gradient {grad:.2e}")


if __name__ == "__main__":
    main()
