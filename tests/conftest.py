"""Shared fixtures: tiny random DINOv3 configs (no downloads) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import DINOv3ConvNextConfig, DINOv3ViTConfig

from modeling_cadmtl import CadMtlConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Tests run on a 2-core machine; one intra-op thread per process avoids oversubscription in multi-process tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CLS_LABELS = ["normal", "worn", "cracked"]
DET_LABELS = ["dent", "scratch"]
SEG_LABELS = ["background", "dent", "scratch"]


def tiny_vit_config(**kwargs) -> DINOv3ViTConfig:
    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,  # head_dim 8: RoPE needs a multiple of 4
        "num_register_tokens": 2,
        "patch_size": 16,
        "pos_embed_rescale": None,
        **kwargs,
    }
    settings.setdefault("out_indices", list(range(1, settings["num_hidden_layers"] + 1))[-3:])
    return DINOv3ViTConfig(**settings)


def tiny_convnext_config() -> DINOv3ConvNextConfig:
    return DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])


def tiny_cadmtl_config(backbone: str = "vit", **kwargs) -> CadMtlConfig:
    backbone_config = tiny_vit_config() if backbone == "vit" else tiny_convnext_config()
    settings = {
        "cls_labels": CLS_LABELS,
        "det_labels": DET_LABELS,
        "seg_labels": SEG_LABELS,
        "neck_channels": 16,
        "seg_channels": 16,
        **kwargs,
    }
    return CadMtlConfig(backbone_config=backbone_config, **settings)


@pytest.fixture
def tiny_config() -> CadMtlConfig:
    return tiny_cadmtl_config("vit")


def detection_target(boxes: list[list[float]], classes: list[int]) -> dict[str, torch.Tensor]:
    """A DETR-style target with normalised (cx, cy, w, h) boxes."""
    return {
        "class_labels": torch.tensor(classes, dtype=torch.long),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }
