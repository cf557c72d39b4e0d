"""Progress bars for the passes a Trainer runs outside its own loops (imprinting, mining, re-ranking).

Why: those passes can take minutes to hours on GLDv2 (a pass over a 100k-image mining pool, class
means over 1.5M images), and Lightning's bar does not cover them. They show one bar, on rank 0
only, and none when the run turned Lightning's bar off (``enable_progress_bar: false``), so logs
of batch jobs stay clean.
"""

from __future__ import annotations

from typing import Any, Iterable, TypeVar

import lightning.pytorch as pl
from tqdm.std import tqdm  # not tqdm.auto: its asyncio class calls iter() on the iterable at construction,
# which for a DataLoader starts an extra iterator (worker processes) and draws its seed from torch's RNG

T = TypeVar("T")


def shows_progress(trainer: pl.Trainer | None) -> bool:
    """True on rank 0 of a run whose Lightning progress bar is on."""
    if trainer is None:
        return True
    return getattr(trainer, "global_rank", 0) == 0 and getattr(trainer, "progress_bar_callback", None) is not None


def trainer_progress(iterable: Iterable[T], trainer: pl.Trainer | None, desc: str, total: int | None = None,
                     **kwargs: Any) -> Iterable[T]:
    """``iterable`` wrapped in a bar when :func:`shows_progress`; the bar disappears when done."""
    return tqdm(iterable, desc=desc, total=total, disable=not shows_progress(trainer), leave=False, **kwargs)
