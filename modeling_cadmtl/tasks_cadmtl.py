"""The heads of CadMtl, each declared once: its name, the model output fields it fills, its module, the transformers
pipeline that serves it, its processor post-processing, its image-level anomaly (verdict) score and its card metrics.

Everything that needs per-head output knowledge on the Hub side asks this registry (`TASK_DEFINITIONS`,
`get_task`): the configuration's `TASKS`, the image processor (pipeline hints, one forward per input size, the
verdict), the inspection pipeline, the model card; `cadmtl.tasks` extends each definition with what only training
and evaluation need. A new head adds one `TaskDefinition` below (and its module file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F


def output_field(outputs: Any, *names: str) -> torch.Tensor | None:
    """The first of `names` that `outputs` (a ModelOutput, a dict or a pipeline's UserDict) holds, so
    post-processing accepts both the multi-task `CadMtlOutput` and the single-task outputs of `CadMtlFor*`."""
    for name in names:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


AnomalyScore = Callable[[Any, "int | None", "torch.Tensor | None"], "torch.Tensor | None"]


@dataclass(frozen=True)
class TaskDefinition:
    """One head of the multi-task model.

    Attributes:
        name: the task name used everywhere ("cls", "det", "seg"): `forward(task=...)`, `image_sizes`, CLI flags.
        output_fields: the `CadMtlOutput` fields the head fills, in the order the ONNX graph outputs them.
        class_axis: the axis of the first output field that holds one score per class.
        labels_attribute: the `CadMtlConfig` attribute that lists the head's label names.
        head_module: the `CadMtlModel` attribute holding the head's own parameters.
        uses_neck: whether the head reads the feature pyramid (`CadMtlModel.neck`), which such heads share.
        pipeline_task: the transformers pipeline that serves the head alone (`pipeline(pipeline_task, ...)`).
        result_key: the head's key in the results of the predictors (`OnnxPredictor.predict`).
        post_process: the `CadMtlImageProcessor` method that turns the head's outputs into predictions.
        post_process_options: the keyword options of `post_process` that the predictors pass through.
        anomaly_score: `(outputs, normal_class_id, pixel_mask) -> (B,)` image-level anomaly score in [0, 1], or
            None when the head gives none (e.g. a classifier without a `normal` class).
        needs_normal_class: the anomaly score needs a `normal` class among the head's labels.
        title: the head's task as the Hub names it (the model card's `task_name`, its tables' titles).
        card_metrics: the evaluation metrics the model card shows, in the order of the paper's tables.
        tile_merge: how the one inference path puts the head's outputs on tiles of a high-resolution image back
            together (`CadMtlImageProcessor` with `tile_size`): `"detections"` (each tile's boxes shifted to the
            image and pooled; the post-processing's class-wise NMS merges duplicates across tile seams), `"map"`
            (per-pixel logits stitched over the image, overlaps averaged), or None: the head sees the whole image
            (a class of the whole picture).
    """

    name: str
    output_fields: tuple[str, ...]
    class_axis: int
    labels_attribute: str
    head_module: str
    uses_neck: bool
    pipeline_task: str
    result_key: str
    post_process: str
    post_process_options: tuple[str, ...]
    anomaly_score: AnomalyScore
    needs_normal_class: bool
    title: str
    card_metrics: tuple[str, ...]
    tile_merge: str | None = None

    @property
    def pixel_mask_field(self) -> str:
        """Where the one inference path (`CadMtlImageProcessor.forward_size_groups`) keeps the pixel mask of the
        input this head saw, when its images were padded (an aspect-preserving `size`)."""
        return f"{self.name}_pixel_mask"


def classification_anomaly_score(
    outputs: Any, normal_class_id: int | None, pixel_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """1 - softmax probability of the `normal` class; None without a normal class (e.g. a classifier of parts)."""
    logits = output_field(outputs, "cls_logits")
    if logits is None or normal_class_id is None:
        return None
    return 1.0 - logits.float().softmax(dim=-1)[:, normal_class_id]


def detection_anomaly_score(
    outputs: Any, normal_class_id: int | None = None, pixel_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The highest detection score of any location and class, `sqrt(sigmoid(class) * sigmoid(centerness))` as in
    `post_process_object_detection` (a maximum needs no threshold or NMS)."""
    logits = output_field(outputs, "det_logits")
    if logits is None:
        return None
    probabilities = logits.float().sigmoid()
    centerness = output_field(outputs, "det_centerness_logits")
    if centerness is not None:
        probabilities = (probabilities * centerness.float().sigmoid()[..., None]).sqrt()
    return probabilities.flatten(1).amax(dim=1)


def segmentation_anomaly_score(
    outputs: Any, normal_class_id: int | None = None, pixel_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The anomalous-pixel area: the fraction of the image's pixels (`pixel_mask`: 1 on the image, 0 on padding;
    default the outputs' `seg_pixel_mask`) whose most likely class is not the background (class 0)."""
    logits = output_field(outputs, "seg_logits")
    if logits is None:
        return None
    if pixel_mask is None:
        pixel_mask = output_field(outputs, SEGMENTATION.pixel_mask_field)
    anomalous = (logits.argmax(dim=1) != 0).float()
    if pixel_mask is None:
        return anomalous.mean(dim=(1, 2))
    valid = F.interpolate(pixel_mask[:, None].float(), size=anomalous.shape[-2:], mode="nearest")[:, 0]
    return (anomalous * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)


CLASSIFICATION = TaskDefinition(
    name="cls",
    output_fields=("cls_logits",),
    class_axis=-1,
    labels_attribute="cls_labels",
    head_module="cls_head",
    uses_neck=False,
    pipeline_task="image-classification",
    result_key="classification",
    post_process="post_process_image_classification",
    post_process_options=("top_k", "id2label"),
    anomaly_score=classification_anomaly_score,
    needs_normal_class=True,
    title="Image Classification",
    card_metrics=("acc@1", "acc@5"),
)
DETECTION = TaskDefinition(
    name="det",
    output_fields=("det_logits", "det_centerness_logits", "pred_boxes"),
    class_axis=-1,
    labels_attribute="det_labels",
    head_module="det_head",
    uses_neck=True,
    pipeline_task="object-detection",
    result_key="detection",
    post_process="post_process_object_detection",
    post_process_options=("threshold", "target_sizes", "nms_threshold"),
    anomaly_score=detection_anomaly_score,
    needs_normal_class=False,
    title="Object Detection",
    card_metrics=("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100"),
    tile_merge="detections",
)
SEGMENTATION = TaskDefinition(
    name="seg",
    output_fields=("seg_logits",),
    class_axis=1,
    labels_attribute="seg_labels",
    head_module="seg_decoder",
    uses_neck=True,
    pipeline_task="image-segmentation",
    result_key="segmentation",
    post_process="post_process_semantic_segmentation",
    post_process_options=("target_sizes",),
    anomaly_score=segmentation_anomaly_score,
    needs_normal_class=False,
    title="Semantic Segmentation",
    card_metrics=("mIoU", "mFscore", "mPrecision", "mRecall", "aAcc"),
    tile_merge="map",
)

# The registry, in the canonical task order (`TASKS`).
TASK_DEFINITIONS: dict[str, TaskDefinition] = {
    task.name: task for task in (CLASSIFICATION, DETECTION, SEGMENTATION)
}
TASKS: tuple[str, ...] = tuple(TASK_DEFINITIONS)
# The head each transformers pipeline serves: `pipeline(...)` loads the processor with `_from_pipeline=<its task>`.
PIPELINE_TASKS: dict[str, str] = {task.pipeline_task: task.name for task in TASK_DEFINITIONS.values()}


def get_task(name: str) -> TaskDefinition:
    """The definition of task `name`; a `ValueError` naming the known tasks otherwise."""
    try:
        return TASK_DEFINITIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown task {name!r}; expected one of {TASKS}.") from None


def output_fields(tasks: Iterable[str]) -> tuple[str, ...]:
    """The output fields of `tasks`, head after head."""
    return tuple(field for task in tasks for field in get_task(task).output_fields)


def task_of_field(field: str) -> str | None:
    """The head that fills output `field` (None for a field no head fills)."""
    return next((task.name for task in TASK_DEFINITIONS.values() if field in task.output_fields), None)


def head_outputs(outputs: Mapping[str, Any] | Any, tasks: Iterable[str]) -> dict[str, torch.Tensor]:
    """The output fields of `tasks` taken from a model's `outputs` (missing fields are left out)."""
    fields = {}
    for field in output_fields(tasks):
        value = output_field(outputs, field)
        if value is not None:
            fields[field] = value
    return fields


__all__ = [
    "TASKS",
    "TASK_DEFINITIONS",
    "TaskDefinition",
    "get_task",
    "head_outputs",
    "output_fields",
    "task_of_field",
]
