"""retrieval-lightning: instance-level image retrieval on PyTorch Lightning.

The core never imports a particular head or datamodule; it finds them through the
entry-point registry (:mod:`retrieval_lightning.registry`), as it would a third party's.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from retrieval_lightning import RetrievalModule``, imported on first use: the package itself stays
    light for the commands that need no model (``download``, ``plugins``)."""
    if name == "RetrievalModule":
        from retrieval_lightning.module import RetrievalModule

        return RetrievalModule
    raise AttributeError(f"module 'retrieval_lightning' has no attribute {name!r}")
