"""Evaluation metrics for the three CAD-MTL tasks (moved from `cadmtl/evaluation/metrics.py`)."""

from .binary import *  # noqa: F403
from .binary import (  # noqa: F401
    __all__,
    auroc_sorted,
    average_precision_sorted,
    f1_max_sorted,
    split_scores,
)
