"""Semantic segmentation decoder (semantic-FPN style) and its loss (cross-entropy + Dice, with an ignore index)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_cadmtl import IGNORE_INDEX
from .neck_cadmtl import ConvNormAct


class SemanticFpnDecoder(nn.Module):
    """Each pyramid level -> 3x3 conv, upsampled to the finest level and summed -> 3x3 conv -> 1x1 classifier.

    Returns logits at the finest pyramid stride, `(B, num_classes, H / strides[0], W / strides[0])`.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_levels: int):
        super().__init__()
        self.level_convs = nn.ModuleList(ConvNormAct(in_channels, channels) for _ in range(num_levels))
        self.fuse = ConvNormAct(channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        finest_size = features[0].shape[-2:]
        fused = self.level_convs[0](features[0])
        for conv, x in zip(self.level_convs[1:], features[1:]):
            fused = fused + F.interpolate(conv(x), size=finest_size, mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(fused))


def dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss averaged over classes; pixels labelled `ignore_index` do not count.

    logits `(B, K, H, W)` and labels `(B, H, W)` at the same resolution.
    """
    num_classes = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probabilities = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(labels.masked_fill(~valid[:, 0], 0), num_classes).permute(0, 3, 1, 2) * valid
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    cardinality = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return (1 - (2 * intersection + smooth) / (cardinality + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, dice_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Cross-entropy + Dice on full-resolution logits `(B, K, H, W)` against labels `(B, H, W)`, in float32."""
    logits = logits.float()
    losses = {"cross_entropy": F.cross_entropy(logits, labels, ignore_index=ignore_index)}
    if not (labels != ignore_index).any():
        # Cross-entropy over zero pixels is NaN; an all-ignore batch teaches nothing but must not poison training.
        losses["cross_entropy"] = logits.sum() * 0.0
    if dice_weight > 0:
        losses["dice"] = dice_weight * dice_loss(logits, labels, ignore_index)
    return losses
