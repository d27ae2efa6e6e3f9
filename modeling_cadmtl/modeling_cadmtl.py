"""CadMtl: one DINOv3 backbone shared by a classification head, an FCOS-style detection head and a semantic
segmentation decoder, for multi-task visual anomaly detection on cars (CAD 100K).

Shapes (B = batch, K = classes of a task, P = locations over the pyramid levels at strides 8 / 16 / 32):
    pixel_values (B, 3, H, W)  any H, W: padded inside to a multiple of `config.size_divisor`
    cls_logits   (B, K_cls)
    det_logits   (B, P, K_det)          per-class sigmoid logits
    det_centerness_logits (B, P)        the quality branch; scores = sqrt(sigmoid(logits) * sigmoid(centerness))
    pred_boxes   (B, P, 4)              normalised (cx, cy, w, h) relative to the image (see `pixel_mask`)
    seg_logits   (B, K_seg, H, W)       full input resolution (as UperNet / DPT do)
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert
from transformers import AutoBackbone, AutoConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput, is_timm_available

from .configuration_cadmtl import (
    CUSTOM_PIPELINES,
    PYRAMID_STRIDES,
    TASKS,
    TIMM_INSTALL_HINT,
    CadMtlConfig,
    backbone_normalization,
    default_vit_out_indices,
)
from .detection_cadmtl import (
    DetectionConv,
    FcosHead,
    LevelScale,
    decode_boxes,
    fcos_loss,
    location_grid,
    pad_detection_targets,
)
from .model_card_cadmtl import write_model_card
from .neck_cadmtl import FeaturePyramidNeck
from .segmentation_cadmtl import SemanticFpnDecoder, segmentation_loss

# Written into config.json so each Auto class resolves to its class in the Hub repo's flat code files.
AUTO_MAP = {
    "AutoConfig": "configuration_cadmtl.CadMtlConfig",
    "AutoModel": "modeling_cadmtl.CadMtlModel",
    "AutoModelForImageClassification": "modeling_cadmtl.CadMtlForImageClassification",
    "AutoModelForObjectDetection": "modeling_cadmtl.CadMtlForObjectDetection",
    "AutoModelForSemanticSegmentation": "modeling_cadmtl.CadMtlForSemanticSegmentation",
}

PIPELINE_FILE = "pipeline_cadmtl.py"


@dataclass
class CadMtlOutput(ModelOutput):
    """Output of [`CadMtlModel`]. Fields of heads that did not run are `None`.

    Args:
        loss: sum of the task losses that had labels.
        losses: the loss of each task, e.g. `{"cls": ..., "det": ..., "seg": ...}`.
        loss_terms: the terms inside each task loss (`det/box`, `seg/dice`, ...), for logging.
        cls_logits, det_logits, det_centerness_logits, pred_boxes, seg_logits: see the module docstring.
    """

    loss: torch.FloatTensor | None = None
    losses: dict[str, torch.FloatTensor] | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None
    cls_logits: torch.FloatTensor | None = None
    det_logits: torch.FloatTensor | None = None
    det_centerness_logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    seg_logits: torch.FloatTensor | None = None


@dataclass
class CadMtlObjectDetectionOutput(ModelOutput):
    """Output of [`CadMtlForObjectDetection`], with the field names object-detection pipelines expect.

    Args:
        loss: the detection loss when labels were given.
        logits `(B, P, K)`: per-class sigmoid logits of every location.
        pred_boxes `(B, P, 4)`: normalised (cx, cy, w, h) boxes.
        centerness_logits `(B, P)`: the quality branch, combined with `logits` by `post_process_object_detection`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    centerness_logits: torch.FloatTensor | None = None


class ClassificationHead(nn.Module):
    """Linear classifier on pooled backbone features ([CLS, mean patch] for a ViT, mean of the last stage else)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float, normalize: bool):
        super().__init__()
        # DINOv3 ViT tokens are already layer-normed by the backbone; ConvNeXt stage outputs are not.
        self.norm = nn.LayerNorm(in_features) if normalize else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(pooled)))


def masked_mean(feature_map: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `(B, C, h, w)` over the locations where `valid (B, h, w)` is True."""
    weights = valid.unsqueeze(1).to(feature_map.dtype)
    return (feature_map * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1)


class CadMtlPreTrainedModel(PreTrainedModel):
    config: CadMtlConfig
    config_class = CadMtlConfig
    base_model_prefix = "cadmtl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers builds models on the meta device: every parameter must be set here (or come from a checkpoint).
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DetectionConv):
            init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                init.constant_(module.bias, module.initial_bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LevelScale):
            init.ones_(module.scale)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        image_processor: Any | None = None,
        model_card_data: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """`PreTrainedModel.save_pretrained`, plus what a Hub repo of this model needs.

        Also writes `preprocessor_config.json` (from `image_processor`, or a default `CadMtlImageProcessor` when
        the folder has none yet), the model code as flat files with `auto_map` in config.json (so
        `AutoModel.from_pretrained(repo, trust_remote_code=True)` works without this package), the inspection
        pipeline (`pipeline_cadmtl.py`, named in config.json's `custom_pipelines`, so
        `pipeline("cadmtl-inspection", model=repo, trust_remote_code=True)` gives OK / NG verdicts), and `README.md`
        rendered from `model_card.md` with `model_card_data` (evaluation results, training settings).
        """
        self.config.auto_map = dict(AUTO_MAP)
        self.config.custom_pipelines = {task: dict(info) for task, info in CUSTOM_PIPELINES.items()}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        # The pipeline is no import of the model (it would load transformers' pipelines with every model), so
        # transformers does not copy it with the model code.
        shutil.copyfile(
            os.path.join(os.path.dirname(__file__), PIPELINE_FILE),
            os.path.join(save_directory, PIPELINE_FILE),
        )
        if image_processor is None and not os.path.exists(
            os.path.join(save_directory, "preprocessor_config.json")
        ):
            from .image_processing_cadmtl import CadMtlImageProcessor

            mean, std = backbone_normalization(self.config.backbone_config)
            image_processor = CadMtlImageProcessor(image_mean=mean, image_std=std)
        if image_processor is not None:
            image_processor.save_pretrained(save_directory)
        write_model_card(save_directory, self.config, model_card_data)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        image_processor: Any | None = None,
        model_card_data: dict[str, Any] | None = None,
        commit_message: str = "Upload CadMtl model",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save with `save_pretrained` (weights, code, processor, rendered model card) and upload the folder.

        Unlike `PreTrainedModel.push_to_hub`, the README.md written from `model_card.md` is kept instead of being
        replaced by a generic card.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder, image_processor=image_processor, model_card_data=model_card_data, **save_kwargs
            )
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )


class CadMtlModel(CadMtlPreTrainedModel):
    """The multi-task model: `forward(pixel_values, task=None, labels=None)` runs only the requested heads."""

    def __init__(self, config: CadMtlConfig):
        super().__init__(config)
        if config.is_timm and not is_timm_available():
            raise ImportError(
                f"This model's backbone is the timm network {config.backbone_config.backbone!r}: {TIMM_INSTALL_HINT}"
            )
        self.backbone = AutoBackbone.from_config(config.backbone_config)
        backbone_channels = list(self.backbone.channels) if config.is_timm else config.backbone_channels
        if config.is_vit:
            cls_features, backbone_stride = 2 * config.backbone_config.hidden_size, config.patch_size
        else:
            cls_features, backbone_stride = backbone_channels[-1], None
        self.cls_head = ClassificationHead(
            cls_features, len(config.cls_labels), config.cls_dropout, normalize=not config.is_vit
        )
        self.neck = FeaturePyramidNeck(
            backbone_channels, config.neck_channels, backbone_stride, PYRAMID_STRIDES
        )
        self.det_head = FcosHead(
            config.neck_channels, len(config.det_labels), config.det_num_convs, PYRAMID_STRIDES
        )
        self.seg_decoder = SemanticFpnDecoder(
            config.neck_channels, config.seg_channels, len(config.seg_labels), len(PYRAMID_STRIDES)
        )
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str | os.PathLike,
        *,
        cls_labels: list[str] | None = None,
        det_labels: list[str] | None = None,
        seg_labels: list[str] | None = None,
        backbone_overrides: dict[str, Any] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **config_kwargs: Any,
    ) -> CadMtlPreTrainedModel:
        """A new model whose backbone starts from a DINOv3 checkpoint and whose heads are freshly initialised.

        `backbone_name_or_path` is a Hub id such as `facebook/dinov3-vitb16-pretrain-lvd1689m` (gated: accept the
        DINOv3 licence first) or a local folder. For a ViT the heads read three layers spread over the depth
        unless `backbone_overrides` sets `out_indices`; other overrides (e.g. `drop_path_rate`,
        `pos_embed_rescale`) go to the backbone config. transformers 5 ignores `use_pretrained_backbone`, so the
        weights are copied explicitly and every backbone tensor is checked to have been loaded.

        Example:

        ```python
        >>> model = CadMtlModel.from_backbone(
        ...     "facebook/dinov3-vitb16-pretrain-lvd1689m",
        ...     cls_labels=["normal", "brake_pad_worn"], det_labels=["dent", "scratch"],
        ...     seg_labels=["background", "dent", "scratch"])
        ```
        """
        hub_kwargs = {"revision": revision, "token": token}
        backbone_config = AutoConfig.from_pretrained(backbone_name_or_path, **hub_kwargs)
        overrides = dict(backbone_overrides or {})
        if backbone_config.model_type == "dinov3_vit" and "out_indices" not in overrides:
            overrides["out_indices"] = default_vit_out_indices(backbone_config.num_hidden_layers)
        if "out_indices" in overrides or "out_features" in overrides:
            # Both are stored in the config and must agree: let the backbone config derive one from the other.
            overrides.setdefault("out_features", None)
            overrides.setdefault("out_indices", None)
        config_dict = {**backbone_config.to_dict(), **overrides}
        config_dict.pop("architectures", None)
        backbone_config = type(backbone_config).from_dict(config_dict)
        config = CadMtlConfig(
            backbone_config=backbone_config,
            cls_labels=cls_labels,
            det_labels=det_labels,
            seg_labels=seg_labels,
            **config_kwargs,
        )
        model = cls(config)
        pretrained, loading_info = type(model.backbone).from_pretrained(
            backbone_name_or_path, config=config.backbone_config, output_loading_info=True, **hub_kwargs
        )
        if loading_info["missing_keys"] or loading_info["mismatched_keys"]:
            raise ValueError(
                f"{backbone_name_or_path} is not a complete {backbone_config.model_type} checkpoint: missing "
                f"{sorted(loading_info['missing_keys'])[:10]}, mismatched {list(loading_info['mismatched_keys'])[:10]}."
            )
        model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
        return model

    # ----------------------------------------------------------------------------------------------- checks
    def _resolve_tasks(self, task: str | None) -> tuple[str, ...]:
        if task is None:
            return TASKS
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS} or None for all tasks.")
        return (task,)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        channels = self.config.backbone_config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}. "
                "Convert grayscale / RGBA images to RGB first (the image processor does it)."
            )

    def _check_cls_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        if labels.shape != (batch_size,):
            raise ValueError(
                f"Classification labels must have shape ({batch_size},), got {tuple(labels.shape)}."
            )
        num_classes = len(self.config.cls_labels)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"Classification label ids {sorted(set(bad.tolist()))} are outside the label set of "
                f"{num_classes} classes (valid ids 0..{num_classes - 1})."
            )

    def _check_det_labels(self, labels: list[dict[str, torch.Tensor]], batch_size: int) -> None:
        if not isinstance(labels, (list, tuple)) or len(labels) != batch_size:
            raise ValueError(f"Detection labels must be a list of {batch_size} dicts, one per image.")
        num_classes = len(self.config.det_labels)
        for i, target in enumerate(labels):
            if "class_labels" not in target or "boxes" not in target:
                raise ValueError(
                    f"Detection target {i} needs 'class_labels' and 'boxes', got keys {list(target)}."
                )
            classes, boxes = target["class_labels"], target["boxes"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(classes):
                raise ValueError(
                    f"Detection target {i}: boxes must be (n, 4) with one class label each, got boxes "
                    f"{tuple(boxes.shape)} and {len(classes)} labels."
                )
            bad = classes[(classes < 0) | (classes >= num_classes)]
            if bad.numel():
                raise ValueError(
                    f"Detection target {i}: class ids {sorted(set(bad.tolist()))} are outside the label set of "
                    f"{num_classes} classes (valid ids 0..{num_classes - 1})."
                )
            if not torch.isfinite(boxes).all():
                raise ValueError(f"Detection target {i}: boxes contain NaN or infinite values.")
            negative = (boxes[:, 2:] < 0).any(dim=1)
            if negative.any():
                raise ValueError(
                    f"Detection target {i}: boxes {negative.nonzero().flatten().tolist()} have a negative width or "
                    "height (boxes are normalised cx, cy, w, h)."
                )

    def _check_seg_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor) -> None:
        expected = (pixel_values.shape[0], *pixel_values.shape[-2:])
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"Segmentation labels must have the shape of the images (batch, height, width) = {expected}, "
                f"got {tuple(labels.shape)}."
            )
        num_classes, ignore = len(self.config.seg_labels), self.config.seg_ignore_index
        bad = labels[((labels < 0) | (labels >= num_classes)) & (labels != ignore)]
        if bad.numel():
            raise ValueError(
                f"Segmentation label ids {sorted(set(bad.tolist()))[:10]} are outside the label set of {num_classes} "
                f"classes (valid ids 0..{num_classes - 1}, {ignore} = ignore)."
            )

    def _split_labels(self, labels: Any, tasks: tuple[str, ...]) -> dict[str, Any]:
        if labels is None:
            return {}
        if len(tasks) == 1:
            return {tasks[0]: labels}
        if not isinstance(labels, dict) or not set(labels) <= set(TASKS):
            raise ValueError(
                "With task=None, labels must be a dict keyed by task ('cls', 'det', 'seg'); "
                f"got {type(labels).__name__}{' with keys ' + str(list(labels)) if isinstance(labels, dict) else ''}."
            )
        return {task: value for task, value in labels.items() if value is not None}

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | None = None,
        labels: Any = None,
        pixel_mask: torch.Tensor | None = None,
        cls_candidates: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CadMtlOutput:
        r"""
        Args:
            pixel_values `(B, 3, H, W)`: normalised images, any size.
            task: "cls", "det", "seg", or None for all three heads. Only the requested heads run.
            labels: for one task, that task's labels; for `task=None`, a dict keyed by task (any subset):
                cls `(B,)` class ids; det a list of B dicts `{"class_labels": (n,), "boxes": (n, 4)}` with
                normalised (cx, cy, w, h) boxes (the DETR convention); seg `(B, H, W)` class ids, 255 = ignore.
            pixel_mask `(B, H, W)`: 1 on real pixels, 0 on padding added by the image processor (bottom/right).
                Boxes are then normalised by each image's real size, and pooling skips the padding.
            cls_candidates `(B, K_cls)` or `(K_cls,)` bool: the classes each image can be, e.g. those of its
                vehicle domain when one head covers several domains; the classification loss is a softmax over
                these only. `cls_logits` keep every class (mask them the same way to predict within a domain).
        """
        tasks = self._resolve_tasks(task)
        self._check_pixel_values(pixel_values)
        task_labels = self._split_labels(labels, tasks)
        batch_size, _, height, width = pixel_values.shape
        if "cls" in task_labels:
            self._check_cls_labels(task_labels["cls"], batch_size)
        if "det" in task_labels:
            self._check_det_labels(task_labels["det"], batch_size)
        if "seg" in task_labels:
            self._check_seg_labels(task_labels["seg"], pixel_values)

        if pixel_mask is None:
            pixel_mask = torch.ones(batch_size, height, width, dtype=torch.bool, device=pixel_values.device)
        else:
            pixel_mask = pixel_mask.bool()
        # Real (unpadded) size of each image, (B, 2) as (height, width): padding is at the bottom / right.
        image_sizes = torch.stack([pixel_mask.any(dim=2).sum(dim=1), pixel_mask.any(dim=1).sum(dim=1)], dim=1)

        divisor = math.lcm(self.config.size_divisor, self.config.patch_size)
        padded_height, padded_width = (
            math.ceil(height / divisor) * divisor,
            math.ceil(width / divisor) * divisor,
        )
        padded = F.pad(pixel_values, (0, padded_width - width, 0, padded_height - height))
        valid = F.pad(pixel_mask, (0, padded_width - width, 0, padded_height - height))
        backbone_outputs = self.backbone(padded)
        feature_maps = backbone_outputs.feature_maps

        outputs = CadMtlOutput(losses={}, loss_terms={})
        if "cls" in tasks:
            outputs.cls_logits = self._classify(backbone_outputs, valid)
            if "cls" in task_labels:
                logits = outputs.cls_logits.float()
                if cls_candidates is not None:
                    logits = self._restrict_to_candidates(logits, cls_candidates, task_labels["cls"])
                outputs.losses["cls"] = F.cross_entropy(logits, task_labels["cls"])
        if "det" in tasks or "seg" in tasks:
            pyramid = self.neck(feature_maps)
        if "det" in tasks:
            self._detect(pyramid, image_sizes, task_labels.get("det"), outputs)
        if "seg" in tasks:
            seg_logits = self.seg_decoder(pyramid)
            seg_logits = F.interpolate(seg_logits, size=(padded_height, padded_width), mode="bilinear")
            outputs.seg_logits = seg_logits[:, :, :height, :width]
            if "seg" in task_labels:
                terms = segmentation_loss(
                    outputs.seg_logits,
                    task_labels["seg"],
                    self.config.seg_ignore_index,
                    self.config.seg_dice_weight,
                )
                outputs.losses["seg"] = sum(terms.values())
                outputs.loss_terms.update({f"seg/{name}": value for name, value in terms.items()})
        if outputs.losses:
            outputs.loss = sum(outputs.losses.values())
        return outputs

    @staticmethod
    def _restrict_to_candidates(
        logits: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        candidates = candidates.to(device=logits.device, dtype=torch.bool).expand_as(logits)
        if not candidates.gather(1, labels[:, None]).all():
            raise ValueError(
                "cls_candidates exclude the label of some images: every label must be a candidate."
            )
        return logits.masked_fill(~candidates, torch.finfo(logits.dtype).min)

    def _classify(self, backbone_outputs: Any, valid_pixels: torch.Tensor) -> torch.Tensor:
        last_map = backbone_outputs.feature_maps[-1]
        # A location counts for pooling when its patch / cell starts on a real pixel.
        stride_h = valid_pixels.shape[1] // last_map.shape[2]
        stride_w = valid_pixels.shape[2] // last_map.shape[3]
        valid_cells = valid_pixels[:, ::stride_h, ::stride_w][:, : last_map.shape[2], : last_map.shape[3]]
        pooled = masked_mean(last_map, valid_cells)
        if self.config.is_vit:
            pooled = torch.cat([backbone_outputs.cls_tokens[-1], pooled], dim=-1)
        return self.cls_head(pooled)

    def _detect(
        self,
        pyramid: list[torch.Tensor],
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None,
        outputs: CadMtlOutput,
    ) -> None:
        logits, distances, centerness = self.det_head(pyramid)
        points, point_strides, size_bounds = location_grid(
            [tuple(level.shape[-2:]) for level in pyramid], PYRAMID_STRIDES, logits.device
        )
        boxes = decode_boxes(points, distances.float())
        scale = image_sizes.flip(1).repeat(1, 2).float()[:, None, :]  # (B, 1, 4) as (w, h, w, h)
        outputs.det_logits = logits
        outputs.det_centerness_logits = centerness
        outputs.pred_boxes = box_convert(boxes, "xyxy", "cxcywh") / scale
        if targets is not None:
            gt_boxes, gt_labels, gt_valid = pad_detection_targets(targets, image_sizes)
            terms = fcos_loss(
                logits,
                distances,
                centerness,
                points,
                point_strides,
                size_bounds,
                gt_boxes,
                gt_labels,
                gt_valid,
                center_sampling_radius=self.config.center_sampling_radius,
                focal_alpha=self.config.focal_alpha,
                focal_gamma=self.config.focal_gamma,
                box_loss_weight=self.config.det_box_loss_weight,
            )
            outputs.losses["det"] = sum(terms.values())
            outputs.loss_terms.update({f"det/{name}": value for name, value in terms.items()})


class CadMtlForImageClassification(CadMtlModel):
    """The classification head of a CadMtl checkpoint, for `pipeline("image-classification")`."""

    def __init__(self, config: CadMtlConfig):
        super().__init__(config)
        config.set_task_labels("cls")

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        outputs = super().forward(pixel_values, task="cls", labels=labels, pixel_mask=pixel_mask)
        return ImageClassifierOutput(loss=outputs.loss, logits=outputs.cls_logits)


class CadMtlForObjectDetection(CadMtlModel):
    """The detection head of a CadMtl checkpoint, for `pipeline("object-detection")`."""

    def __init__(self, config: CadMtlConfig):
        super().__init__(config)
        config.set_task_labels("det")

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: list[dict[str, torch.Tensor]] | None = None,
        pixel_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CadMtlObjectDetectionOutput:
        outputs = super().forward(pixel_values, task="det", labels=labels, pixel_mask=pixel_mask)
        return CadMtlObjectDetectionOutput(
            loss=outputs.loss,
            logits=outputs.det_logits,
            pred_boxes=outputs.pred_boxes,
            centerness_logits=outputs.det_centerness_logits,
        )


class CadMtlForSemanticSegmentation(CadMtlModel):
    """The segmentation decoder of a CadMtl checkpoint, for `pipeline("image-segmentation")`."""

    def __init__(self, config: CadMtlConfig):
        super().__init__(config)
        config.set_task_labels("seg")

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SemanticSegmenterOutput:
        outputs = super().forward(pixel_values, task="seg", labels=labels, pixel_mask=pixel_mask)
        return SemanticSegmenterOutput(loss=outputs.loss, logits=outputs.seg_logits)


CadMtlConfig.register_for_auto_class()
CadMtlModel.register_for_auto_class("AutoModel")
CadMtlForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CadMtlForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
CadMtlForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "CadMtlForImageClassification",
    "CadMtlForObjectDetection",
    "CadMtlForSemanticSegmentation",
    "CadMtlModel",
    "CadMtlObjectDetectionOutput",
    "CadMtlOutput",
    "CadMtlPreTrainedModel",
]
