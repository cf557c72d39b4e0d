"""Errors a user meets first, and how the command line reports them.

The CLI prints ``error: <message>`` and exits with status 2 for these (the traceback only with
``--traceback`` or ``RETRIEVAL_LIGHTNING_TRACEBACK=1``); anything else is a bug and keeps its traceback.
Plugins raise :class:`DataFormatError` subclasses for malformed files (ground truth, CSV lists) so the
core can report them without knowing the plugin.
"""

from __future__ import annotations


class DataFormatError(ValueError):
    """A dataset file (ground truth, image list, CSV) that does not have the expected format."""


class UsageError(ValueError):
    """Arguments of a command that cannot work together (e.g. a checkpoint without the head it needs)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "bad input", not "bug" (imported lazily: the CLI starts fast)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # Lightning's own config refusals

    from retrieval_lightning.archives import CorruptArchiveError, UnsafeArchiveError
    from retrieval_lightning.backbone import WeightsMismatchError
    from retrieval_lightning.checkpoints import CheckpointLoadError, IncompatibleWeightsError
    from retrieval_lightning.data.io import ImageLoadError
    from retrieval_lightning.download import DownloadError
    from retrieval_lightning.evaluation import NonFiniteDescriptorError
    from retrieval_lightning.module import IncompatibleCheckpointError
    from retrieval_lightning.optim import UnboundedScheduleError
    from retrieval_lightning.registry import PluginError
    from retrieval_lightning.retrieval.store import StoreIdentityError
    from retrieval_lightning.retrieval.writer import StoreWriteError

    return (
        DataFormatError, UsageError, PluginError, CheckpointLoadError, IncompatibleWeightsError,
        IncompatibleCheckpointError, WeightsMismatchError, ImageLoadError, StoreIdentityError, NonFiniteDescriptorError,
        DownloadError, CorruptArchiveError, UnsafeArchiveError, UnboundedScheduleError, FileNotFoundError,
        StoreWriteError, FileExistsError, NotADirectoryError, IsADirectoryError,  # a path the user gave: it names it
        PermissionError,
        MisconfigurationException,
    )
