"""Retrieval metrics as plain functions: revisitop (ROxford/RParis) and Google Landmarks v2."""

from retrieval_lightning.metrics.gldv2 import (
    global_average_precision,
    mean_average_precision,
    mean_precisions,
    top1_accuracy,
)
from retrieval_lightning.metrics.paired import PairedDifference, paired_bootstrap
from retrieval_lightning.metrics.revisitop import (
    RevisitopReport,
    compute_ap,
    compute_map,
    compute_map_from_scores,
    evaluate_revisitop,
    evaluate_revisitop_from_scores,
    protocol_gnd,
    revisitop_report_from_scores,
)

__all__ = [
    "PairedDifference",
    "RevisitopReport",
    "compute_ap",
    "compute_map",
    "compute_map_from_scores",
    "evaluate_revisitop",
    "evaluate_revisitop_from_scores",
    "global_average_precision",
    "mean_average_precision",
    "mean_precisions",
    "paired_bootstrap",
    "protocol_gnd",
    "revisitop_report_from_scores",
    "top1_accuracy",
]
