"""Evaluate a CadMtl model on one task's split with the project's metrics (distributed-safe)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torchvision.ops import box_convert
from tqdm.auto import tqdm

from cadmtl.data.sources import LoaderSettings, TaskSource, source_batches
from cadmtl.evaluation.metrics import (
    ClassificationMetrics,
    DetectionMetrics,
    MetricsReport,
    SegmentationMetrics,
)
from cadmtl.tasks import get_cadmtl_task
from dataset_scripts.schema import IGNORE_INDEX
from modeling_cadmtl import CadMtlImageProcessor

# COCO evaluation keeps up to 100 detections per image; a low threshold lets AP see the whole precision/recall curve.
DETECTION_SCORE_THRESHOLD = 0.05


def absolute_xyxy(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes -> absolute (x1, y1, x2, y2) in an image of `size` (height, width)."""
    height, width = size.tolist()
    return (
        box_convert(boxes.float(), "cxcywh", "xyxy")
        * boxes.new_tensor([width, height, width, height]).float()
    )


def lockstep(batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """Yield the batches so that every rank runs the same number of forward passes.

    Sharded models (FSDP, DeepSpeed ZeRO-3) need every rank in every forward; evaluation shards can be uneven. A
    rank that ran out gets a tiny placeholder batch marked `is_padding` (forward only, never scored). One small
    all-reduce per batch; a no-op without `torch.distributed`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield from batches
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        alive = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(alive)
        if alive.item() == 0:
            return
        yield batch if batch is not None else {"pixel_values": torch.zeros(1, 3, 32, 32), "is_padding": True}


class ClassificationScorer:
    """Accuracy of the class logits; with `class_subset`, among those model class ids only (the report is then over
    the subset's classes)."""

    def __init__(
        self, label_names: list[str], class_subset: list[int] | None = None, id_prefix: str = ""
    ) -> None:
        self.subset = None
        if class_subset is not None:
            self.subset = torch.tensor(class_subset)
            # model class id -> position in the subset (-1: outside it; a target there would be a data error)
            self.position = torch.full((len(label_names),), -1, dtype=torch.long)
            self.position[self.subset] = torch.arange(len(self.subset))
            label_names = [label_names[i] for i in class_subset]
        self.metric = ClassificationMetrics(len(label_names), label_names=label_names)

    def update(self, outputs: Any, batch: dict[str, Any], processor: CadMtlImageProcessor) -> None:
        logits, targets = outputs["cls_logits"].cpu(), batch["labels"].cpu()
        if self.subset is not None:
            logits, targets = logits[:, self.subset], self.position[targets]
        self.metric.update(logits, targets)


class DetectionScorer:
    """COCO AP of the post-processed detections, in each image's original pixel frame (`orig_sizes`)."""

    def __init__(
        self, label_names: list[str], class_subset: list[int] | None = None, id_prefix: str = ""
    ) -> None:
        self.metric = DetectionMetrics(label_names=label_names)
        self.id_prefix = id_prefix

    def update(self, outputs: Any, batch: dict[str, Any], processor: CadMtlImageProcessor) -> None:
        orig_sizes = batch["orig_sizes"].cpu()
        predictions = processor.post_process_object_detection(
            outputs,
            threshold=DETECTION_SCORE_THRESHOLD,
            target_sizes=orig_sizes,
        )
        targets = []
        for image_id, target, size, prediction in zip(
            batch["image_ids"], batch["labels"], orig_sizes, predictions
        ):
            targets.append(
                {
                    "boxes": absolute_xyxy(target["boxes"].cpu(), size),
                    "labels": target["class_labels"].cpu(),
                    "image_id": f"{self.id_prefix}{image_id}",
                }
            )
            prediction["image_id"] = f"{self.id_prefix}{image_id}"
        self.metric.update(
            [{k: v.cpu() if hasattr(v, "cpu") else v for k, v in p.items()} for p in predictions], targets
        )


class SegmentationScorer:
    """IoU of the most likely class per pixel, at the resolution the labels were resized to."""

    def __init__(
        self, label_names: list[str], class_subset: list[int] | None = None, id_prefix: str = ""
    ) -> None:
        self.metric = SegmentationMetrics(
            len(label_names), ignore_index=IGNORE_INDEX, label_names=label_names
        )

    def update(self, outputs: Any, batch: dict[str, Any], processor: CadMtlImageProcessor) -> None:
        self.metric.update(outputs["seg_logits"].argmax(dim=1).cpu(), batch["labels"].cpu())


# The metric family of each head (`CadMtlTask.metric`) -> what turns its outputs and batches into that metric.
SCORERS = {
    "classification": ClassificationScorer,
    "detection": DetectionScorer,
    "segmentation": SegmentationScorer,
}


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    task: str,
    label_names: list[str],
    *,
    device: torch.device,
    id_prefix: str = "",
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
    description: str = "evaluating",
    class_subset: list[int] | None = None,
) -> MetricsReport:
    """Run `model` on every batch (as `cadmtl.data.pipeline.collate_fn` builds them) and compute the
    task's metrics over all of them. Under `torch.distributed` every rank passes its own shard and gets the same
    report (`compute_detailed` is collective); `model` may be the wrapped (DDP / FSDP) model, see `lockstep`.

    Detection is scored in each image's original pixel frame (`orig_sizes`): boxes are scaled back from the
    network input, so COCO's small / medium / large areas mean what they mean in the dataset. Segmentation is
    scored at the network input resolution the labels were resized to (nearest neighbour).

    `class_subset` (classification only): score the prediction among these model class ids (e.g. one vehicle
    domain's classes when the head covers several domains); the report is then over the subset's classes.
    """
    processor = CadMtlImageProcessor()
    definition = get_cadmtl_task(task)
    if class_subset is not None and not definition.class_candidates:
        raise ValueError("class_subset only applies to classification.")
    scorer = SCORERS[definition.metric](label_names, class_subset, id_prefix)
    was_training = model.training
    model.eval()
    for batch in tqdm(lockstep(batches, device), desc=description, disable=not show_progress, leave=False):
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            # the one inference path (one head: one size group); outputs in float32
            outputs = processor.forward_size_groups(model, [batch], (task,), device=device)
        if batch.get("is_padding"):
            continue
        scorer.update(outputs, batch, processor)
    model.train(was_training)
    return scorer.metric.compute_detailed()


def evaluate_sources(
    model: torch.nn.Module,
    sources: dict[str, list[TaskSource]],
    settings: LoaderSettings,
    labels: dict[str, list[str]],
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    domain_conditioning: bool = True,
) -> dict[str, dict[str, Any]]:
    """Metrics of every config of every task on `settings.split`: {config: {task, split, metrics, report}}.

    Distributed-safe (each rank evaluates its shards, `evaluate_task` runs in lockstep and reduces the metrics).
    With `domain_conditioning`, a classification config is scored among its own classes (see `cls_candidates`
    in the model's forward), as the paper's per-domain Acc@1 / Acc@5 tables are.
    """
    results = {}
    for task, task_sources in sources.items():
        for source in task_sources:
            report = evaluate_task(
                model,
                source_batches(settings, source, batch_size, max_batches),
                task,
                labels[task],
                device=device,
                id_prefix=f"{source.config}/",
                autocast_dtype=autocast_dtype,
                show_progress=show_progress,
                description=f"{settings.split} {source.config}",
                class_subset=(
                    source.model_label_ids
                    if get_cadmtl_task(task).class_candidates and domain_conditioning
                    else None
                ),
            )
            results[source.config] = {
                "task": task,
                "split": settings.split,
                "metrics": report.metrics,
                "report": report.to_dict(),
            }
    return results
