"""Tiny random configurations for tests and examples (like ``transformers.testing_utils``): no downloads.

from cadmtl.testing import tiny_cadmtl_config
model = CadMtlModel(tiny_cadmtl_config())  # a 3-layer, 32-wide DINOv3 ViT with all three heads
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import DINOv3ConvNextConfig, DINOv3ViTConfig

from modeling_cadmtl import CadMtlConfig

CLS_LABELS = ["normal", "worn", "cracked"]
DET_LABELS = ["dent", "scratch"]
SEG_LABELS = ["background", "dent", "scratch"]


def tiny_vit_config(**kwargs: Any) -> DINOv3ViTConfig:
    """A 3-layer DINOv3 ViT, hidden size 32, 4 heads (head_dim 8: RoPE needs a multiple of 4), 2 registers."""
    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_register_tokens": 2,
        "patch_size": 16,
        "pos_embed_rescale": None,
        **kwargs,
    }
    settings.setdefault("out_indices", list(range(1, settings["num_hidden_layers"] + 1))[-3:])
    return DINOv3ViTConfig(**settings)


def tiny_convnext_config() -> DINOv3ConvNextConfig:
    """A DINOv3 ConvNeXt with one block per stage and 8 / 16 / 32 / 64 channels."""
    return DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])


def tiny_cadmtl_config(backbone: str = "vit", **kwargs: Any) -> CadMtlConfig:
    """A CadMtl config on a tiny ViT (``backbone="vit"``) or ConvNeXt with the test label sets, 16-channel heads."""
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


def detection_target(boxes: list[list[float]], classes: list[int]) -> dict[str, torch.Tensor]:
    """A DETR-style target with normalised (cx, cy, w, h) boxes."""
    return {
        "class_labels": torch.tensor(classes, dtype=torch.long),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def populate_hf_cache(source: Path, repo_id: str, hf_home: Path) -> None:
    """Lay a saved folder out as the Hugging Face cache would after a download of `repo_id`."""
    folder = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
