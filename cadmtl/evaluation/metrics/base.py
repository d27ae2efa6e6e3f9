"""What the task metrics share: the [`MetricsReport`] they return, [`format_percentages`], the streaming
update / compute / reset protocol, input conversion and the distributed reductions."""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# Result container and formatting
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MetricsReport:
    """Everything one metric computed over a split.

    Attributes:
        metrics: the headline numbers, exactly what `compute()` returns (fractions in [0, 1]; NaN where the
            number is undefined, see each metric's docstring).
        per_class: one row per class, keyed by class name: the per-class metric values (fractions, NaN where
            undefined) and the counts behind them (ints).
        counts: split-level counts (images, samples, errors, boxes...), so that a reader can tell how many
            mistakes a percentage stands for.
        label_names: the class names in class-id order.
        confusion_matrix: `(C, C)` int64 array, rows = ground truth class, columns = predicted class (the
            scikit-learn convention); `None` for detection, which has no confusion matrix.
        extra_metrics: secondary split-level values that are not headline keys (detection: the rest of the
            COCO summary, `AR@1`, `AR@10`, `ARs`, `ARm`, `ARl`, and the operating-point `precision`, `recall`,
            `F1`, `best_F1`, `best_F1_confidence`, see [`detection_analysis`]).
        analysis: threshold-dependent results, already JSON-ready (plain lists and numbers, no NaN): for detection
            the curves and the detection confusion matrix of [`detection_analysis`]; empty where a metric has none.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float | int | bool]]
    counts: dict[str, int]
    label_names: list[str]
    confusion_matrix: np.ndarray | None = field(default=None, repr=False)
    extra_metrics: dict[str, float] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy: NaN becomes `None` (JSON has no NaN) and the matrix becomes nested lists."""
        return {
            "metrics": {name: _json_number(value) for name, value in self.metrics.items()},
            "per_class": {
                class_name: {name: _json_number(value) for name, value in row.items()}
                for class_name, row in self.per_class.items()
            },
            "counts": {name: int(value) for name, value in self.counts.items()},
            "label_names": list(self.label_names),
            "confusion_matrix": None if self.confusion_matrix is None else self.confusion_matrix.tolist(),
            "extra_metrics": {name: _json_number(value) for name, value in self.extra_metrics.items()},
            "analysis": copy.deepcopy(self.analysis),
        }


def _json_number(value: float | int | bool) -> float | int | bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value


def format_percentages(
    metrics: Mapping[str, float], decimals: int = 2, undefined: str = "n/a"
) -> dict[str, str]:
    """Format a `compute()` result as percentage strings for tables: `{"AP": 0.4567}` -> `{"AP": "45.67"}`.

    Args:
        metrics: metric name -> fraction in [0, 1] (NaN or `None` for an undefined value).
        decimals: digits after the decimal point.
        undefined: the text written for NaN / `None` (e.g. `APs` on a split without small objects).
    """
    formatted = {}
    for name, value in metrics.items():
        if value is None or math.isnan(float(value)):
            formatted[name] = undefined
        else:
            formatted[name] = f"{100.0 * float(value):.{decimals}f}"
    return formatted


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _communication_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo, mpi and mixed "cpu:gloo,cuda:nccl" groups take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks without touching the local state (compute() may be called twice)."""
    buffer = tensor.to(_communication_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


# ----------------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------------


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.array(value))
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: expected a tensor or array, got {type(value).__name__} ({error})"
        ) from None
    if array.dtype == object:
        raise ValueError(f"{where}: expected a numeric tensor or array, got ragged or non-numeric data")
    # read-only arrays (decoded images, Arrow buffers) would make torch warn; a copy is cheap next to the metric
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_numpy(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: expected a tensor or array, got {type(value).__name__} ({error})"
        ) from None


def _check_label_names(label_names: Sequence[str] | None, num_classes: int, owner: str) -> list[str]:
    if label_names is None:
        return [str(class_id) for class_id in range(num_classes)]
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_classes:
        raise ValueError(f"{owner}: got {len(label_names)} label_names for num_classes={num_classes}")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"{owner}: label_names contain duplicates: {label_names}")
    return label_names


def _describe_values(values: torch.Tensor, limit: int = 5) -> str:
    unique = torch.unique(values).tolist()
    shown = ", ".join(str(value) for value in unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, undefined: float) -> np.ndarray:
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    result = np.full_like(numerator, undefined)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


class _StreamingMetric(ABC):
    """The update / compute / reset protocol shared by the three task metrics."""

    def __init__(self, *, sync_on_compute: bool = True) -> None:
        self.sync_on_compute = sync_on_compute

    @abstractmethod
    def update(self, predictions: Any, targets: Any) -> None:
        """Add one batch of predictions and their ground truth."""

    @abstractmethod
    def compute_detailed(self) -> MetricsReport:
        """Headline metrics plus per-class rows, counts and (where it exists) the confusion matrix."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything added so far."""

    def compute(self) -> dict[str, float]:
        """The headline metrics over everything added since the last `reset()` (fractions in [0, 1])."""
        return self.compute_detailed().metrics

    def _syncs(self) -> bool:
        return self.sync_on_compute and _is_distributed()
