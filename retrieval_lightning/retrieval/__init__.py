"""Evaluation at any scale: extract → gather + dedupe → feature store → search → post-process.

- :mod:`.gather`: all-gather per-sample results across ranks, de-duplicate by dataset index.
- :mod:`.writer`: Lightning prediction writer producing atomic, resumable per-rank shards, and
  the merge into a store.
- :mod:`.store`: the on-disk, memory-mapped :class:`FeatureStore` and its manifest; :mod:`.identity`: what a
  store's identity (model, preprocessing, items, precision) is made of.
- :mod:`.search`: exact chunked top-k (:func:`topk_search`) and the optional FAISS backend.
- :mod:`.postprocess`: αQE and DBA, off by default (:class:`PostProcessConfig`).
- :mod:`.spill`: gathered arrays in one memory-mapped file per machine instead of a copy per rank.
- :mod:`.store_eval`: metrics from the descriptors ``extract`` stored; :mod:`.set_files`: what it writes
  beside them for ``search``; :mod:`.workdirs`: the hidden folders a store is built in.
- :mod:`.rerank`: shortlist → re-ranking head's scores → fusion; :mod:`.rerank_eval`: the same for a whole
  eval set, through per-rank entry stores.
- :mod:`.geometry`: local-feature matching and RANSAC; :mod:`.geometry_reference`: the official DELG
  verification, the baseline it is compared with.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; loaded on first use so that e.g. ``retrieval.search`` never pulls in Lightning
_EXPORTS = {
    "dedupe_sort": "gather",
    "gather_dedupe": "gather",
    "PostProcessConfig": "postprocess",
    "alpha_query_expansion": "postprocess",
    "database_augmentation": "postprocess",
    "postprocessed_search": "postprocess",
    "FaissSearcher": "search",
    "topk_search": "search",
    "FeatureStore": "store",
    "KindSpec": "store",
    "StoreBuilder": "store",
    "StoreIdentityError": "store",
    "FeatureStoreWriter": "writer",
    "ShardWriter": "writer",
    "completed_indices": "writer",
    "list_shards": "writer",
    "merge_shards": "writer",
    "module_identity": "identity",
    "remaining_subset": "writer",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "FaissSearcher",
    "FeatureStore",
    "FeatureStoreWriter",
    "ShardWriter",
    "KindSpec",
    "PostProcessConfig",
    "StoreBuilder",
    "StoreIdentityError",
    "alpha_query_expansion",
    "completed_indices",
    "database_augmentation",
    "dedupe_sort",
    "gather_dedupe",
    "list_shards",
    "merge_shards",
    "module_identity",
    "postprocessed_search",
    "remaining_subset",
    "topk_search",
]
