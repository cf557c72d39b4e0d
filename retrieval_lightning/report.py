"""Plain-text tables of retrieval metrics for terminals and notes."""

from __future__ import annotations

import re
from collections import defaultdict

#: ``<stage>/<set>/<metric>`` (global) and ``<stage>/<set>/reranked/<metric>`` (a row of its own)
_KEY = re.compile(r"^(?P<stage>[^/]+)/(?P<dataset>[^/]+(?:/reranked)?)/(?P<metric>[^/]+)$")


def _by_dataset(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in metrics.items():
        match = _KEY.match(key)
        if match:
            table[match["dataset"]][match["metric"]] = value
    return table


def _columns(rows: dict[str, dict[str, float]]) -> list[str]:
    preferred = ["mAP_E", "mAP_M", "mAP_H", "mAP@100", "GAP", "top1_accuracy"]
    present = {m for row in rows.values() for m in row}
    return [m for m in preferred if m in present] or sorted(present)


def format_before_after(before: dict[str, float], after: dict[str, float]) -> str:
    """A table with one row per (dataset, before/after/change) and one column per headline metric."""
    b, a = _by_dataset(before), _by_dataset(after)
    cols = _columns({**b, **a})
    width = max([len(d) for d in list(b) + list(a)] + [7]) + 2
    head = f"{'dataset':<{width}}{'model':<10}" + "".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for dataset in sorted(set(b) | set(a)):
        for label, row in (("before", b.get(dataset, {})), ("after", a.get(dataset, {}))):
            lines.append(f"{dataset:<{width}}{label:<10}" + "".join(f"{row.get(c, float('nan')):>10.2f}" for c in cols))
        delta = [a.get(dataset, {}).get(c, float("nan")) - b.get(dataset, {}).get(c, float("nan")) for c in cols]
        lines.append(f"{dataset:<{width}}{'change':<10}" + "".join(f"{d:>+10.2f}" for d in delta))
    return "\n".join(lines)
