"""Charts of an evaluation run: confusion matrices, per-class bars and detection curves of `MetricsReport.to_dict()`
reports.

[`plot_confusion_matrix`] and [`plot_per_class`] draw one report; for detection, [`plot_pr_curve`],
[`plot_confidence_curve`] and [`plot_detection_confusion_matrix`] draw its `analysis` (Ultralytics' PR_curve,
F1_curve / P_curve / R_curve and confusion_matrix charts); [`plot_evaluation`] draws them all for every config of an
`eval_results.json`:

```python
from cadmtl.pictures.charts import plot_evaluation

plot_evaluation("outputs/run/eval_results.json", "outputs/run/charts")
```
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cadmtl.tasks import CADMTL_TASKS
from dataset_scripts.safe_paths import safe_file_name

logger = logging.getLogger(__name__)

__all__ = [
    "fold_confusion_matrix",
    "normalized_confusion_matrix",
    "per_class_rows",
    "plot_confidence_curve",
    "plot_confusion_matrix",
    "plot_detection_confusion_matrix",
    "plot_evaluation",
    "plot_per_class",
    "plot_pr_curve",
]

# ----------------------------------------------------------------------------------------------------------
# Evaluation charts
# ----------------------------------------------------------------------------------------------------------

# (per-class metric, the count shown next to it) per task, in the order a report is recognised
_PER_CLASS_DEFAULTS = {name: task.per_class_chart for name, task in CADMTL_TASKS.items()}
_COUNT_KEYS = ("support", "num_ground_truth", "gt_pixels")
_BAR_COLOR = "#0072B2"  # Okabe-Ito blue
_MAX_ANNOTATED_CLASSES = 20


def _save(figure: Any, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path` (its folder created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def normalized_confusion_matrix(matrix: Any, normalize: bool = True) -> np.ndarray:
    """A confusion matrix (rows = ground truth) as floats, each row divided by its sum when `normalize`.

    A row without samples has no rate: it becomes NaN (drawn blank), not 0.

    Raises:
        ValueError: the matrix is not square, or holds negative or non-finite values.
    """
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("confusion matrix must hold finite, non-negative counts")
    if not normalize:
        return values
    totals = values.sum(axis=1, keepdims=True)
    rates = np.full_like(values, np.nan)
    np.divide(values, totals, out=rates, where=totals > 0)
    return rates


def fold_confusion_matrix(
    matrix: Any, label_names: Sequence[str], max_classes: int, keep: Sequence[int] = ()
) -> tuple[np.ndarray, list[str]]:
    """Keep the `max_classes - 1` busiest classes of a big confusion matrix and sum the rest into one "other".

    Busiest = most samples in the ground truth plus the predictions; the classes in `keep` (e.g. detection's
    background) are always kept; the kept classes stay in id order and every count is preserved (the folded row
    and column hold the sums). A matrix with at most `max_classes` classes is returned unchanged.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    names = list(label_names)
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix has shape {counts.shape} but there are {len(names)} label names")
    if max_classes < 2:
        raise ValueError(f"max_classes must be >= 2, got {max_classes}")
    if len(names) <= max_classes:
        return counts, names
    activity = (counts.sum(axis=0) + counts.sum(axis=1)).astype(np.float64)
    activity[list(keep)] = np.inf
    kept = np.sort(np.argsort(-activity, kind="stable")[: max_classes - 1])
    groups = np.full(len(names), len(kept))
    groups[kept] = np.arange(len(kept))
    folded = np.zeros((len(kept) + 1, len(kept) + 1), dtype=np.int64)
    np.add.at(folded, (groups[:, None], groups[None, :]), counts)
    return folded, [names[index] for index in kept] + [f"other ({len(names) - len(kept)} classes)"]


def _figure(width: float, height: float) -> Any:
    # An Agg Figure without pyplot: no global state, safe in threads and on machines without a display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _check_report(report: Mapping[str, Any], what: str) -> None:
    if not isinstance(report, Mapping) or "per_class" not in report:
        found = sorted(report) if isinstance(report, Mapping) else type(report).__name__
        raise ValueError(
            f"{what}: expected a MetricsReport.to_dict() with 'per_class' (and 'label_names', "
            f"'confusion_matrix'), got {found}"
        )


def plot_confusion_matrix(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    normalize: bool = True,
    max_classes: int = 50,
    *,
    title: str | None = None,
    subtitle: str | None = None,
) -> Path:
    """Draw the confusion matrix of a classification or segmentation report as a PNG.

    Rows are ground truth, columns predictions, each row normalised to rates when `normalize`; the y labels show
    each class's sample count. Up to 20 classes every non-zero cell also shows its rate and count. Above
    `max_classes` the quietest classes are folded into one "other" class (see [`fold_confusion_matrix`]).

    Raises:
        ValueError: the report has no confusion matrix (detection) or it does not match its label names.
    """
    _check_report(report, "plot_confusion_matrix")
    if report.get("confusion_matrix") is None:
        raise ValueError(
            "plot_confusion_matrix: the report has no confusion matrix (detection reports have none)"
        )
    counts, names = fold_confusion_matrix(
        report["confusion_matrix"], report.get("label_names", []), max_classes
    )
    normalized_confusion_matrix(counts, normalize=False)  # validates shape and values
    shown = normalized_confusion_matrix(counts, normalize)
    support = counts.sum(axis=1)
    size = len(names)
    side = float(np.clip(0.32 * size + 3.0, 5.0, 30.0))
    figure = _figure(side + 1.2, side)
    axis = figure.add_subplot()
    import matplotlib

    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # rows without samples
    image = axis.imshow(
        np.ma.masked_invalid(shown), cmap=colormap, vmin=0.0, vmax=1.0 if normalize else None, aspect="equal"
    )
    figure.colorbar(
        image, ax=axis, shrink=0.8, label="fraction of the true class" if normalize else "samples"
    )
    tick_font = 9 if size <= 30 else 7
    axis.set_xticks(range(size), names, rotation=90, fontsize=tick_font)
    axis.set_yticks(
        range(size), [f"{name} (n={count})" for name, count in zip(names, support)], fontsize=tick_font
    )
    axis.set_xlabel("predicted class")
    axis.set_ylabel("ground-truth class")
    if size <= _MAX_ANNOTATED_CLASSES:
        for row in range(size):
            for column in range(size):
                if counts[row, column] == 0:
                    continue
                text = (
                    f"{100 * shown[row, column]:.0f}%\n{counts[row, column]}"
                    if normalize
                    else f"{counts[row, column]}"
                )
                level = shown[row, column] / (1.0 if normalize else max(shown.max(), 1))
                axis.text(
                    column, row, text, ha="center", va="center", fontsize=8,
                    color="black" if level > 0.6 else "white",
                )  # fmt: skip
    heading = "confusion matrix" + (" (row-normalised)" if normalize else "")
    heading = f"{title}: {heading}" if title else heading
    axis.set_title(f"{heading}\n{subtitle}" if subtitle else heading)
    return _save(figure, path)


def _per_class_metric(report: Mapping[str, Any], metric: str | None) -> tuple[str, str | None]:
    rows = list(report["per_class"].values())
    keys = {key for row in rows for key in row}
    if metric is None:
        for default_metric, count_key in _PER_CLASS_DEFAULTS.values():
            if default_metric in keys:
                return default_metric, count_key
        raise ValueError(
            f"plot_per_class: cannot tell the task of the report (per-class keys {sorted(keys)}); pass metric="
        )
    if metric not in keys:
        numeric = sorted(
            key
            for key in keys
            if any(isinstance(row.get(key), float) for row in rows) and key not in _COUNT_KEYS
        )
        raise ValueError(f"plot_per_class: no per-class '{metric}' in the report; available: {numeric}")
    return metric, next((key for key in _COUNT_KEYS if key in keys), None)


def per_class_rows(
    report: Mapping[str, Any], metric: str | None = None
) -> tuple[str, str | None, list[tuple[str, float | None, int | None]]]:
    """The rows [`plot_per_class`] draws: `(metric, count key, [(class name, value or None, count), ...])`.

    Classes with a value come first, best first (ties keep the report's order); classes whose value is
    undefined (None / NaN: no samples) follow in report order with `None`. See [`plot_per_class`] for `metric`.
    """
    _check_report(report, "plot_per_class")
    if not report["per_class"]:
        raise ValueError("plot_per_class: the report has no per-class rows")
    metric, count_key = _per_class_metric(report, metric)
    rows = []
    for name, row in report["per_class"].items():
        value = row.get(metric)
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        rows.append((name, value, row.get(count_key) if count_key else None))
    defined = sorted((row for row in rows if row[1] is not None), key=lambda row: -row[1])
    return metric, count_key, defined + [row for row in rows if row[1] is None]


def plot_per_class(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    metric: str | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Draw a horizontal bar chart of one per-class metric of a report, best class on top, as a PNG.

    `metric` defaults to the task's headline per-class value: classification `acc@1`, detection `AP`,
    segmentation `IoU`. Each bar is labelled with its percentage and the class's count (samples, ground-truth
    boxes or ground-truth pixels); classes where the metric is undefined (no samples) are listed at the bottom as
    "n/a" rather than dropped. A dashed line marks the mean over the classes that have a value.

    Raises:
        ValueError: the report has no per-class rows, or not the requested metric.
    """
    metric, count_key, ordered = per_class_rows(report, metric)
    defined = [row for row in ordered if row[1] is not None]

    figure = _figure(9.0, float(np.clip(0.26 * len(ordered) + 1.6, 3.0, 60.0)))
    axis = figure.add_subplot()
    positions = np.arange(len(ordered))
    values = [100.0 * value if value is not None else 0.0 for _, value, _ in ordered]
    axis.barh(positions, values, color=_BAR_COLOR, height=0.7)
    axis.set_yticks(positions, [name for name, _, _ in ordered], fontsize=9 if len(ordered) <= 40 else 7)
    axis.invert_yaxis()
    axis.set_xlim(0, 118)  # room for the value labels right of a 100% bar
    axis.set_xticks(range(0, 101, 20))
    axis.set_xlabel(f"{metric} (%)")
    count_name = {"support": "n", "num_ground_truth": "boxes", "gt_pixels": "px"}.get(count_key, "n")
    for position, (_, value, count) in zip(positions, ordered):
        shown = f"{100.0 * value:.1f}%" if value is not None else "n/a"
        if count is not None:
            shown += f" ({count_name}={count})"
        axis.text(
            (100.0 * value if value is not None else 0.0) + 1.0, position, shown, va="center", fontsize=8
        )
    if defined:
        mean = 100.0 * float(np.mean([value for _, value, _ in defined]))
        axis.axvline(mean, color="#D55E00", linestyle="--", linewidth=1.2, label=f"class mean {mean:.1f}%")
        axis.legend(loc="lower right", fontsize=8)
    heading = f"per-class {metric}"
    axis.set_title(f"{title}: {heading}" if title else heading)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------------------
# Detection curves and confusion matrix (a detection report's `analysis`)
# ----------------------------------------------------------------------------------------------------------

_ALL_CLASSES_COLOR = "#0072B2"  # Okabe-Ito blue
_MARK_COLOR = "#D55E00"  # Okabe-Ito vermillion
_CURVE_NAMES = {"F1": "F1", "precision": "precision", "recall": "recall"}


def _analysis(report: Mapping[str, Any], what: str, *keys: str) -> Mapping[str, Any]:
    """A detection report's `analysis`, or a ValueError saying the report predates it."""
    _check_report(report, what)
    analysis = report.get("analysis")
    if not isinstance(analysis, Mapping) or any(analysis.get(key) is None for key in keys):
        raise ValueError(
            f"{what}: the report has no detection {', '.join(keys)} (not a detection report, or written before "
            "DetectionMetrics recorded them: evaluate again to get them)"
        )
    return analysis


def _curve_values(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if value is None else value for value in values], dtype=np.float64)


def _legend_outside(axis: Any, entries: int) -> None:
    axis.legend(
        loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8 if entries <= 12 else 7, frameon=False
    )


def plot_pr_curve(report: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw a detection report's precision-recall curves at IoU 0.5 as a PNG (Ultralytics' `PR_curve.png`).

    One thin line per class with ground truth, labelled with its AP50 (up to 20 classes; more are drawn grey and
    unlabelled), and the all-classes mean in bold, labelled with mAP@0.5. The curves are COCOeval's interpolated
    precision on its 101 recall points, so each curve's mean is its AP50.

    Raises:
        ValueError: the report has no `analysis` with a precision-recall curve (older or non-detection report).
    """
    analysis = _analysis(report, "plot_pr_curve", "pr_curve", "recall_grid")
    recall = np.asarray(analysis["recall_grid"], dtype=np.float64)
    per_class = analysis["pr_curve"].get("per_class") or {}
    rows = report.get("per_class", {})
    figure = _figure(9.0, 6.0)
    axis = figure.add_subplot()
    labelled = len(per_class) <= _MAX_ANNOTATED_CLASSES
    for name, values in per_class.items():
        precision = _curve_values(values)
        ap50 = rows.get(name, {}).get("AP50")
        ap50 = float(np.nanmean(precision)) if ap50 is None else float(ap50)
        if labelled:
            axis.plot(recall, precision, linewidth=1.0, label=f"{name} {ap50:.3f}")
        else:
            axis.plot(recall, precision, linewidth=0.8, color="grey", alpha=0.6)
    if analysis["pr_curve"].get("all") is not None:
        mean = _curve_values(analysis["pr_curve"]["all"])
        map50 = report.get("metrics", {}).get("AP50")
        map50 = float(np.nanmean(mean)) if map50 is None else float(map50)
        axis.plot(
            recall, mean, linewidth=3.0, color=_ALL_CLASSES_COLOR, label=f"all classes {map50:.3f} mAP@0.5"
        )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    if axis.get_legend_handles_labels()[0]:
        _legend_outside(axis, len(per_class) + 1)
    heading = f"precision-recall (IoU {analysis.get('iou_threshold', 0.5):g})"
    axis.set_title(f"{title}: {heading}" if title else heading)
    return _save(figure, path)


def plot_confidence_curve(
    report: Mapping[str, Any], path: str | os.PathLike, curve: str = "F1", *, title: str | None = None
) -> Path:
    """Draw F1, precision or recall against the confidence threshold as a PNG (Ultralytics' `F1_curve.png`...).

    One thin line per class with ground truth (labelled up to 20 classes), the all-classes mean in bold; a dotted
    line marks the report's score threshold (the operating point of its per-class precision / recall). On the F1
    chart the best all-classes F1 is marked and its value and confidence are in the legend.

    Args:
        curve: `"F1"`, `"precision"` or `"recall"`.

    Raises:
        ValueError: unknown `curve`, or the report has no confidence curves (older or non-detection report).
    """
    if curve not in _CURVE_NAMES:
        raise ValueError(f"plot_confidence_curve: curve must be one of {sorted(_CURVE_NAMES)}, got {curve!r}")
    analysis = _analysis(report, "plot_confidence_curve", "confidence_curves", "confidence_grid")
    confidence = np.asarray(analysis["confidence_grid"], dtype=np.float64)
    per_class = analysis["confidence_curves"].get("per_class") or {}
    figure = _figure(9.0, 6.0)
    axis = figure.add_subplot()
    labelled = len(per_class) <= _MAX_ANNOTATED_CLASSES
    for name, curves in per_class.items():
        values = _curve_values(curves[curve])
        if labelled:
            axis.plot(confidence, values, linewidth=1.0, label=name)
        else:
            axis.plot(confidence, values, linewidth=0.8, color="grey", alpha=0.6)
    every = analysis["confidence_curves"].get("all")
    if every is not None:
        mean = _curve_values(every[curve])
        if curve == "F1" and np.isfinite(mean).any():
            best = int(np.nanargmax(mean))
            label = f"all classes {mean[best]:.2f} at {confidence[best]:.2f}"
            axis.plot(confidence, mean, linewidth=3.0, color=_ALL_CLASSES_COLOR, label=label)
            axis.plot(confidence[best], mean[best], marker="*", markersize=14, color=_MARK_COLOR, zorder=5)
        else:
            axis.plot(confidence, mean, linewidth=3.0, color=_ALL_CLASSES_COLOR, label="all classes")
    threshold = analysis.get("score_threshold")
    if threshold is not None:
        axis.axvline(
            threshold, color="black", linestyle=":", linewidth=1.2, label=f"score threshold {threshold:g}"
        )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence")
    axis.set_ylabel(_CURVE_NAMES[curve])
    _legend_outside(axis, len(per_class) + 2)
    heading = f"{_CURVE_NAMES[curve]}-confidence (IoU {analysis.get('iou_threshold', 0.5):g})"
    axis.set_title(f"{title}: {heading}" if title else heading)
    return _save(figure, path)


def plot_detection_confusion_matrix(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    normalize: bool = True,
    max_classes: int = 50,
    *,
    title: str | None = None,
) -> Path:
    """Draw a detection report's confusion matrix (classes + background) as a PNG, as [`plot_confusion_matrix`].

    Rows are ground truth, columns predictions; the background row holds the detections that matched no box, the
    background column the boxes nobody found (Ultralytics' matching at IoU 0.5 above the report's score
    threshold). Background is never folded into "other".

    Raises:
        ValueError: the report has no detection confusion matrix (older or non-detection report).
    """
    analysis = _analysis(report, "plot_detection_confusion_matrix", "confusion_matrix")
    matrix = analysis["confusion_matrix"]
    labels = list(matrix["labels"])
    counts, names = fold_confusion_matrix(matrix["matrix"], labels, max_classes, keep=[len(labels) - 1])
    subtitle = (
        f"detections matched at IoU >= {analysis.get('iou_threshold', 0.5):g}, score > "
        f"{analysis.get('score_threshold'):g}; background = unmatched"
    )
    return plot_confusion_matrix(
        {"per_class": {}, "label_names": names, "confusion_matrix": counts},
        path,
        normalize,
        max_classes=len(names),
        title=title,
        subtitle=subtitle,
    )


def plot_evaluation(eval_results_json: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
    """Every chart of every config of an eval results file.

    `eval_results_json` is what `train_accelerate.py` and the evaluation command write: `{"results": {config:
    {"task", "split", "metrics", "report"}}}`. Writes into `output_dir`, per config:

    * `<config>_per_class.png`: the per-class bars (accuracy, AP, IoU);
    * `<config>_confusion_matrix.png`: the row-normalised confusion matrix (classification, segmentation, and
      detection with its background row and column);
    * detection only: `<config>_confusion_matrix_counts.png` (the same matrix in counts), `<config>_pr_curve.png`
      (precision-recall per class and for all classes, mAP@0.5 in the legend), `<config>_f1_curve.png` (F1
      against confidence, the best F1 marked), `<config>_p_curve.png` and `<config>_r_curve.png` (precision and
      recall against confidence).

    Returns the paths written. Configs without a report are skipped with a warning, and so are the detection
    charts of reports written before detection curves were recorded (the warning counts and names them).

    Raises:
        FileNotFoundError / ValueError: the file is missing, is not JSON, or holds no plottable result.
    """
    source = Path(eval_results_json)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"plot_evaluation: {source} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"plot_evaluation: {source} is not valid JSON ({error})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise ValueError(f"plot_evaluation: {source} has no 'results' mapping of config -> result")
    output_dir = Path(output_dir)
    written: list[Path] = []
    skipped: list[str] = []
    without_curves: list[str] = []
    detection_configs = 0
    stems: set[str] = set()
    for config, result in tqdm(results.items(), desc="plotting evaluation", unit="config"):
        report = result.get("report") if isinstance(result, dict) else None
        if not isinstance(report, dict) or not report.get("per_class"):
            skipped.append(config)
            continue
        stem = safe_file_name(config)  # config names come from the results file: one name inside output_dir
        while stem.casefold() in stems:
            stem += "_"
        stems.add(stem.casefold())
        task = result.get("task")
        split = result.get("split")
        title = f"{config} ({split})" if split and f"@{split}" not in config else config
        metric = _PER_CLASS_DEFAULTS[task][0] if task in _PER_CLASS_DEFAULTS else None
        try:
            written.append(plot_per_class(report, output_dir / f"{stem}_per_class.png", metric, title=title))
            if report.get("confusion_matrix") is not None:
                written.append(
                    plot_confusion_matrix(report, output_dir / f"{stem}_confusion_matrix.png", title=title)
                )
            if task in CADMTL_TASKS and CADMTL_TASKS[task].analysis_charts:
                detection_configs += 1
                written.extend(
                    _plot_detection_analysis(report, output_dir, stem, title, config, without_curves)
                )
        except ValueError as error:
            raise ValueError(f"plot_evaluation: {source}, config {config!r}: {error}") from None
    if skipped:
        logger.warning(
            "plot_evaluation: %d of %d configs in %s have no per-class report and were not plotted: %s",
            len(skipped),
            len(results),
            source,
            ", ".join(skipped),
        )
    if without_curves:
        logger.warning(
            "plot_evaluation: %d of %d detection configs in %s have no precision-recall / confidence curves or "
            "detection confusion matrix (written before they were recorded; evaluate again to get them), so "
            "those charts were not drawn: %s",
            len(without_curves),
            detection_configs,
            source,
            ", ".join(without_curves),
        )
    if not written:
        raise ValueError(f"plot_evaluation: no config in {source} has a per-class report to plot")
    return written


def _plot_detection_analysis(
    report: Mapping[str, Any], output_dir: Path, stem: str, title: str, config: str, without_curves: list[str]
) -> list[Path]:
    analysis = report.get("analysis")
    if not isinstance(analysis, Mapping) or not analysis.get("confidence_curves"):
        without_curves.append(config)
        return []
    return [
        plot_detection_confusion_matrix(report, output_dir / f"{stem}_confusion_matrix.png", title=title),
        plot_detection_confusion_matrix(
            report, output_dir / f"{stem}_confusion_matrix_counts.png", normalize=False, title=title
        ),
        plot_pr_curve(report, output_dir / f"{stem}_pr_curve.png", title=title),
        plot_confidence_curve(report, output_dir / f"{stem}_f1_curve.png", "F1", title=title),
        plot_confidence_curve(report, output_dir / f"{stem}_p_curve.png", "precision", title=title),
        plot_confidence_curve(report, output_dir / f"{stem}_r_curve.png", "recall", title=title),
    ]
