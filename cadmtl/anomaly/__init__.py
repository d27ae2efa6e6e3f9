"""Normal-only anomaly detection: PatchCore / AnomalyDINO-style patch memory on DINOv3 features, and its metrics."""

from .memory_bank import greedy_coreset, nearest_neighbor_distance, random_projection
from .metrics import (
    METRIC_KEYS,
    AnomalyMetrics,
    aupro,
    average_precision,
    binary_auroc,
    compute_anomaly_metrics,
    connected_components,
    f1_max,
    metrics_table,
)
from .patch_memory import PatchMemoryScorer, calibrate_f1, calibrate_fpr, gaussian_blur

__all__ = [
    "METRIC_KEYS",
    "AnomalyMetrics",
    "PatchMemoryScorer",
    "aupro",
    "average_precision",
    "binary_auroc",
    "calibrate_f1",
    "calibrate_fpr",
    "compute_anomaly_metrics",
    "connected_components",
    "f1_max",
    "gaussian_blur",
    "greedy_coreset",
    "metrics_table",
    "nearest_neighbor_distance",
    "random_projection",
]
