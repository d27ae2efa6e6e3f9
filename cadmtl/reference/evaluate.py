"""`cadmtl reference evaluate`: DifferAD's localisation protocol on ``predictions.jsonl`` against a pairs split.

Per pair (the ground truth is the pair's ``box``, ``[0, 0, 0, 0]`` for a normal pair):

* **IoU**: an anomalous pair scores the IoU of its *first* predicted box (the highest-scoring one; 0 when
  nothing is predicted); a normal pair scores 1 when nothing is predicted and 0 otherwise.
* **decision**: a pair is predicted anomalous when it has a non-zero box (``[0, 0, 0, 0]`` means "no anomaly").
* a **parse failure** (``"parse_ok": false`` on the line, VLM outputs) is wrong on everything: IoU 0, a missed
  anomaly on an anomalous pair, a false alarm on a normal one.

Metrics, all in percent: ``miou`` (mean IoU over all pairs), ``acc@0.3`` / ``acc@0.5`` (share of pairs with IoU >=
0.3 / 0.5), ``f1`` (of the anomalous / normal decision, anomalous = positive), ``normal_accuracy`` (normal pairs
with nothing predicted), ``anomalous_miou`` (mIoU over anomalous pairs only), ``parse_failure_rate`` and, when
``OUT/maps/<pair_id>.npy`` exists for every pair, ``pixel_auroc`` (over every pixel of every query whose mask is
not 255). Reported overall, per category and per misalignment level.

A prediction line holds ``pair_id`` and ``boxes`` (a list of xyxy boxes, best first; a single ``box`` is accepted
too); every pair of the split needs exactly one line.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadmtl.anomaly.metrics import binary_auroc
from dataset_scripts.safe_paths import SafeOutputPaths
from dataset_scripts.schema import IGNORE_INDEX

from .boxes import as_box, box_iou, is_zero_box
from .pairs import load_pairs

METRIC_KEYS = ("miou", "acc@0.3", "acc@0.5", "f1", "normal_accuracy", "anomalous_miou", "parse_failure_rate")
METRIC_TITLES = ("mIoU", "Acc@0.3", "Acc@0.5", "F1", "normal acc.", "anomalous mIoU", "parse fail.")


@dataclass
class ScoredPair:
    """One pair's ground truth and prediction, as the metrics see them."""

    pair_id: str
    true_box: tuple[float, float, float, float]
    has_anomaly: bool
    predicted_boxes: list[tuple[float, float, float, float]]
    parse_ok: bool = True
    category: str = ""
    misalignment: str = ""

    @property
    def predicted_anomalous(self) -> bool:
        return self.parse_ok and bool(self.predicted_boxes)

    @property
    def iou(self) -> float:
        if not self.parse_ok:
            return 0.0
        if not self.has_anomaly:
            return 0.0 if self.predicted_boxes else 1.0
        return box_iou(self.predicted_boxes[0], self.true_box) if self.predicted_boxes else 0.0

    @property
    def decision_correct(self) -> bool:
        return self.parse_ok and self.predicted_anomalous == self.has_anomaly


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def localization_metrics(pairs: Sequence[ScoredPair]) -> dict[str, float]:
    """The protocol's metrics as fractions in [0, 1] (NaN where undefined, e.g. F1 with no positive at all)."""
    ious = [pair.iou for pair in pairs]
    anomalous = [pair for pair in pairs if pair.has_anomaly]
    normal = [pair for pair in pairs if not pair.has_anomaly]
    true_pos = sum(pair.predicted_anomalous for pair in anomalous)
    false_neg = len(anomalous) - true_pos
    # A normal pair is a false alarm when boxes are predicted or its answer could not be parsed.
    false_pos = sum(not pair.decision_correct for pair in normal)
    denominator = 2 * true_pos + false_pos + false_neg
    return {
        "miou": _mean(ious),
        "acc@0.3": _mean([iou >= 0.3 for iou in ious]),
        "acc@0.5": _mean([iou >= 0.5 for iou in ious]),
        "f1": 2 * true_pos / denominator if denominator else math.nan,
        "normal_accuracy": _mean([pair.decision_correct for pair in normal]),
        "anomalous_miou": _mean([pair.iou for pair in anomalous]),
        "parse_failure_rate": _mean([not pair.parse_ok for pair in pairs]),
    }


def pixel_auroc(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> float:
    """Tie-aware AUROC in [0, 1] of map values for mask pixels 1 vs 0 (255 left out); NaN without both kinds."""
    values, labels = [], []
    for anomaly_map, mask in zip(maps, masks):
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"a map of shape {anomaly_map.shape} does not match its mask {mask.shape}")
        keep = mask != IGNORE_INDEX
        values.append(anomaly_map[keep].astype(np.float64).ravel())
        labels.append(mask[keep].ravel() == 1)
    if not values:
        return math.nan
    return binary_auroc(np.concatenate(values), np.concatenate(labels))


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """``pair_id`` -> prediction line; duplicates and lines without ``pair_id`` are errors naming the line."""
    predictions: dict[str, dict[str, Any]] = {}
    with open(path) as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            line = json.loads(text)
            pair_id = line.get("pair_id")
            if pair_id is None:
                raise ValueError(f"{path}:{number}: a prediction line needs a pair_id")
            if pair_id in predictions:
                raise ValueError(f"{path}:{number}: pair {pair_id!r} is predicted twice")
            predictions[str(pair_id)] = line
    return predictions


def predicted_boxes(line: dict[str, Any], where: str) -> list[tuple[float, float, float, float]]:
    """The line's non-zero boxes, in order (a single ``box`` is a one-box list)."""
    boxes = line.get("boxes")
    if boxes is None:
        boxes = [line["box"]] if line.get("box") is not None else []
    try:
        return [as_box(box) for box in boxes if not is_zero_box(box)]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: bad boxes {boxes!r}: {error}") from error


def score_pairs(
    predictions: dict[str, dict[str, Any]], truths: Iterable[Any], where: str
) -> list[ScoredPair]:
    """Join predictions with the pairs' ground truth; a missing or unknown pair id is an error naming it."""
    scored, seen = [], set()
    for truth in truths:
        line = predictions.get(truth.pair_id)
        if line is None:
            raise ValueError(f"{where}: no prediction for pair {truth.pair_id!r}")
        seen.add(truth.pair_id)
        parse_ok = bool(line.get("parse_ok", True))
        scored.append(
            ScoredPair(
                pair_id=truth.pair_id,
                true_box=as_box(truth.box),
                has_anomaly=bool(truth.has_anomaly),
                predicted_boxes=predicted_boxes(line, f"{where} pair {truth.pair_id}") if parse_ok else [],
                parse_ok=parse_ok,
                category=truth.category,
                misalignment=truth.misalignment,
            )
        )
    unknown = sorted(set(predictions) - seen)
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} predictions name pairs not in the split (first: {unknown[0]!r})"
        )
    if not scored:
        raise ValueError(f"{where}: the split has no pair")
    return scored


def _percent(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else round(100.0 * v, 4)) for k, v in metrics.items()}


def _grouped(pairs: Sequence[ScoredPair], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[ScoredPair]] = {}
    for pair in pairs:
        groups.setdefault(getattr(pair, key), []).append(pair)
    return {
        name: {"pairs": len(group), "metrics": _percent(localization_metrics(group))}
        for name, group in sorted(groups.items())
    }


def results_markdown(results: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    header = "| group | pairs | " + " | ".join(METRIC_TITLES) + " |"
    lines = [
        f"# Reference-guided localisation: {results['pairs']} ({results['split']})",
        "",
        f"Predictions: `{results['predictions']}`."
        + (
            f" Pixel AUROC: {cell(results['metrics']['pixel_auroc'])}."
            if "pixel_auroc" in results["metrics"]
            else ""
        ),
        "",
        header,
        "|" + "---|" * (len(METRIC_TITLES) + 2),
    ]
    rows = [("all", results["counts"]["pairs"], results["metrics"])]
    rows += [(f"category {k}", v["pairs"], v["metrics"]) for k, v in results["per_category"].items()]
    rows += [(f"misalignment {k}", v["pairs"], v["metrics"]) for k, v in results["per_misalignment"].items()]
    for name, count, metrics in rows:
        lines.append(f"| {name} | {count} | " + " | ".join(cell(metrics.get(k)) for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def evaluate(output_dir: str | Path, pairs_repo: str, split: str = "test") -> dict[str, Any]:
    """Score ``OUT/predictions.jsonl``; writes ``OUT/eval_results.json`` and ``.md`` and returns the results."""
    output_dir = Path(output_dir)
    path = output_dir / "predictions.jsonl"
    if not path.is_file():
        raise ValueError(
            f"{path} not found: run `cadmtl reference localize` (or write VLM predictions) first"
        )
    truths = list(load_pairs(pairs_repo, split, with_images=False))
    scored = score_pairs(read_predictions(path), truths, str(path))
    metrics = _percent(localization_metrics(scored))
    map_path = SafeOutputPaths(output_dir / "maps", ".npy")  # the names `localize` gave, in the same order
    map_files = [map_path(t.pair_id) for t in truths]
    if map_files and all(file.is_file() for file in map_files):
        auroc = pixel_auroc((np.load(file) for file in map_files), (t.mask for t in truths))
        metrics["pixel_auroc"] = None if math.isnan(auroc) else round(100.0 * auroc, 4)
    results = {
        "pairs": str(pairs_repo),
        "split": split,
        "predictions": str(path),
        "metrics": metrics,
        "counts": {
            "pairs": len(scored),
            "anomalous": sum(p.has_anomaly for p in scored),
            "normal": sum(not p.has_anomaly for p in scored),
            "predicted_anomalous": sum(p.predicted_anomalous for p in scored),
            "parse_failures": sum(not p.parse_ok for p in scored),
        },
        "per_category": _grouped(scored, "category"),
        "per_misalignment": _grouped(scored, "misalignment"),
    }
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "eval_results.md").write_text(results_markdown(results))
    return results


EXAMPLE = "example:\n  cadmtl reference evaluate outputs/reference-tiny data/pairs --split test"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl reference evaluate",
        description="Score OUT/predictions.jsonl with DifferAD's protocol (mIoU, Acc@0.3/0.5, F1, ...).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", type=Path, help="folder holding predictions.jsonl (and maps/)")
    parser.add_argument("pairs", help="the pairs repo the predictions were made on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    results = evaluate(args.output_dir, args.pairs, args.split)
    print(results_markdown(results))
    return 0
