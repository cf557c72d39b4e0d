"""The loader sizes every datamodule takes, checked when the datamodule is made: torch refused them only when a
loader was built (after the data's set-up) with a traceback that named no option."""

from __future__ import annotations


def check_loader_options(**options: int | None) -> None:
    """Refuse a batch size below 1 or a negative worker count, naming the ``--data.init_args`` option."""
    for name, value in options.items():
        if value is None:
            continue
        least = 0 if name == "num_workers" else 1
        if not isinstance(value, int) or value < least:
            raise ValueError(f"--data.init_args.{name} must be an integer >= {least}, got {value!r}")
