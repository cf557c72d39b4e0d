"""Evaluation loaders as the core reads them, for any datamodule (the built-in ones and plugins alike).

Evaluation images keep their own sizes, so a batch is a list of images rather than one tensor; the core reads the
keys :func:`collate_eval` gives, and takes the loaders :func:`eval_loaders` makes, one per eval set, in order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader


def collate_eval(items: list[dict]) -> dict:
    """Batch variable-size eval items: ``{"image": list[Tensor], "index": LongTensor, "unreadable": BoolTensor,
    "resize_factor": (B, 2) float64}`` (``unreadable``: the placeholders of images skipped under ``on_error:
    skip``, counted by the core; ``resize_factor``: each image's (height, width) as given over its original's,
    1 where an item does not say)."""
    return {
        "image": [item["image"] for item in items],
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "unreadable": torch.tensor([bool(item.get("unreadable", False)) for item in items]),
        "resize_factor": torch.tensor([list(item.get("resize_factor", (1.0, 1.0))) for item in items],
                                      dtype=torch.float64).reshape(len(items), 2),
    }


def eval_loaders(eval_sets: Sequence, batch_size: int, num_workers: int, pin_memory: bool = False) -> list:
    """One ordered, unshuffled loader per EvalSet (Lightning adds the DDP sampler; the core de-duplicates).

    Each has a generator of its own: a loader draws its workers' base seed from it as it starts, from torch's
    global generator otherwise. A validation inside ``fit`` then moved the global generator by one draw per eval
    set, and a head drawing from it while training (dropout) trained on other random numbers than in a run that
    did not validate, or than in a resume that starts a validation loader Lightning skips (from a step
    checkpoint on an epoch's last batch). The demo's heads draw nothing there: its weights were equal either way."""
    return [
        DataLoader(s.dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_eval,
                   num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator())
        for s in eval_sets
    ]
