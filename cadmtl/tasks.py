"""The heads of CadMtl as training and evaluation see them: each Hub `TaskDefinition`
(`modeling_cadmtl/tasks_cadmtl.py`: output fields, head module, post-processing, verdict score) extended with what
only the `cadmtl` package needs: the dataset columns it reads, how its examples are decoded, augmented and batched
(`cadmtl.data.pipeline`), whether its configs condition on their domain's classes (training step, evaluation), the
metric family that scores it (`cadmtl.evaluation.loop`), its default input size, its report tables and charts.

The data pipeline, the evaluation loop, the training step, reporting and charts ask this registry (`CADMTL_TASKS`,
`get_cadmtl_task`) instead of branching on task names. A new head adds one `CadMtlTask` here beside its Hub
`TaskDefinition` (and, for a new kind of target, the `TaskTransform` method and metric family they name).
"""

from __future__ import annotations

from dataclasses import dataclass

from dataset_scripts.schema import TASK_COLUMNS
from modeling_cadmtl.tasks_cadmtl import (
    CLASSIFICATION,
    DETECTION,
    SEGMENTATION,
    TASK_DEFINITIONS,
    TASKS,
    TaskDefinition,
)


@dataclass(frozen=True)
class CadMtlTask:
    """One head of the multi-task model, training / evaluation side.

    Attributes:
        hub: the head's Hub definition (name, output fields, head module, post-processing, verdict score).
        encoded_image_columns: label columns stored as encoded images, decoded by the pipeline (segmentation masks).
        sample: the `cadmtl.data.pipeline.TaskTransform` method that turns a decoded example into
            `(pixel_values, labels)` (decoding its labels, augmenting image and labels together).
        scale_jitter: augment by rescaling the whole image and cropping / padding back (keeps every box whole);
            otherwise a random resized crop. Training decodes JPEGs large enough for the largest scale either way.
        color_jitter: training jitters brightness, contrast and saturation (labels that colour cannot change).
        stack_labels: `collate_fn` stacks the labels into one tensor (else a list, one target dict per image).
        class_candidates: a config is trained and scored among its own domain's classes (`cls_candidates` of
            the model's forward; `class_subset` of the evaluation loop).
        metric: the metric family that scores the head (`cadmtl.evaluation.loop.SCORERS`).
        default_image_size: the square input size when neither the model nor the command names one.
        placeholder_labels: the head's labels in a new model whose data has no config of this task.
        table_title: the heading of the head's per-domain table (`cadmtl.evaluation.reporting.domain_tables`).
        table_columns: `(metric, column label)` of that table, in the paper's order.
        table_rank: the table's place among the heads' tables (the paper puts detection first).
        headline: `(metric, column label)`: the head's one number in the comparison table and for keeping the
            best checkpoint (`cadmtl.training.best`).
        per_class_chart: `(per-class metric, the count drawn next to it)` of `cadmtl charts`.
        overlay_fields: the `cadmtl.pictures.overlays.ImagePrediction` fields that draw the head's predictions.
        analysis_charts: `cadmtl charts` also draws the detection analysis (confusion matrix, PR and confidence
            curves) when the report holds it.
    """

    hub: TaskDefinition
    encoded_image_columns: tuple[str, ...]
    sample: str
    scale_jitter: bool
    color_jitter: bool
    stack_labels: bool
    class_candidates: bool
    metric: str
    default_image_size: int
    placeholder_labels: tuple[str, ...]
    table_title: str
    table_columns: tuple[tuple[str, str], ...]
    table_rank: int
    headline: tuple[str, str]
    per_class_chart: tuple[str, str]
    overlay_fields: tuple[str, ...]
    analysis_charts: bool = False

    @property
    def name(self) -> str:
        return self.hub.name

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The dataset columns that hold the head's labels (`dataset_scripts.schema.TASK_COLUMNS`)."""
        return TASK_COLUMNS[self.name]


CADMTL_CLASSIFICATION = CadMtlTask(
    hub=CLASSIFICATION,
    encoded_image_columns=(),
    sample="classification_sample",
    scale_jitter=False,
    color_jitter=True,
    stack_labels=True,
    class_candidates=True,
    metric="classification",
    default_image_size=224,
    placeholder_labels=("normal", "anomaly"),
    table_title="Classification",
    table_columns=(("acc@1", "Acc@1"), ("acc@5", "Acc@5")),
    table_rank=1,
    headline=("acc@1", "Cls. Acc (%)"),
    per_class_chart=("acc@1", "support"),
    overlay_fields=("classes",),
)
CADMTL_DETECTION = CadMtlTask(
    hub=DETECTION,
    encoded_image_columns=(),
    sample="detection_sample",
    scale_jitter=True,
    color_jitter=False,
    stack_labels=False,
    class_candidates=False,
    metric="detection",
    default_image_size=512,
    placeholder_labels=("defect",),
    table_title="Detection",
    table_columns=(("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("AR@100", "AR")),
    table_rank=0,
    headline=("AP", "Det. mAP (%)"),
    per_class_chart=("AP", "num_ground_truth"),
    overlay_fields=("boxes", "box_scores", "box_labels"),
    analysis_charts=True,
)
CADMTL_SEGMENTATION = CadMtlTask(
    hub=SEGMENTATION,
    encoded_image_columns=("mask",),
    sample="segmentation_sample",
    scale_jitter=False,
    color_jitter=False,
    stack_labels=True,
    class_candidates=False,
    metric="segmentation",
    default_image_size=512,
    placeholder_labels=("background", "defect"),
    table_title="Segmentation",
    table_columns=(("mIoU", "mIoU"), ("mFscore", "mFscore"), ("mPrecision", "mPrec"), ("mRecall", "mRecall")),
    table_rank=2,
    headline=("mIoU", "Seg. mIoU (%)"),
    per_class_chart=("IoU", "gt_pixels"),
    overlay_fields=("segmentation",),
)

# The registry, in the canonical task order (`TASKS`).
CADMTL_TASKS: dict[str, CadMtlTask] = {
    task.name: task for task in (CADMTL_CLASSIFICATION, CADMTL_DETECTION, CADMTL_SEGMENTATION)
}


def get_cadmtl_task(name: str) -> CadMtlTask:
    """The training / evaluation definition of task `name`; a `ValueError` naming the known tasks otherwise."""
    try:
        return CADMTL_TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; expected one of {TASKS}") from None


__all__ = ["CADMTL_TASKS", "TASKS", "TASK_DEFINITIONS", "CadMtlTask", "get_cadmtl_task"]
