"""The multi-scale neck shared by the detection head and the segmentation decoder.

A plain ViT gives feature maps at a single stride (the patch size, 16); the neck resamples them into a pyramid at
strides 8 / 16 / 32 (the ViTDet "simple feature pyramid"). A ConvNeXt already gives its stages at those strides.
Both then go through the same FPN fusion: a top-down pathway and a 3x3 output conv per level.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups when the channels allow it (the FCOS / FPN default), fewer for tiny test models."""
    for groups in (32, 16, 8, 4, 2, 1):
        if num_channels % groups == 0:
            return nn.GroupNorm(groups, num_channels)
    raise AssertionError("unreachable: 1 divides everything")


class ConvNormAct(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        activation: bool = True,
        conv: type[nn.Conv2d] = nn.Conv2d,
    ):
        layers: list[nn.Module] = [
            conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            group_norm(out_channels),
        ]
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def vit_lateral(in_channels: int, out_channels: int, scale: float) -> nn.Sequential:
    """Projects a stride-16 ViT map to `out_channels` at 2x, 1x or 0.5x its resolution."""
    if scale == 2:
        resample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
    elif scale == 1:
        resample = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    elif scale == 0.5:
        resample = nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
    else:
        raise ValueError(f"Unsupported resampling scale {scale}; expected 2, 1 or 0.5.")
    return nn.Sequential(resample, group_norm(out_channels))


class FeaturePyramidNeck(nn.Module):
    """Turns the backbone's feature maps into `len(strides)` maps of `out_channels` channels.

    Args:
        in_channels: channels of each backbone map handed in.
        out_channels: channels of every pyramid level.
        backbone_stride: the stride of the backbone maps for a ViT (its patch size), or `None` when the maps
            already come at `strides` (ConvNeXt stages).
        strides: the pyramid strides, finest first.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        backbone_stride: int | None,
        strides: tuple[int, ...] = (8, 16, 32),
    ):
        super().__init__()
        self.strides = strides
        # With one ViT map, every level is resampled from it; with one map per level, map i feeds level i.
        self.shared_input = len(in_channels) == 1 and len(strides) > 1
        if backbone_stride is None:
            if len(in_channels) != len(strides):
                raise ValueError(
                    f"Expected {len(strides)} hierarchical feature maps, got {len(in_channels)}."
                )
            self.laterals = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=1, bias=False), group_norm(out_channels))
                for c in in_channels
            )
        else:
            channels = in_channels * len(strides) if self.shared_input else in_channels
            if len(channels) != len(strides):
                raise ValueError(f"Expected 1 or {len(strides)} ViT feature maps, got {len(in_channels)}.")
            self.laterals = nn.ModuleList(
                vit_lateral(c, out_channels, backbone_stride / stride) for c, stride in zip(channels, strides)
            )
        self.outputs = nn.ModuleList(ConvNormAct(out_channels, out_channels) for _ in strides)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """(B, C_i, H_i, W_i) maps -> list of (B, out_channels, H / s, W / s) for each stride s, finest first."""
        if self.shared_input:
            feature_maps = tuple(feature_maps) * len(self.strides)
        laterals = [lateral(x) for lateral, x in zip(self.laterals, feature_maps)]
        # Top-down pathway: coarse semantics flow into the finer levels.
        for level in range(len(laterals) - 2, -1, -1):
            coarser = F.interpolate(laterals[level + 1], size=laterals[level].shape[-2:], mode="nearest")
            laterals[level] = laterals[level] + coarser
        return [output(x) for output, x in zip(self.outputs, laterals)]
