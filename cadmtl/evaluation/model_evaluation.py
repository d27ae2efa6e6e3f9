"""Evaluating a CadMtl model on dataset configs: the content of `cadmtl evaluate`'s eval_results.json (the command
itself, its tables and `--compare`, are `cadmtl.evaluation.command`).

    from cadmtl.evaluation.model_evaluation import evaluate_model
    evaluation = evaluate_model("outputs/cadmtl-demo/model", "data/cad100k-mini", split="test")
    evaluation["results"]["exterior_det"]["metrics"]["AP"], evaluation["verdict"]["report"]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from cadmtl.precision import autocast_dtype, resolve_mixed_precision
from cadmtl.tasks import CADMTL_TASKS, TASKS

__all__ = ["evaluate_model", "evaluate_verdict"]


def evaluate_model(
    model_name_or_path: str,
    dataset: str,
    *,
    configs: list[str] | None = None,
    split: str = "test",
    batch_size: int = 16,
    image_sizes: dict[str, int] | None = None,
    max_batches: int | None = None,
    num_workers: int = 0,
    device: str | None = None,
    mixed_precision: str = "auto",
    domain_conditioning: bool = True,
    verdict: bool = True,
) -> dict[str, Any]:
    """Metrics of `model_name_or_path` on `split` of each dataset config: the content of eval_results.json.

    With `verdict`, also the OK / NG verdict on those configs' images pooled (every CAD config has `is_normal`),
    at the model's stored `verdict_source` / `verdict_threshold`: image AUROC and F1-max per source, precision /
    recall / false-positive rate at the threshold."""
    from accelerate import PartialState

    from cadmtl.data.sources import LoaderSettings, attach_label_maps, available_configs, discover_sources
    from cadmtl.evaluation.loop import evaluate_sources
    from cadmtl.model_kinds import CADMTL, load_pretrained, require_model_kind
    from dataset_scripts.schema import task_of_config
    from modeling_cadmtl import CadMtlModel

    info = require_model_kind(model_name_or_path, CADMTL)  # before anything is built or downloaded
    state = PartialState(cpu=device == "cpu")
    model = load_pretrained(CadMtlModel, model_name_or_path, info.holds).to(state.device).eval()
    tasks_with_heads = TASKS
    configs = configs or [c for c in available_configs(dataset) if task_of_config(c) in tasks_with_heads]
    by_task: dict[str, list[str]] = defaultdict(list)
    for config in configs:
        by_task[task_of_config(config)].append(config)
    sources = discover_sources(dataset, dict(by_task), split)
    for task, task_sources in sources.items():
        attach_label_maps(task_sources, model.config.labels_for(task))
    defaults = {name: task.default_image_size for name, task in CADMTL_TASKS.items()}
    sizes = {**defaults, **(model.config.image_sizes or {}), **(image_sizes or {})}
    settings = LoaderSettings(
        dataset=dataset,
        split=split,
        image_sizes=sizes,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=0,
        seed=0,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    # "auto" by default, resolved as train_accelerate.py resolves it, so both report the same numbers for the
    # same model on the same machine.
    mixed_precision = resolve_mixed_precision(mixed_precision, state.device.type)
    autocast = autocast_dtype(mixed_precision)
    labels = {task: model.config.labels_for(task) for task in sources}
    results = evaluate_sources(
        model,
        sources,
        settings,
        labels,
        batch_size=batch_size,
        device=state.device,
        autocast_dtype=autocast,
        max_batches=max_batches,
        show_progress=state.is_local_main_process,
        domain_conditioning=domain_conditioning,
    )
    evaluation = {
        "model": str(model_name_or_path),
        "dataset": dataset,
        "split": split,
        "image_sizes": {task: sizes[task] for task in sources},
        "mixed_precision": mixed_precision,
        "domain_conditioning": domain_conditioning,
        "results": results,
    }
    if verdict:
        evaluation["verdict"] = evaluate_verdict(
            model, dataset, configs, split, sizes, state, batch_size, num_workers, autocast, max_batches
        )
    return evaluation


def evaluate_verdict(
    model: Any,
    dataset: str,
    configs: list[str],
    split: str,
    sizes: dict[str, int],
    state: Any,
    batch_size: int,
    num_workers: int,
    autocast: torch.dtype | None,
    max_batches: int | None,
) -> dict[str, Any]:
    """The OK / NG verdict metrics of the model on the images of `configs`' `split` (pooled), at the source and
    threshold stored in its config: `{"source", "threshold", "calibration", "report"}` (`report` is None with
    the reason when the model's heads give no anomaly score)."""
    from cadmtl.evaluation.verdict import score_verdict_split, verdict_report

    config = model.config
    result: dict[str, Any] = {
        "source": config.verdict_source,
        "threshold": config.verdict_threshold,
        "calibration": config.verdict_calibration,
        "report": None,
    }
    if not config.verdict_heads:
        result["reason"] = "no trained head gives an anomaly score"
        return result
    scores = score_verdict_split(
        model,
        dataset,
        configs,
        split,
        image_sizes=sizes,
        heads=config.verdict_heads,
        normal_class_id=config.normal_class_id,
        device=state.device,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=state.process_index,
        world_size=state.num_processes,
        autocast_dtype=autocast,
        max_batches=max_batches,
        show_progress=state.is_local_main_process,
    )
    result["report"] = verdict_report(scores, config.verdict_source, config.verdict_threshold, split)
    return result
