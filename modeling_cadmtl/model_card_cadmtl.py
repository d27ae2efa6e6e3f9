"""Renders the Hub README.md of a CadMtl checkpoint from the `model_card.md` template.

The template uses `string.Template` placeholders (`$name` / `${name}`); the YAML metadata block (library,
pipeline tag, licence, tags, datasets, base model and the `model-index` of evaluation results) is generated here
with `huggingface_hub.ModelCardData`, so it is always valid YAML the Hub understands.
"""

from __future__ import annotations

import json
import logging
import os
import string
from pathlib import Path
from typing import Any

from .tasks_cadmtl import TASK_DEFINITIONS

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card.md"
DINOV3_LICENSE_LINK = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
# (Hub pipeline tag, task name) and the metrics shown per task, in the order of the paper's tables.
TASK_TYPES = {name: (task.pipeline_task, task.title) for name, task in TASK_DEFINITIONS.items()}
TASK_METRICS = {name: task.card_metrics for name, task in TASK_DEFINITIONS.items()}


def find_template() -> Path | None:
    """`model_card.md` shipped in the package (wheel) or at the repository root (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / TEMPLATE_NAME, here.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    return None


def _task_of(config_name: str) -> str | None:
    suffix = config_name.rsplit("_", 1)[-1]
    return suffix if suffix in TASK_TYPES else None


def metadata_yaml(config: Any, data: dict[str, Any]) -> str:
    """The YAML front matter (without the `---` fences)."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    for dataset_config, result in sorted((data.get("results") or {}).items()):
        task = result.get("task") or _task_of(dataset_config)
        if task not in TASK_TYPES:
            continue
        for metric in TASK_METRICS[task]:
            value = result.get("metrics", {}).get(metric)
            if value is None or value != value:  # absent or NaN
                continue
            eval_results.append(
                EvalResult(
                    task_type=TASK_TYPES[task][0],
                    task_name=TASK_TYPES[task][1],
                    dataset_type=data.get("dataset_id") or "unknown",
                    dataset_name=data.get("dataset_name") or data.get("dataset_id") or "unknown",
                    dataset_config=dataset_config,
                    dataset_split=result.get("split", "test"),
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=round(100 * float(value), 2),
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=data.get("pipeline_tag", "object-detection"),
        license="other",
        license_name="dinov3-license",
        license_link=DINOV3_LICENSE_LINK,
        tags=[
            "cad-mtl",
            "dinov3",
            "multi-task-learning",
            "anomaly-detection",
            "automotive",
            "image-classification",
            "object-detection",
            "image-segmentation",
            "custom_code",
        ],
        datasets=list(data.get("datasets") or []) or None,
        base_model=data.get("base_model"),
        model_name=data.get("model_name", "CadMtl"),
        eval_results=eval_results or None,
    )
    return card_data.to_yaml()


def _label_table(config: Any) -> str:
    rows = ["| task | classes |", "|---|---|"]
    for task, definition in TASK_DEFINITIONS.items():
        name = definition.result_key
        labels = config.labels_for(task)
        shown = ", ".join(f"`{label}`" for label in labels[:40])
        more = f" ... ({len(labels)} in all)" if len(labels) > 40 else f" ({len(labels)})"
        rows.append(f"| {name} | {shown}{more} |")
    return "\n".join(rows)


def _results_tables(results: dict[str, Any]) -> str:
    if not results:
        return "_No evaluation results were attached when this card was written._"
    blocks = []
    for task in TASK_DEFINITIONS:
        rows = {name: r for name, r in results.items() if (r.get("task") or _task_of(name)) == task}
        if not rows:
            continue
        metrics = TASK_METRICS[task]
        lines = [
            f"**{TASK_TYPES[task][1]}**",
            "",
            "| config | split | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for name, result in sorted(rows.items()):
            values = []
            for metric in metrics:
                value = result.get("metrics", {}).get(metric)
                values.append("-" if value is None or value != value else f"{100 * value:.2f}")
            lines.append(f"| {name} | {result.get('split', 'test')} | " + " | ".join(values) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\nValues are percentages."


def _percent(value: Any) -> str:
    return "-" if value is None or value != value else f"{100 * float(value):.1f}"


def _verdict_section(config: Any, verdict: dict[str, Any] | None) -> str:
    """How this checkpoint decides OK / NG (from its config) and, when the run measured it, the verdict's metrics
    per split (`verdict["splits"]`, as `cadmtl.evaluation.verdict.verdict_report` gives them)."""
    source, threshold = config.verdict_source, config.verdict_threshold
    calibration = config.verdict_calibration or {}
    status = getattr(
        config, "verdict_status", "calibrated" if calibration.get("calibrated") else "uncalibrated"
    )
    reason = getattr(config, "verdict_reason", None) or calibration.get("reason")
    reason = reason or ((verdict or {}).get("calibration") or {}).get("reason")
    how = f"on the {calibration.get('split')} images by {calibration.get('method')}"
    if calibration.get("method") == "fpr":
        how += f" (target false-positive rate {calibration.get('target_fpr')})"
    how += f", {calibration.get('n_normal')} normal and {calibration.get('n_anomalous')} anomalous images"
    if status == "uninformative":
        lines = [
            f"**Verdict status: uninformative.** This checkpoint gives anomaly scores but **no OK / NG verdict**: "
            f"{reason}. The threshold recorded for reference is {threshold:.4g} on `{source}` ({how}); pass a "
            "threshold explicitly to get OK / NG anyway.",
        ]
    else:
        if status == "calibrated":
            how = "calibrated " + how
            if calibration.get("fallback"):
                how += f"; {calibration['fallback']}"
        else:
            how = f"verdict status: {status}, the documented default" + (f": {reason}" if reason else "")
        lines = [
            f"**Verdict status: {status}.** An image is **NG** when its anomaly score from `{source}` is at least "
            f"**{threshold:.4g}** ({how}); `config.verdict_source` / `config.verdict_threshold` hold the setting.",
        ]
    splits = (verdict or {}).get("splits") or {}
    if splits:
        lines += [
            "",
            "| split | normal | anomalous | image AUROC | F1-max | precision | recall | false-positive rate |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for split, report in splits.items():
            at = report.get("at_threshold") or {}
            chosen = (report.get("sources") or {}).get(at.get("source"), {})
            lines.append(
                f"| {split} | {report.get('n_normal')} | {report.get('n_anomalous')} | {_percent(chosen.get('auroc'))} "
                f"| {_percent(chosen.get('f1_max'))} | {_percent(at.get('precision'))} | {_percent(at.get('recall'))} "
                f"| {_percent(at.get('fpr'))} |"
            )
        lines += [
            "",
            "Values are percentages; precision, recall and false-positive rate are at the threshold.",
        ]
    return "\n".join(lines)


def _backbone_description(config: Any) -> str:
    backbone = config.backbone_config
    if config.is_vit:
        return (
            f"DINOv3 ViT (patch {backbone.patch_size}, hidden size {backbone.hidden_size}, "
            f"{backbone.num_hidden_layers} layers, {backbone.num_register_tokens} register tokens); the heads read "
            f"layers {backbone.out_indices}"
        )
    if backbone.model_type == "timm_backbone":
        return (
            f"timm `{backbone.backbone}` (feature levels {list(backbone.out_indices)} at strides 8 / 16 / 32)"
        )
    return f"DINOv3 ConvNeXt (hidden sizes {list(backbone.hidden_sizes)}, depths {list(backbone.depths)})"


def render_model_card(config: Any, data: dict[str, Any] | None = None, template: str | None = None) -> str:
    """The README.md text for a checkpoint with `config`, filled with `data` (results, training, ...)."""
    data = dict(data or {})
    if template is None:
        path = find_template()
        template = path.read_text(encoding="utf-8") if path else "# $model_name\n\n$results_tables\n"
    training = data.get("training") or {}
    values = {
        "model_name": data.get("model_name", "CadMtl"),
        "repo_id": data.get("repo_id", "cad-mtl/dinov3-b-adaptive"),
        "base_model": data.get("base_model") or "a randomly initialised DINOv3 backbone",
        "backbone": _backbone_description(config),
        "label_table": _label_table(config),
        "results_tables": _results_tables(data.get("results") or {}),
        "verdict_section": _verdict_section(config, data.get("verdict")),
        "comparison_table": data.get("comparison_table") or "_Not run for this checkpoint._",
        "training_data": data.get("training_data") or "_Not recorded._",
        "training_settings": "```json\n"
        + json.dumps(training, indent=2, sort_keys=True, default=str)
        + "\n```"
        if training
        else "_Not recorded._",
    }
    body = string.Template(template).safe_substitute(values)
    return f"---\n{metadata_yaml(config, data)}\n---\n\n{body.lstrip()}"


def write_model_card(
    save_directory: str | os.PathLike, config: Any, data: dict[str, Any] | None = None
) -> None:
    """Writes README.md into `save_directory`, keeping the data it was rendered from in `model_card_data.json` so
    a later save (e.g. after evaluation adds results) can start from it."""
    data_path = os.path.join(save_directory, "model_card_data.json")
    if data is None and os.path.exists(data_path):
        with open(data_path, encoding="utf-8") as f:
            data = json.load(f)
    data = data or {}
    with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_model_card(config, data))
    with open(data_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
