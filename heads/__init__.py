"""Built-in heads, each registered under the ``retrieval_lightning.heads`` entry-point group."""
