"""Anchor-free dense detection head (FCOS family): the head, its target assignment and loss, its box decoding.

Every location of every pyramid level predicts per-class sigmoid scores, the distances (left, top, right, bottom)
from the location to the sides of its box, and a centerness "quality" logit that down-weights boxes predicted far
from an object's centre. Targets follow torchvision's FCOS: a location is a positive for a box when it lies inside
the box, within `center_sampling_radius` strides of its centre, and the box's largest side distance fits the
level's size range; ties go to the smallest box. Losses: sigmoid focal loss (classification), GIoU (boxes) and
binary cross-entropy (centerness), each normalised by the number of positives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .neck_cadmtl import ConvNormAct


class LevelScale(nn.Module):
    """A learnable scalar per pyramid level, so one shared box branch can regress distances of every size."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DetectionConv(nn.Conv2d):
    """A conv of the detection head: FCOS initialises these with N(0, 0.01) and, for the classification output,
    a bias that starts every location at the prior foreground probability (so the focal loss does not explode at
    step 0). The box output starts at `bias_init` = 1 (boxes of one stride per side): with a zero bias the ReLU'd
    distances start at ~0 px, where a from-scratch model can lock every box at zero size with no gradient left
    (seen in the CPU protocol). The model's `_init_weights` reads `initial_bias`."""

    def __init__(
        self, *args: Any, prior_probability: float | None = None, bias_init: float = 0.0, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.prior_probability = prior_probability
        self.bias_value = bias_init

    @property
    def initial_bias(self) -> float:
        if self.prior_probability is None:
            return self.bias_value
        return -math.log((1 - self.prior_probability) / self.prior_probability)


class FcosHead(nn.Module):
    """Classification and box towers shared across pyramid levels.

    Returns, concatenated over levels (finest first, row-major inside a level):
        class logits `(B, P, num_classes)`, box distances `(B, P, 4)` in input pixels, centerness logits `(B, P)`.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_convs: int,
        strides: tuple[int, ...],
        prior_probability: float = 0.01,
    ):
        super().__init__()
        self.strides = strides
        self.cls_tower = nn.Sequential(
            *(ConvNormAct(channels, channels, conv=DetectionConv) for _ in range(num_convs))
        )
        self.box_tower = nn.Sequential(
            *(ConvNormAct(channels, channels, conv=DetectionConv) for _ in range(num_convs))
        )
        self.cls_logits = DetectionConv(
            channels, num_classes, kernel_size=3, padding=1, prior_probability=prior_probability
        )
        self.box_distances = DetectionConv(channels, 4, kernel_size=3, padding=1, bias_init=1.0)
        self.centerness = DetectionConv(channels, 1, kernel_size=3, padding=1)
        self.scales = nn.ModuleList(LevelScale() for _ in strides)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        all_logits, all_distances, all_centerness = [], [], []
        for x, scale, stride in zip(features, self.scales, self.strides):
            cls_features = self.cls_tower(x)
            box_features = self.box_tower(x)
            logits = self.cls_logits(cls_features)  # (B, K, h, w)
            distances = F.relu(scale(self.box_distances(box_features))) * stride  # (B, 4, h, w)
            centerness = self.centerness(box_features)  # (B, 1, h, w)
            all_logits.append(logits.flatten(2).transpose(1, 2))
            all_distances.append(distances.flatten(2).transpose(1, 2))
            all_centerness.append(centerness.flatten(1))
        return torch.cat(all_logits, 1), torch.cat(all_distances, 1), torch.cat(all_centerness, 1)


def location_grid(
    shapes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres of every location, in input pixels.

    Returns `points (P, 2)` as (x, y), the stride of each point `(P,)`, and the (lower, upper) bound `(P, 2)` on
    the largest side distance of the boxes each level is responsible for (FCOS: 0-64, 64-128, 128-inf for strides
    8 / 16 / 32).
    """
    points, point_strides, bounds = [], [], []
    for level, ((height, width), stride) in enumerate(zip(shapes, strides)):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1))
        point_strides.append(torch.full((height * width,), float(stride), device=device))
        lower = 0.0 if level == 0 else 4.0 * stride
        upper = math.inf if level == len(strides) - 1 else 8.0 * stride
        bounds.append(torch.tensor([lower, upper], device=device).expand(height * width, 2))
    return torch.cat(points), torch.cat(point_strides), torch.cat(bounds)


def decode_boxes(points: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """(P, 2) points and (B, P, 4) ltrb distances -> (B, P, 4) absolute xyxy boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def assign_targets(
    points: torch.Tensor,
    point_strides: torch.Tensor,
    size_bounds: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    center_sampling_radius: float,
) -> torch.Tensor:
    """Index of the box each location learns from, or -1 for background.

    Args:
        points `(P, 2)`, point_strides `(P,)`, size_bounds `(P, 2)`: see `location_grid`.
        gt_boxes `(B, M, 4)`: absolute xyxy boxes, padded to the largest count in the batch.
        gt_valid `(B, M)`: False for the padding.
    Returns:
        `(B, P)` long tensor.
    """
    if gt_boxes.shape[1] == 0:
        return torch.full((gt_boxes.shape[0], points.shape[0]), -1, dtype=torch.long, device=points.device)
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, M, 2)
    point_xy = points[None, :, None, :]  # (1, P, 1, 2)
    in_center = (point_xy - gt_centers[:, None]).abs().amax(-1) < (
        center_sampling_radius * point_strides[None, :, None]
    )
    side_distances = torch.cat([point_xy - gt_boxes[:, None, :, :2], gt_boxes[:, None, :, 2:] - point_xy], -1)
    inside = side_distances.amin(-1) > 0
    largest_side = side_distances.amax(-1)
    in_range = (largest_side > size_bounds[None, :, None, 0]) & (largest_side < size_bounds[None, :, None, 1])
    candidates = in_center & inside & in_range & gt_valid[:, None, :]  # (B, P, M)

    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
    cost = torch.where(candidates, areas[:, None, :], torch.full_like(largest_side, math.inf))
    smallest_area, matched = cost.min(-1)
    return torch.where(torch.isfinite(smallest_area), matched, torch.full_like(matched, -1))


def centerness_targets(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for points `(N, 2)` inside boxes `(N, 4)`."""
    left_right = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], dim=1)
    top_bottom = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], dim=1)
    ratio = (left_right.amin(1) / left_right.amax(1).clamp(min=1e-6)) * (
        top_bottom.amin(1) / top_bottom.amax(1).clamp(min=1e-6)
    )
    return ratio.clamp(min=0).sqrt()


def fcos_loss(
    cls_logits: torch.Tensor,
    distances: torch.Tensor,
    centerness: torch.Tensor,
    points: torch.Tensor,
    point_strides: torch.Tensor,
    size_bounds: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    *,
    center_sampling_radius: float = 1.5,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    box_loss_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The detection losses, computed in float32.

    `gt_boxes (B, M, 4)` absolute xyxy, `gt_labels (B, M)` and `gt_valid (B, M)` are padded per batch. Images
    without boxes contribute only (negative) classification terms, so the loss stays finite.
    """
    cls_logits, distances, centerness = cls_logits.float(), distances.float(), centerness.float()
    matched = assign_targets(points, point_strides, size_bounds, gt_boxes, gt_valid, center_sampling_radius)
    foreground = matched >= 0  # (B, P)
    num_foreground = foreground.sum().clamp(min=1).float()

    safe_index = matched.clamp(min=0)
    matched_labels = gt_labels.gather(1, safe_index)  # (B, P)
    matched_boxes = gt_boxes.gather(1, safe_index[..., None].expand(-1, -1, 4))  # (B, P, 4)

    class_targets = torch.zeros_like(cls_logits)
    class_targets[foreground, matched_labels[foreground]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, class_targets, focal_alpha, focal_gamma, reduction="sum")

    fg_points = points[None].expand(cls_logits.shape[0], -1, -1)[foreground]
    fg_boxes = matched_boxes[foreground]
    pred_boxes = decode_boxes(points, distances)[foreground]
    loss_box = generalized_box_iou_loss(pred_boxes, fg_boxes, reduction="sum")
    loss_centerness = F.binary_cross_entropy_with_logits(
        centerness[foreground], centerness_targets(fg_points, fg_boxes), reduction="sum"
    )
    return {
        "classification": loss_cls / num_foreground,
        "box": box_loss_weight * loss_box / num_foreground,
        "centerness": loss_centerness / num_foreground,
    }


def pad_detection_targets(
    labels: list[dict[str, torch.Tensor]], image_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DETR-style targets (normalised cxcywh boxes) -> padded absolute xyxy boxes, labels and a validity mask.

    `image_sizes (B, 2)` holds the (height, width) in pixels the normalised coordinates refer to.
    """
    batch_size = len(labels)
    device = image_sizes.device
    # At least one (invalid) slot so the gathers in `fcos_loss` work on batches without any box.
    max_boxes = max([1, *(len(target["class_labels"]) for target in labels)])
    gt_boxes = torch.zeros(batch_size, max_boxes, 4, device=device)
    gt_labels = torch.zeros(batch_size, max_boxes, dtype=torch.long, device=device)
    gt_valid = torch.zeros(batch_size, max_boxes, dtype=torch.bool, device=device)
    for i, target in enumerate(labels):
        count = len(target["class_labels"])
        if count == 0:
            continue
        height, width = image_sizes[i].float()
        scale = torch.stack([width, height, width, height])
        boxes = box_convert(target["boxes"].to(device).float() * scale, "cxcywh", "xyxy")
        gt_boxes[i, :count] = boxes
        gt_labels[i, :count] = target["class_labels"].to(device)
        gt_valid[i, :count] = True
    return gt_boxes, gt_labels, gt_valid
