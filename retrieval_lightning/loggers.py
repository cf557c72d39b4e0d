"""W&B logging that works offline without an API key."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_credentials_available() -> bool:
    """True when a W&B API key is set in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class RetrievalWandbLogger(WandbLogger):
    """``WandbLogger`` that goes offline by itself when there are no credentials.

    ``offline=None`` (default) means: online if ``WANDB_MODE`` says so or a key is available,
    offline otherwise, so experiment configs run anywhere and sync later with ``wandb sync``.
    """

    def __init__(self, offline: bool | None = None, save_dir: str = "outputs", **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_credentials_available())
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(offline=offline, save_dir=save_dir, **kwargs)
