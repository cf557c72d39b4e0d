"""CVNet correlation verifier internals: 4D network, fast block-1 correlation, official checkpoint import."""

from heads._cvnet.fast import SCALES, LevelSet, level_sizes, pair_logits_fast, prepare_levels
from heads._cvnet.network import CenterPivotConv4d, CorrelationLearner

__all__ = [
    "SCALES",
    "CenterPivotConv4d",
    "CorrelationLearner",
    "LevelSet",
    "level_sizes",
    "pair_logits_fast",
    "prepare_levels",
]
