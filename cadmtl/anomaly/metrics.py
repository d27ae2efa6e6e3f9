"""Anomaly-detection metrics: image / pixel AUROC, AUPRO@0.3, image / pixel F1-max and pixel AP.

Everything is exact and tie-aware, computed with numpy from sorted scores (no sklearn, no histograms). The
binary-score metrics (AUROC, AP, F1-max) are defined in `cadmtl.evaluation.metrics` and imported here:

* AUROC is the Mann-Whitney U statistic (a tie between a positive and a negative counts 1/2), i.e. the area
  under the ROC curve with linear interpolation between distinct thresholds.
* AP is the step definition `sum_n (R_n - R_{n-1}) P_n` over distinct thresholds (sklearn's
  `average_precision_score`).
* F1-max is the best F1 over every distinct threshold (predict anomalous when `score >= threshold`).
* AUPRO follows the definition anomalib documents (and MVTec's reference evaluation code computes): for each
  threshold, PRO = mean over the 8-connected components of the true masks of (predicted positive pixels in the
  component / component size); FPR = predicted positive normal pixels / all normal pixels of all images; the
  PRO-vs-FPR curve (linear between distinct thresholds) is integrated over FPR in [0, 0.3] (interpolated at
  0.3) and divided by 0.3. anomalib's implementation approximates this by resampling each region's curve on a
  common grid and normalising by its last FPR <= 0.3, so its numbers can differ from these in the third digit.

Pixel inputs are per-image maps at each image's original size (sizes may differ) and masks with 0 = normal,
1 = defect, 255 = ignore; ignored pixels are left out of every pixel metric. Positive pixels and negative pixels
are kept as two float32 vectors and sorted in place, so memory is ~4 bytes per pixel (plus an 8-byte index only
for the pixels above the FPR-0.3 cut in AUPRO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from cadmtl.evaluation.metrics import (
    auroc_sorted,
    average_precision,
    average_precision_sorted,
    binary_auroc,
    f1_max,
    f1_max_sorted,
    split_scores,
)
from dataset_scripts.schema import IGNORE_INDEX

# The image-level binary metrics are defined once, in `cadmtl.evaluation.metrics`; re-exported here.
__all__ = [
    "METRIC_KEYS",
    "METRIC_TITLES",
    "AnomalyMetrics",
    "aupro",
    "auroc_sorted",
    "average_precision",
    "average_precision_sorted",
    "binary_auroc",
    "compute_anomaly_metrics",
    "connected_components",
    "f1_max",
    "f1_max_sorted",
    "metrics_table",
    "split_scores",
]

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "pixel_ap")
METRIC_TITLES = ("image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "pixel F1-max", "pixel AP")


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


# ----------------------------------------------------------------------------------------------------------
# Connected components (8-connectivity)
# ----------------------------------------------------------------------------------------------------------

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask (H, W) -> (labels int32 (H, W), 0 = background, count).

    Components are numbered 1..count in raster order of their first pixel. `scipy.ndimage.label`: the one
    labeller of both wings (AUPRO here, the reference localiser's boxes and pair masks); BENCHMARKS.md times it
    against the hand-written labellers it replaced (`benchmarks/bench_labelling.py`).
    """
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


# ----------------------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------------------


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x ascending, starting at 0) over [0, x_max]."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def aupro(
    maps: Sequence[np.ndarray | torch.Tensor],
    masks: Sequence[np.ndarray | torch.Tensor],
    fpr_limit: float = 0.3,
) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`, in [0, 1] (NaN without regions or normal pixels).

    `maps[i]`: (H_i, W_i) float scores; `masks[i]`: (H_i, W_i) uint8 0 / 1 / 255 (255 ignored).
    """
    normal_scores, region_scores, region_weights = [], [], []
    region_count = 0
    for anomaly_map, mask in zip(maps, masks):
        anomaly_map, mask = _check_pair(anomaly_map, mask)
        normal_scores.append(anomaly_map[mask == 0])
        components, count = connected_components(mask == 1)
        if count == 0:
            continue
        flat = components.ravel()
        inside = flat > 0
        sizes = np.bincount(flat[inside], minlength=count + 1)
        region_scores.append(anomaly_map.ravel()[inside])
        region_weights.append(1.0 / sizes[flat[inside]])
        region_count += count
    negatives = np.concatenate(normal_scores) if normal_scores else np.zeros(0, np.float32)
    if region_count == 0 or negatives.size == 0:
        return math.nan
    negatives.sort()
    # Only thresholds down to the first one whose FPR exceeds the limit matter; keep the pixels above it.
    first_over = math.floor(fpr_limit * negatives.size) + 1
    cut = negatives[negatives.size - min(first_over, negatives.size)]
    negatives = negatives[negatives >= cut]
    positives = np.concatenate(region_scores)
    weights = np.concatenate(region_weights) / region_count
    keep = positives >= cut
    positives, weights = positives[keep], weights[keep]

    scores = np.concatenate([negatives, positives])
    num_normal = sum(s.size for s in normal_scores)  # every normal pixel, not only those above the cut
    fpr_weights = np.concatenate([np.full(negatives.size, 1.0 / num_normal), np.zeros(positives.size)])
    pro_weights = np.concatenate([np.zeros(negatives.size), weights])
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    fpr = np.cumsum(fpr_weights[order])
    pro = np.cumsum(pro_weights[order])
    last_of_group = np.append(scores[1:] != scores[:-1], True)  # one curve point per distinct threshold
    fpr = np.concatenate([[0.0], fpr[last_of_group]])
    pro = np.concatenate([[0.0], pro[last_of_group]])
    return _trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------------------------------------
# Image + pixel metrics over a dataset
# ----------------------------------------------------------------------------------------------------------


def _check_pair(
    anomaly_map: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None, is_normal: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 map and uint8 mask; a missing mask is all-normal for a normal image, all-ignored else."""
    anomaly_map = _as_numpy(anomaly_map).astype(np.float32, copy=False)
    if anomaly_map.ndim == 3 and anomaly_map.shape[0] == 1:
        anomaly_map = anomaly_map[0]
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly maps must be (H, W); got shape {anomaly_map.shape}")
    if not np.isfinite(anomaly_map).all():  # NaN would break the sort-based curves without saying why
        bad = int((~np.isfinite(anomaly_map)).sum())
        raise ValueError(f"an anomaly map of shape {anomaly_map.shape} holds {bad} NaN or infinite values")
    if mask is None:
        fill = 0 if is_normal else IGNORE_INDEX
        return anomaly_map, np.full(anomaly_map.shape, fill, dtype=np.uint8)
    mask = _as_numpy(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    mask = mask.astype(np.uint8, copy=False)
    if mask.shape != anomaly_map.shape:
        raise ValueError(
            f"anomaly map {anomaly_map.shape} and mask {mask.shape} differ: resize maps to the original size"
        )
    if not np.isin(mask, (0, 1, IGNORE_INDEX)).all():
        # An MVTec 0/255 mask would otherwise silently become "all ignored".
        raise ValueError("masks must hold 0 (normal), 1 (defect) or 255 (ignore); convert 0/255 masks first")
    return anomaly_map, mask


def compute_anomaly_metrics(
    maps: Sequence[np.ndarray | torch.Tensor],
    masks: Sequence[np.ndarray | torch.Tensor | None],
    is_normal: Sequence[bool],
    image_scores: Sequence[float] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """The six metrics, in percent (NaN where undefined), for one set of images.

    `maps[i]`: (H_i, W_i) anomaly map at the image's original size; `masks[i]`: (H_i, W_i) uint8 0 / 1 / 255 or
    None; `is_normal[i]`: image label; `image_scores[i]`: image score (default: the map's maximum).
    """
    checked = [_check_pair(m, k, n) for m, k, n in zip(maps, masks, is_normal)]
    if image_scores is None:
        image_scores = [float(m.max()) for m, _ in checked]
    image_labels = ~np.asarray(is_normal, dtype=bool)
    scores = np.asarray(image_scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))
        raise ValueError(
            f"{len(bad)} of {len(scores)} image scores are NaN or infinite (the first is image {bad[0]})"
        )
    image_pos, image_neg = split_scores(scores, image_labels)
    pixel_pos = np.concatenate([m[k == 1] for m, k in checked] or [np.zeros(0, np.float32)])
    pixel_neg = np.concatenate([m[k == 0] for m, k in checked] or [np.zeros(0, np.float32)])
    pixel_pos.sort()
    pixel_neg.sort()
    results = {
        "image_auroc": auroc_sorted(image_pos, image_neg),
        "pixel_auroc": auroc_sorted(pixel_pos, pixel_neg),
        "aupro": aupro([m for m, _ in checked], [k for _, k in checked], fpr_limit),
        "image_f1_max": f1_max_sorted(image_pos, image_neg)[0],
        "pixel_f1_max": f1_max_sorted(pixel_pos, pixel_neg)[0],
        "pixel_ap": average_precision_sorted(pixel_pos, pixel_neg),
    }
    return {key: 100.0 * value for key, value in results.items()}


def defect_type_subsets(defect_types: Sequence[str | None]) -> dict[str, list[int]]:
    """Each defect type scored against ALL normal images: {type: indices of every normal image (None) followed by
    that type's images}, types sorted."""
    normal = [i for i, t in enumerate(defect_types) if t is None]
    return {
        defect_type: normal + [i for i, t in enumerate(defect_types) if t == defect_type]
        for defect_type in sorted({t for t in defect_types if t is not None})
    }


@dataclass
class AnomalyMetrics:
    """Accumulates per-image maps, masks and labels; `compute()` returns the metrics in percent.

    >>> metrics = AnomalyMetrics()
    >>> metrics.update(anomaly_map, mask, is_normal=False, defect_type="dent")  # doctest: +SKIP
    >>> metrics.compute()["pixel_auroc"]  # doctest: +SKIP

    Maps are stored as float32 at their original size (masks as uint8), so memory is ~5 bytes per pixel.
    """

    fpr_limit: float = 0.3
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    is_normal: list[bool] = field(default_factory=list)
    defect_types: list[str | None] = field(default_factory=list)
    image_scores: list[float] = field(default_factory=list)

    def update(
        self,
        anomaly_map: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None,
        is_normal: bool,
        defect_type: str | None = None,
        image_score: float | None = None,
    ) -> None:
        """Add one image. `anomaly_map`: (H, W); `mask`: (H, W) 0 / 1 / 255 or None; `image_score` defaults to
        the map's maximum; `defect_type` is ignored for normal images."""
        anomaly_map, mask = _check_pair(anomaly_map, mask, bool(is_normal))
        self.maps.append(anomaly_map)
        self.masks.append(mask)
        self.is_normal.append(bool(is_normal))
        self.defect_types.append(None if is_normal else (defect_type or "anomalous"))
        self.image_scores.append(float(anomaly_map.max()) if image_score is None else float(image_score))

    def reset(self) -> None:
        for values in (self.maps, self.masks, self.is_normal, self.defect_types, self.image_scores):
            values.clear()

    def _subset(self, keep: Sequence[int]) -> dict[str, float]:
        return compute_anomaly_metrics(
            [self.maps[i] for i in keep],
            [self.masks[i] for i in keep],
            [self.is_normal[i] for i in keep],
            [self.image_scores[i] for i in keep],
            self.fpr_limit,
        )

    def compute(self) -> dict:
        """{metric: percent over all images, ..., "per_defect_type": {type: {metric: percent}}}.

        Each defect type is scored against all normal images (its images + every normal image).
        """
        results: dict = self._subset(range(len(self.maps)))
        results["per_defect_type"] = {
            defect_type: self._subset(keep)
            for defect_type, keep in defect_type_subsets(self.defect_types).items()
        }
        return results


def metrics_table(
    per_defect_type: dict[str, dict[str, float]],
    title: str = "defect type",
    overall: dict[str, float] | None = None,
) -> str:
    """Paper-shaped Markdown table: one row per defect type, their mean, and (if given) the metrics over all
    images at once; percent with 1 decimal."""
    header = f"| {title} | " + " | ".join(METRIC_TITLES) + " |"
    lines = [header, "|---|" + "---:|" * len(METRIC_KEYS)]

    def cell(value: float) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.1f}"

    for name, values in per_defect_type.items():
        lines.append(f"| {name} | " + " | ".join(cell(values[k]) for k in METRIC_KEYS) + " |")
    means = []
    for key in METRIC_KEYS:
        column = [v[key] for v in per_defect_type.values() if not math.isnan(v[key])]
        means.append(sum(column) / len(column) if column else math.nan)
    lines.append("| **mean** | " + " | ".join(cell(m) for m in means) + " |")
    if overall is not None:
        lines.append("| **all images** | " + " | ".join(cell(overall[k]) for k in METRIC_KEYS) + " |")
    return "\n".join(lines)
