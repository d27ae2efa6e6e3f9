"""Normal-only anomaly detection: PatchCore / AnomalyDINO-style patch memory on DINOv3 features, a self-supervised
multi-task learner trained from scratch (`AnomalyLearner`, trained by `cadmtl.anomaly.learner_training`), and the
metrics.

>>> from cadmtl.anomaly import AnomalyMetrics, PatchMemoryScorer, calibrate_fpr
>>> from cadmtl.features import backbone_from_preset
>>> scorer = PatchMemoryScorer.from_backbone(backbone_from_preset("vits16"), layers=(6, 9), coreset_fraction=0.1)
>>> scorer.fit(normal_images)  # doctest: +SKIP  (iterable of normalised (3, 224, 224) tensors)
>>> maps, scores = scorer.score(pixel_values)  # doctest: +SKIP  (maps at the input size)
>>> scorer.image_threshold = calibrate_fpr(validation_normal_scores, 0.01)  # doctest: +SKIP
>>> scorer.save_pretrained("patchcore-vits16")  # doctest: +SKIP
"""

from .learner import AnomalyLearner, AnomalyLearnerConfig, LearnerOutput
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
    "AnomalyLearner",
    "AnomalyLearnerConfig",
    "AnomalyMetrics",
    "LearnerOutput",
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
