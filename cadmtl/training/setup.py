"""What a training run builds before its first step: the demo data if needed, the model, trackers, class masks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cadmtl.data.sources import TaskSource
from cadmtl.model_kinds import CADMTL, load_pretrained, require_model_kind
from cadmtl.presets import PRESETS, backbone_preset
from cadmtl.pretrained import PRETRAINED_PRESETS, load_pretrained_backbone
from cadmtl.tasks import CADMTL_TASKS
from cadmtl.training.arguments import DataArguments, ModelArguments, TrainingArguments
from cadmtl.training.tracking import JsonlTracker
from modeling_cadmtl import CadMtlConfig, CadMtlModel

logger = logging.getLogger(__name__)
DEMO_DATASET = "data/cad100k-mini"


def ensure_dataset(data_args: DataArguments, accelerator: Accelerator) -> None:
    """Generate the demo dataset when the default path is missing (main process builds, the others wait)."""
    if data_args.dataset == DEMO_DATASET and not Path(DEMO_DATASET, "README.md").exists():
        if accelerator.is_main_process:
            from dataset_scripts.make_demo import build_demo_dataset

            logger.info("building the demo dataset in %s", DEMO_DATASET)
            build_demo_dataset(DEMO_DATASET)
        accelerator.wait_for_everyone()


def build_model(model_args: ModelArguments, label_sets: dict[str, list[str]]) -> CadMtlModel:
    """A CadMtl checkpoint, or a DINOv3 checkpoint / random preset / ImageNet EfficientNet-Lite backbone with new
    heads."""
    if model_args.model_name_or_path:
        name = model_args.model_name_or_path
        info = require_model_kind(name, CADMTL)  # an anomaly model or a backbone here is a clear error
        return load_pretrained(
            CadMtlModel, name, info.holds, attn_implementation=model_args.attn_implementation
        )
    labels = {
        task.hub.labels_attribute: label_sets.get(name, list(task.placeholder_labels))
        for name, task in CADMTL_TASKS.items()
    }
    heads = {
        "neck_channels": model_args.neck_channels,
        "seg_channels": model_args.seg_channels,
        "det_num_convs": model_args.det_num_convs,
    }
    overrides: dict[str, Any] = {"drop_path_rate": model_args.drop_path_rate}
    if model_args.backbone_out_indices:
        overrides["out_indices"] = model_args.backbone_out_indices
    if model_args.backbone in PRESETS:
        backbone_config = backbone_preset(model_args.backbone, **overrides)
        config = CadMtlConfig(backbone_config=backbone_config, **labels, **heads)
        if model_args.attn_implementation:
            config._attn_implementation = model_args.attn_implementation
        model = CadMtlModel(config)
        if model_args.backbone in PRETRAINED_PRESETS:
            load_pretrained_backbone(model.backbone, model_args.backbone)
        return model
    return CadMtlModel.from_backbone(model_args.backbone, backbone_overrides=overrides, **labels, **heads)


def make_trackers(train_args: TrainingArguments) -> list[Any]:
    trackers: list[Any] = []
    for name in train_args.report_to:
        if name == "jsonl":
            trackers.append(JsonlTracker("cadmtl", Path(train_args.output_dir, "logs")))
        elif name != "none":
            trackers.append(name)  # an Accelerate tracker name: tensorboard, wandb, trackio...
    return trackers


def class_candidates(
    sources: dict[str, list[TaskSource]], num_classes: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """For each classification config, a (K_cls,) mask of its own classes: its images are trained and scored
    among their domain's classes (`cls_candidates` of the model's forward)."""
    masks = {}
    conditioned = [task for task, definition in CADMTL_TASKS.items() if definition.class_candidates]
    for source in (source for task in conditioned for source in sources.get(task, [])):
        mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        mask[source.model_label_ids] = True
        masks[source.config] = mask
    return masks
