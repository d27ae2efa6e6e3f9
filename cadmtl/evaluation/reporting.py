"""Markdown tables shaped like the CAD 100K paper's, from evaluation results.

An evaluation result file (written by `train_accelerate.py` or `cadmtl evaluate`) holds
`{"results": {<dataset config>: {"task", "split", "metrics", "report"}}}`; metric values are fractions in [0, 1] and
tables print percentages.

- `domain_tables`: per-domain detection (AP / AP50 / AP75 / AR, paper Table B1), classification (Acc@1 / Acc@5,
  Table B2) and segmentation (mIoU / mFscore / mPrec / mRecall, Table B3), one row per model.
- `comparison_table`: single-task vs. base vs. adaptive multi-task (Tables 1 and B4): classification accuracy,
  detection mAP and segmentation mIoU per model and method, as mean ± standard deviation over seeds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from cadmtl.tasks import CADMTL_TASKS

# The headline metric of each task in the comparison table (`CadMtlTask.headline`).
HEADLINE = {name: task.headline for name, task in CADMTL_TASKS.items()}


def load_results(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The `results` mapping of an evaluation file, with a clear error for anything else."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all("task" in r and "metrics" in r for r in results.values()):
        raise ValueError(
            f"{path} is not an evaluation result file (no 'results' with task and metrics per config)."
        )
    return results


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _domain(config: str) -> str:
    return config.split("@")[0].rsplit("_", 1)[0]


def domain_tables(named_results: Mapping[str, Mapping[str, dict[str, Any]]], split: str | None = None) -> str:
    """One Markdown table per task: a row per model (name), a column group per domain (dataset config)."""
    blocks = []
    for definition in sorted(CADMTL_TASKS.values(), key=lambda definition: definition.table_rank):
        task = definition.name
        configs: list[str] = []
        for results in named_results.values():
            for config, result in results.items():
                if (
                    result["task"] == task
                    and (split is None or result.get("split") == split)
                    and config not in configs
                ):
                    configs.append(config)
        if not configs:
            continue
        columns = definition.table_columns
        header = (
            "| Model | " + " | ".join(f"{_domain(c)} {label}" for c in configs for _, label in columns) + " |"
        )
        lines = [f"**{definition.table_title}**" + (f" ({split})" if split else ""), "", header]
        lines.append("|---|" + "---|" * (len(configs) * len(columns)))
        for name, results in named_results.items():
            cells = []
            for config in configs:
                metrics = results.get(config, {}).get("metrics", {})
                cells.extend(_percent(metrics.get(key)) for key, _ in columns)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def task_summary(results: Mapping[str, dict[str, Any]], split: str | None = None) -> dict[str, float]:
    """The headline metric of each task, averaged over that task's configs (NaN-free values only)."""
    summary = {}
    for task, (metric, _) in HEADLINE.items():
        values = [
            r["metrics"][metric]
            for r in results.values()
            if r["task"] == task
            and (split is None or r.get("split") == split)
            and r["metrics"].get(metric) is not None
            and not math.isnan(r["metrics"][metric])
        ]
        if values:
            summary[task] = sum(values) / len(values)
    return summary


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one seed; nan for none or where one is nan)."""
    if not values or any(math.isnan(value) for value in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std_cell(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """A table cell over seeds: `mean ± std`, `mean` for one seed, `-` for none (values times `scale`)."""
    mean, std = mean_std(values)
    return format_mean_std(scale * mean, scale * std, len(values), digits)


def format_mean_std(mean: float, std: float, seeds: int, digits: int = 2) -> str:
    """`mean ± std` with `digits` decimals; `mean` alone for one seed; `-` when the mean is nan (no seeds)."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def comparison_table(rows: Sequence[tuple[str, str, Sequence[Mapping[str, float]]]]) -> str:
    """`rows` = (model, method, one `task_summary` per seed). Cells are mean ± sample std over seeds."""
    lines = ["| Model | Method | seeds | " + " | ".join(title for _, title in HEADLINE.values()) + " |"]
    lines.append("|---|---|---|" + "---|" * len(HEADLINE))
    for model, method, summaries in rows:
        cells = [mean_std_cell([s[task] for s in summaries if task in s], scale=100) for task in HEADLINE]
        lines.append(f"| {model} | {method} | {len(summaries)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
