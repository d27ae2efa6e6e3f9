"""Training-free reference-guided localisation on patch features: what differs between a query and a reference.

Pipeline, one function a step (the backbone that produces the features is wired elsewhere):

=========================  ====================================================  ===========================
step                       function                                              shapes
=========================  ====================================================  ===========================
patch distances            :func:`window_nearest_distance`                       (B, C, h, w) -> (B, h, w)
pixel difference map       :func:`difference_map`                                (B, h, w) -> (B, H, W)
boxes                      :func:`boxes_from_map`                                (H, W) -> (N, 4), (N,), mask
threshold                  :func:`best_f1_threshold`, :func:`fpr_threshold`       scores of calibration pairs
=========================  ====================================================  ===========================

A pair is anomalous when its map's maximum is **above** the threshold (``score > threshold``); the same
comparison selects the pixels of :func:`boxes_from_map`, so a pair has boxes exactly when it is called
anomalous. Maps are never normalised per image: a normal pair keeps low values and gives no box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cadmtl.anomaly.metrics import connected_components


def _global_nearest(query: Tensor, reference: Tensor, chunk_size: int) -> Tensor:
    """(B, C, h, w) unit query, (B, C, h', w') unit reference -> (B, h, w) best cosine similarity."""
    b, _, h, w = query.shape
    q = query.flatten(2).transpose(1, 2)  # (B, hw, C)
    r = reference.flatten(2)  # (B, C, h'w')
    best = torch.cat([torch.bmm(chunk, r).amax(dim=2) for chunk in q.split(chunk_size, dim=1)], dim=1)
    return best.view(b, h, w)


def _window_nearest(query: Tensor, reference: Tensor, window: int) -> Tensor:
    """(B, C, h, w) unit features -> (B, h, w) best cosine similarity over the (2k+1)^2 shifted positions."""
    h, w = query.shape[-2:]
    k = window
    padded = F.pad(reference, (k, k, k, k))
    outside = F.pad(
        torch.zeros(1, h, w, dtype=query.dtype, device=query.device), (k, k, k, k), value=-math.inf
    )
    best = torch.full((query.shape[0], h, w), -math.inf, dtype=query.dtype, device=query.device)
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            similarity = (query * padded[..., dy : dy + h, dx : dx + w]).sum(dim=1)  # (B, h, w)
            best = torch.maximum(best, similarity + outside[:, dy : dy + h, dx : dx + w])
    return best


def window_nearest_distance(
    query: Tensor, reference: Tensor, window: int | None = None, chunk_size: int = 1024
) -> Tensor:
    """Cosine distance of each query patch to its nearest reference patch near the same position.

    Args:
        query: (B, C, h, w) query patch features.
        reference: (B, C, h, w) references, one per query, or (C, h, w) one reference for every query.
        window: the reference patches searched are those within ``window`` patches of the query patch's
            position in both directions, a (2 * window + 1)^2 neighbourhood clipped to the map; None searches
            every reference patch (AnomalyDINO's nearest neighbour; the reference may then differ in size).
        chunk_size: query patches per similarity block in the global search, bounding memory to
            ``B * chunk_size * h' * w'`` similarities.

    Returns:
        (B, h, w) distances ``1 - cos`` in [0, 2]; 0 where the reference holds the same feature nearby.
    """
    if query.dim() != 4:
        raise ValueError(f"query features must be (batch, channels, height, width), got {tuple(query.shape)}")
    if reference.dim() == 3:
        reference = reference.unsqueeze(0)
    reference = reference.expand(query.shape[0], -1, -1, -1)
    if reference.shape[1] != query.shape[1]:
        raise ValueError(f"query has {query.shape[1]} channels but the reference {reference.shape[1]}")
    query, reference = F.normalize(query, dim=1), F.normalize(reference, dim=1)
    if window is None:
        similarity = _global_nearest(query, reference, chunk_size)
    else:
        if reference.shape[-2:] != query.shape[-2:]:
            raise ValueError(
                f"a windowed search needs maps of the same size, got query {tuple(query.shape[-2:])} and "
                f"reference {tuple(reference.shape[-2:])}; resize the images alike or use window=None"
            )
        if window < 0:
            raise ValueError(f"window must be >= 0 or None, got {window}")
        similarity = _window_nearest(query, reference, window)
    return (1 - similarity).clamp(0, 2)


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(4 * sigma)`` (anomalib / PatchCore's truncation)."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _smooth(maps: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """(B, 1, H, W) maps convolved with a 1-D kernel along ``axis`` (-1: x, -2: y), reflect padding.

    Reflection needs padding < size: on a map smaller than the kernel, the kernel is truncated and renormalised.
    """
    radius = min(kernel.numel() // 2, maps.shape[axis] - 1)
    centre = kernel.numel() // 2
    kernel = kernel[centre - radius : centre + radius + 1]
    kernel = kernel / kernel.sum()
    if axis == -1:
        return F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def difference_map(distances: Tensor, image_size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Patch distances to a pixel map: bilinear upsampling, then separable Gaussian smoothing.

    Args:
        distances: (B, h, w) patch distances.
        image_size: (H, W) of the output.
        sigma: Gaussian standard deviation in output pixels; 0 skips smoothing. Borders are reflect-padded.

    Returns:
        (B, H, W) map in the distances' units; no per-image normalisation.
    """
    maps = F.interpolate(distances.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma, maps.dtype, maps.device)
        maps = _smooth(_smooth(maps, kernel, axis=-1), kernel, axis=-2)
    return maps.squeeze(1)


def boxes_from_map(anomaly_map: Tensor, threshold: float, min_area: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes around the 8-connected regions of a (H, W) map above ``threshold``.

    Boxes are pixel-edge ``xyxy`` floats: a region over columns 3..5 spans x1 = 3, x2 = 6. Regions of fewer
    than ``min_area`` pixels are dropped (and leave the mask).

    Returns:
        boxes (N, 4) float, scores (N,) the map's maximum inside each region, sorted by score (descending),
        and the (H, W) bool mask of the regions kept. N = 0 means "no anomaly".
    """
    mask = anomaly_map > threshold
    labels = torch.from_numpy(connected_components(mask.cpu().numpy())[0]).to(mask.device, torch.int64)
    ys, xs = mask.nonzero(as_tuple=True)
    if ys.numel() == 0:
        empty = anomaly_map.new_zeros((0,))
        return anomaly_map.new_zeros((0, 4)), empty, mask
    region = labels[ys, xs] - 1  # (P,) region of each foreground pixel, 0..N-1
    n = int(region.max()) + 1

    def reduce(values: Tensor, how: str) -> Tensor:
        start = values.new_full((n,), math.inf if how == "amin" else -math.inf)
        return start.scatter_reduce(0, region, values, reduce=how, include_self=True)

    xs_f, ys_f = xs.to(anomaly_map.dtype), ys.to(anomaly_map.dtype)
    boxes = torch.stack(
        [reduce(xs_f, "amin"), reduce(ys_f, "amin"), reduce(xs_f, "amax") + 1, reduce(ys_f, "amax") + 1],
        dim=1,
    )
    scores = reduce(anomaly_map[ys, xs], "amax")
    keep = torch.bincount(region, minlength=n) >= min_area
    mask[ys, xs] = keep[region]
    boxes, scores = boxes[keep], scores[keep]
    order = scores.argsort(descending=True)
    return boxes[order], scores[order], mask


def best_f1_threshold(
    scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor
) -> tuple[float, float]:
    """The threshold whose pair decision ``score > threshold`` has the best F1 on labelled pairs.

    Args:
        scores: (N,) image-level scores (each pair's map maximum).
        labels: (N,) 1 for anomalous pairs, 0 for normal ones; at least one anomalous.

    Returns:
        ``(threshold, f1)``. The threshold is the midpoint between the lowest score called anomalous and the
        next lower score (just below the minimum when every pair is called anomalous); among equal F1s the
        highest threshold wins (fewest alarms).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.numel()} scores but {labels.numel()} labels")
    positives = int(labels.sum())
    if positives == 0:
        raise ValueError("best_f1_threshold needs at least one anomalous pair (label 1)")
    scores, order = scores.sort(descending=True)
    true_pos = labels[order].cumsum(0).double()  # calling the top k anomalous: k = 1..N
    called = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    f1 = 2 * true_pos / (called + positives)  # 2TP / (2TP + FP + FN), with TP + FP = k and TP + FN = P
    cut = torch.ones_like(labels)  # a cut between k and k+1 only where the scores differ
    cut[:-1] = scores[:-1] > scores[1:]
    f1 = torch.where(cut, f1, -1.0)
    k = int(f1.argmax())  # first maximum: the highest threshold
    if k + 1 < scores.numel():
        threshold = (scores[k] + scores[k + 1]) / 2
    else:
        threshold = torch.nextafter(scores[k], scores.new_tensor(-math.inf))
    return float(threshold), float(f1[k])


def fpr_threshold(normal_scores: Sequence[float] | Tensor, target_fpr: float) -> float:
    """The smallest observed normal score ``t`` with at most ``floor(target_fpr * n)`` normal pairs above it.

    Quantile convention: ``t`` is the ``(floor(target_fpr * n) + 1)``-th largest of the ``n`` normal scores,
    i.e. ``numpy.quantile(normal_scores, 1 - target_fpr, method="inverted_cdf")``; the empirical false-positive
    rate of ``score > t`` is then <= ``target_fpr`` (below it when ties sit at ``t``).
    """
    scores = torch.as_tensor(normal_scores, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("fpr_threshold needs at least one normal score")
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    allowed = math.floor(target_fpr * scores.numel() + 1e-9)  # false alarms allowed; 1e-9 absorbs 0.1 * 30
    return float(scores.sort(descending=True).values[allowed])


def calibrate_threshold(
    scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor, target_fpr: float | None = None
) -> float:
    """A pair threshold from calibration pairs: best F1 (DifferAD-R1's protocol) or, with ``target_fpr``,
    the :func:`fpr_threshold` of the normal pairs (labels 0)."""
    if target_fpr is None:
        return best_f1_threshold(scores, labels)[0]
    scores, labels = torch.as_tensor(scores).flatten(), torch.as_tensor(labels).flatten().bool()
    return fpr_threshold(scores[~labels], target_fpr)


class ReferenceLocalizer:
    """Query vs reference patch features -> difference maps -> boxes, with settings saved as a dict.

    ``cache_reference`` stores one (normalised) reference so that many queries reuse it; passing
    ``reference_features=None`` to :meth:`localize` uses the cache.
    """

    def __init__(
        self,
        window: int | None = 2,
        sigma: float = 4.0,
        threshold: float = 0.5,
        min_area: int = 1,
        chunk_size: int = 1024,
    ) -> None:
        self.window, self.sigma, self.threshold = window, sigma, threshold
        self.min_area, self.chunk_size = min_area, chunk_size
        self.reference: Tensor | None = None

    def cache_reference(self, features: Tensor) -> None:
        """Keep (C, h, w) or (1, C, h, w) reference features for the next queries."""
        if features.dim() == 4:
            if features.shape[0] != 1:
                raise ValueError(f"cache one reference, got a batch of {features.shape[0]}")
            features = features[0]
        self.reference = F.normalize(features.detach(), dim=0)

    def anomaly_maps(
        self, query_features: Tensor, reference_features: Tensor | None, image_size: tuple[int, int]
    ) -> Tensor:
        """(B, C, h, w) query features -> (B, H, W) difference maps."""
        reference = self.reference if reference_features is None else reference_features
        if reference is None:
            raise ValueError("no reference: pass reference_features or call cache_reference first")
        distances = window_nearest_distance(query_features, reference, self.window, self.chunk_size)
        return difference_map(distances, image_size, self.sigma)

    @torch.no_grad()
    def localize(
        self, query_features: Tensor, reference_features: Tensor | None, image_size: tuple[int, int]
    ) -> list[dict[str, Tensor]]:
        """Per query: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``mask`` (H, W) bool, ``map`` (H, W) and
        ``score`` (the map's maximum, the pair's image-level score for :func:`calibrate_threshold`)."""
        if query_features.dim() == 3:
            query_features = query_features.unsqueeze(0)
        results = []
        for anomaly_map in self.anomaly_maps(query_features, reference_features, image_size):
            boxes, scores, mask = boxes_from_map(anomaly_map, self.threshold, self.min_area)
            results.append({"boxes": boxes, "scores": scores, "mask": mask, "map": anomaly_map})
            results[-1]["score"] = anomaly_map.max()
        return results

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "sigma": self.sigma,
            "threshold": self.threshold,
            "min_area": self.min_area,
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> ReferenceLocalizer:
        unknown = set(settings) - set(cls().to_dict())
        if unknown:
            raise ValueError(f"unknown ReferenceLocalizer settings {sorted(unknown)}")
        return cls(**settings)
