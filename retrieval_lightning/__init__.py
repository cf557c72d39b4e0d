"""retrieval-lightning: instance-level image retrieval on PyTorch Lightning.

The core never imports a particular head or datamodule; it finds them through the
entry-point registry (:mod:`retrieval_lightning.registry`), as it would a third party's.
"""

__version__ = "0.1.0"
