"""The OK / NG verdict of a multi-task model on dataset splits: score the images, calibrate the threshold, report.

Every CAD config has an `is_normal` column. `score_verdict_split` runs the model's heads on the images of some
configs' split, each head at the input size it was trained at (one forward pass per distinct size: the image
processor's `forward_size_groups`, the inference path of `cadmtl predict`), and keeps each image's anomaly score per head and their maximum
(`CadMtlImageProcessor.post_process_anomaly_score`) with its `is_normal` label; distributed-safe like the
evaluation loop (each rank scores its shards in lockstep, the scores are gathered on every rank).
`calibrate_verdict` picks the verdict source with the best image AUROC (ties go to `"max"`) and its threshold
(F1-max, or a target false-positive rate on the normal images), never one that flags every normal image or no
anomalous one, or barely more anomalous than normal ones (F1-max then falls back to the target-FPR rule), and
marks the verdict `"uninformative"` when the score cannot separate the images (AUROC below 0.6 or no separating
threshold); `verdict_metrics` (in `metrics/binary.py`) reports AUROC / F1-max per source and precision / recall /
false-positive rate at the threshold.

Example:

```python
scores = score_verdict_split(model, "data/cad100k-mini", ["exterior_det", "chassis_cls"], "validation",
                             image_sizes=model.config.image_sizes, heads=model.config.verdict_heads,
                             normal_class_id=model.config.normal_class_id)
calibration = calibrate_verdict(scores, method="fpr", target_fpr=0.01)
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cadmtl.data.pipeline import TaskTransform, TransformedStream, decode_rgb, load_split
from cadmtl.evaluation.loop import lockstep
from cadmtl.evaluation.metrics import (
    VERDICT_AUROC_FLOOR,
    VERDICT_CALIBRATIONS,
    calibrate_threshold,
    degenerate_threshold,
    verdict_metrics,
)
from cadmtl.tasks import TASKS
from modeling_cadmtl import CadMtlImageProcessor

logger = logging.getLogger(__name__)

__all__ = ["VerdictScores", "apply_calibration", "calibrate_verdict", "score_verdict_split", "verdict_report"]

VERDICT_COLUMNS = ("image", "image_id", "is_normal")


@dataclass
class VerdictScores:
    """Image-level anomaly scores of a set of images: `scores[source]` (N,) for each head and `"max"`."""

    image_ids: list[str] = field(default_factory=list)
    is_normal: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_normal(self) -> int:
        return int(self.is_normal.sum())

    @property
    def n_anomalous(self) -> int:
        return int((~self.is_normal).sum())

    @classmethod
    def concatenate(cls, parts: Sequence[VerdictScores]) -> VerdictScores:
        sources = [s for s in (*TASKS, "max") if all(s in part.scores for part in parts)]
        return cls(
            image_ids=[i for part in parts for i in part.image_ids],
            is_normal=np.concatenate([part.is_normal for part in parts] or [np.zeros(0, dtype=bool)]),
            scores={s: np.concatenate([part.scores[s] for part in parts]) for s in sources},
        )


# ----------------------------------------------------------------------------------------------------------
# Reading a split: each image once, resized to every head size
# ----------------------------------------------------------------------------------------------------------


def verdict_processor(image_sizes: dict[str, int], heads: Sequence[str]) -> CadMtlImageProcessor:
    """The image processor whose size groups (`CadMtlImageProcessor.size_groups`) are the heads' training sizes."""
    missing = [head for head in heads if head not in image_sizes]
    if missing:
        raise ValueError(f"No input size for the heads {missing}; image_sizes gives {image_sizes}.")
    return CadMtlImageProcessor(task_sizes={head: int(image_sizes[head]) for head in heads})


class VerdictTransform:
    """Decode one example and give the evaluation input at each size (`TaskTransform.eval_pixels`)."""

    def __init__(self, sizes: Iterable[int]) -> None:
        # every task's evaluation transform gives the same `eval_pixels`: any task serves
        self.transforms = {size: TaskTransform(TASKS[0], size, train=False) for size in sizes}

    def __call__(self, example: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if example.get("is_normal") is None:
            raise ValueError(f"{example.get('image_id')}: is_normal is missing (every CAD row needs it)")
        image, _ = decode_rgb(example["image"])
        return {
            "pixel_values": {
                size: transform.eval_pixels(image) for size, transform in self.transforms.items()
            },
            "image_id": example.get("image_id", ""),
            "is_normal": bool(example["is_normal"]),
        }


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": {
            size: torch.stack([item["pixel_values"][size] for item in batch])
            for size in batch[0]["pixel_values"]
        },
        "image_ids": [item["image_id"] for item in batch],
        "is_normal": torch.tensor([item["is_normal"] for item in batch], dtype=torch.bool),
    }


def verdict_batches(
    dataset: str,
    config: str,
    split: str,
    sizes: Iterable[int],
    *,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[dict[str, Any]]:
    """One exact pass over this rank's shards of `config`/`split`: `{"pixel_values": {size: (B, 3, size, size)},
    "image_ids", "is_normal": (B,) bool}` batches."""
    stream = load_split(dataset, config, split, streaming=True)
    missing = [c for c in VERDICT_COLUMNS if c not in (stream.features or {})]
    if missing:
        raise ValueError(f"{dataset} {config}/{split} lacks the columns {missing} the OK / NG verdict needs")
    stream = stream.select_columns(list(VERDICT_COLUMNS)).cast_column("image", datasets.Image(decode=False))
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    loader = DataLoader(
        TransformedStream(stream, VerdictTransform(sizes), infinite=False, batch_size=batch_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    for number, batch in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            break
        yield batch


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_verdict_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    processor: CadMtlImageProcessor,
    heads: Sequence[str],
    *,
    normal_class_id: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
    description: str = "verdict",
) -> VerdictScores:
    """This rank's scores of `batches` (see `verdict_batches`, at the sizes of `processor.size_groups(heads)`);
    `model` may be the wrapped (DDP / FSDP) model."""
    heads = tuple(heads)
    sides = [size["height"] for size, _ in processor.size_groups(heads)]
    ids: list[str] = []
    labels: list[bool] = []
    scores: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    for batch in tqdm(lockstep(batches, device), desc=description, disable=not show_progress, leave=False):
        pixels = batch["pixel_values"]
        inputs = [{"pixel_values": pixels if batch.get("is_padding") else pixels[side]} for side in sides]
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            outputs = processor.forward_size_groups(model, inputs, heads, device=device)
        if batch.get("is_padding"):
            continue
        results = processor.post_process_anomaly_score(
            outputs, source="max", normal_class_id=normal_class_id, heads=heads
        )
        for result in results:
            for head, value in result["head_scores"].items():
                scores.setdefault(head, []).append(value)
            scores.setdefault("max", []).append(result["anomaly_score"])
        ids.extend(batch["image_ids"])
        labels.extend(batch["is_normal"].tolist())
    model.train(was_training)
    return VerdictScores(
        ids, np.asarray(labels, dtype=bool), {s: np.asarray(v, dtype=np.float64) for s, v in scores.items()}
    )


def gather_scores(local: VerdictScores) -> VerdictScores:
    """Every rank's scores on every rank (sorted by image id, so the result does not depend on the sharding);
    the local scores as they are without `torch.distributed`."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = VerdictScores.concatenate(parts)
    order = np.argsort(np.asarray(merged.image_ids, dtype=object), kind="stable")
    return VerdictScores(
        [merged.image_ids[i] for i in order],
        merged.is_normal[order],
        {s: v[order] for s, v in merged.scores.items()},
    )


def score_verdict_split(
    model: torch.nn.Module,
    dataset: str,
    configs: Sequence[str],
    split: str,
    *,
    image_sizes: dict[str, int],
    heads: Sequence[str],
    normal_class_id: int | None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
) -> VerdictScores:
    """The verdict scores of the images of `split` of every config in `configs`, pooled (ids `config/image_id`),
    gathered over ranks. `heads` run at their `image_sizes` entry; `normal_class_id` is the classifier's
    `normal` class (None: the `cls` head gives no score)."""
    device = torch.device(device)
    heads = tuple(t for t in TASKS if t in heads)
    processor = verdict_processor(image_sizes, heads)
    sides = [size["height"] for size, _ in processor.size_groups(heads)]
    parts = []
    for config in configs:
        batches = verdict_batches(
            dataset,
            config,
            split,
            sides,
            batch_size=batch_size,
            num_workers=num_workers,
            rank=rank,
            world_size=world_size,
            max_batches=max_batches,
        )
        part = score_verdict_batches(
            model,
            batches,
            processor,
            heads,
            normal_class_id=normal_class_id,
            device=device,
            autocast_dtype=autocast_dtype,
            show_progress=show_progress,
            description=f"verdict {split} {config}",
        )
        part.image_ids = [f"{config}/{image_id}" for image_id in part.image_ids]
        parts.append(part)
    return gather_scores(VerdictScores.concatenate(parts))


# ----------------------------------------------------------------------------------------------------------
# Calibration and reporting
# ----------------------------------------------------------------------------------------------------------


def calibrate_verdict(
    scores: VerdictScores,
    method: str = "f1_max",
    target_fpr: float = 0.01,
    split: str = "validation",
    auroc_floor: float = VERDICT_AUROC_FLOOR,
) -> dict[str, Any]:
    """Choose the verdict source and threshold on labelled images, and say what the verdict is worth.

    The source is the one with the best image AUROC (a tie with `"max"` goes to `"max"`, other ties to the first
    head in `cls, det, seg` order); the threshold is its F1-max threshold (`method="f1_max"`) or the lowest one
    whose false-positive rate on the normal images is at most `target_fpr` (`method="fpr"`).

    A threshold that flags every normal image or none of the anomalous ones, or whose recall is less than
    `VERDICT_MIN_INFORMEDNESS` (0.1) above its false-positive rate, is never accepted (F1-max does that when most
    images are anomalous: flagging (nearly) everything then has the best F1): F1-max falls back to the target-FPR
    rule (recorded as `"fallback"`). When the best AUROC is below `auroc_floor`
    (`VERDICT_AUROC_FLOOR`, 0.6), or even the target-FPR threshold does not separate, the verdict is
    `"uninformative"`: the target-FPR threshold is still recorded (for the reports and for anyone who overrides
    it) but the model gives no OK / NG by itself (`post_process_verdict`).

    Returns the calibration record stored as the config's `verdict_calibration`: `{"status", "calibrated",
    "method", "split", "source", "threshold", "n_normal", "n_anomalous", "auroc", "aurocs", "f1", "precision",
    "recall", "fpr"}` (+ `"target_fpr"` for the target-FPR rule, `"requested_method"` / `"fallback"` after a
    fallback, `"reason"` unless calibrated). `status` is `"calibrated"`, `"uninformative"` or `"default"` (the images
    lack normal or anomalous examples, or no head gives a score: no source or threshold, the defaults stay).
    """
    if method not in VERDICT_CALIBRATIONS:
        raise ValueError(f"Unknown verdict calibration {method!r}; expected one of {VERDICT_CALIBRATIONS}.")
    record: dict[str, Any] = {
        "method": method,
        "split": split,
        "n_normal": scores.n_normal,
        "n_anomalous": scores.n_anomalous,
    }
    if method == "fpr":
        record["target_fpr"] = target_fpr
    reason = None
    if not scores.scores:
        reason = "no head gives an anomaly score (no trained det / seg head, and no classifier with a normal class)"
    elif scores.n_normal == 0 or scores.n_anomalous == 0:
        reason = (
            f"the {split} images hold {scores.n_normal} normal and {scores.n_anomalous} anomalous images: "
            "calibration needs both"
        )
    if reason is not None:
        return {"status": "default", "calibrated": False, "reason": reason, **record}
    metrics = verdict_metrics(scores.scores, scores.is_normal)
    aurocs = {source: values["auroc"] for source, values in metrics["sources"].items()}
    best = max(aurocs.values())
    tied = [source for source in ("max", *TASKS) if source in aurocs and aurocs[source] >= best - 1e-12]
    source = tied[0]
    values, anomalous = scores.scores[source], ~scores.is_normal

    def fpr_rule() -> float:
        record.update(method="fpr", target_fpr=target_fpr)
        return calibrate_threshold(values, anomalous, "fpr", target_fpr)

    if aurocs[source] < auroc_floor:
        threshold = fpr_rule()
        reason = (
            f"the best image AUROC on the {split} images ({source}: {aurocs[source]:.3f}) is below {auroc_floor}: "
            "the anomaly score does not separate normal from anomalous images"
        )
    else:
        threshold = calibrate_threshold(values, anomalous, method, target_fpr)
        reason = degenerate_threshold(values, anomalous, threshold)
        if reason is not None and method != "fpr":
            record.update(
                requested_method=method,
                fallback=f"{method} rejected ({reason}); the target false-positive rate {target_fpr} is used",
            )
            threshold = fpr_rule()
            reason = degenerate_threshold(values, anomalous, threshold)
        if reason is not None:
            reason = f"on the {split} images {reason}: no threshold on the {source} score separates them"
    status = "calibrated" if reason is None else "uninformative"
    at = verdict_metrics(scores.scores, scores.is_normal, threshold, source)["at_threshold"]
    return {
        "status": status,
        "calibrated": status == "calibrated",
        **record,
        "source": source,
        "threshold": threshold,
        "auroc": aurocs[source],
        "aurocs": aurocs,
        **{key: at[key] for key in ("f1", "precision", "recall", "fpr")},
        **({"reason": reason} if reason is not None else {}),
    }


def apply_calibration(config: Any, calibration: dict[str, Any]) -> bool:
    """Store a calibration record in a model config: always its `verdict_status`, `verdict_reason` and
    `verdict_calibration`; its `verdict_source` / `verdict_threshold` when it chose them (status `"calibrated"`
    or `"uninformative"`; a `"default"` record leaves the documented defaults). Returns whether a source and
    threshold were stored."""
    config.verdict_status = calibration.get("status") or (
        "calibrated" if calibration.get("calibrated") else "default"
    )
    config.verdict_reason = calibration.get("reason")
    config.verdict_calibration = dict(calibration)
    if calibration.get("threshold") is None:
        return False
    config.verdict_source = calibration["source"]
    config.verdict_threshold = float(calibration["threshold"])
    return True


def verdict_report(scores: VerdictScores, source: str, threshold: float, split: str) -> dict[str, Any]:
    """`verdict_metrics` of `scores` at the model's source and threshold, with the split's name."""
    if source not in scores.scores:
        available = sorted(scores.scores)
        raise ValueError(
            f"The verdict reads the {source!r} score, but the model's heads give only {available}."
        )
    return {"split": split, **verdict_metrics(scores.scores, scores.is_normal, threshold, source)}


def verdict_table(reports: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of verdict reports (one row per split): counts, AUROC / F1-max of the chosen source and
    precision / recall / FPR at its threshold, in percent."""
    lines = [
        "| split | source | threshold | normal | anomalous | AUROC | F1-max | precision | recall | FPR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: float) -> str:
        return "-" if value is None or value != value else f"{100 * value:.1f}"

    for split, report in reports.items():
        at = report["at_threshold"]
        source = report["sources"][at["source"]]
        lines.append(
            f"| {split} | {at['source']} | {at['threshold']:.4g} | {report['n_normal']} | {report['n_anomalous']} | "
            f"{cell(source['auroc'])} | {cell(source['f1_max'])} | {cell(at['precision'])} | "
            f"{cell(at['recall'])} | {cell(at['fpr'])} |"
        )
    return "\n".join(lines)
