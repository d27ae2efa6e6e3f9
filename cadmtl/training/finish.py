"""The end of a training run: final evaluation, the model card's data, and everything written to output_dir."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cadmtl.data.sources import LoaderSettings, TaskSource
from cadmtl.evaluation.loop import evaluate_sources
from cadmtl.evaluation.reporting import domain_tables
from cadmtl.evaluation.verdict import verdict_table
from cadmtl.precision import autocast_dtype
from cadmtl.presets import PRESETS
from cadmtl.training.arguments import DataArguments, ModelArguments, TrainingArguments
from cadmtl.training.tracking import plot_training_curves
from dataset_scripts.provenance import training_data_record
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishSettings:
    """What evaluations and the end of a run need from its arguments: built once, before the first step.

    Attributes:
        output_dir: the run's folder (model/, eval_results.json, training_curves.png).
        dataset: the dataset folder or Hub id (the card cites it).
        configs_by_task: the trained dataset configs of each task.
        eval_split: the validation split; the card reports it when no test split is set.
        test_split: the split evaluated at the end, or None.
        eval_batch_size, max_eval_batches, domain_conditioning, num_workers: how evaluations run.
        verdict_calibration, verdict_target_fpr: how the OK / NG threshold is chosen (`cadmtl.training.calibration`).
        base_model: the DINOv3 checkpoint the backbone started from, or None for a random preset.
        paradigm, weighting, scheduler_temperature, learning_rate, mixed_precision: what the card says of training.
        coba: CoBa's settings for the card, or None when another weighting ran.
        push_to_hub, hub_model_id: where `save_run` pushes model/.
    """

    output_dir: Path
    dataset: str
    configs_by_task: dict[str, list[str]]
    eval_split: str
    test_split: str | None
    eval_batch_size: int
    max_eval_batches: int | None
    domain_conditioning: bool
    base_model: str | None
    paradigm: str
    weighting: str
    scheduler_temperature: float
    coba: dict[str, Any] | None
    learning_rate: float
    mixed_precision: str
    push_to_hub: bool = False
    hub_model_id: str | None = None
    num_workers: int = 0
    verdict_calibration: str = "f1_max"
    verdict_target_fpr: float = 0.01

    @classmethod
    def from_arguments(
        cls,
        model_args: ModelArguments,
        data_args: DataArguments,
        train_args: TrainingArguments,
        configs_by_task: dict[str, list[str]],
        weighting: str,
        scheduler_temperature: float,
    ) -> FinishSettings:
        coba = {
            "every": train_args.coba_every,
            "history_length": train_args.coba_history_length,
            "warmup_steps": train_args.coba_warmup_steps,
            "tau": train_args.coba_tau,
            "clamp_divergence": train_args.coba_clamp_divergence,
        }
        return cls(
            output_dir=Path(train_args.output_dir),
            dataset=data_args.dataset,
            configs_by_task=configs_by_task,
            eval_split=data_args.eval_split,
            test_split=data_args.test_split,
            eval_batch_size=data_args.eval_batch_size,
            max_eval_batches=train_args.max_eval_batches,
            domain_conditioning=train_args.cls_domain_conditioning,
            base_model=model_args.backbone if model_args.backbone not in PRESETS else None,
            paradigm=train_args.paradigm,
            weighting=weighting,
            scheduler_temperature=scheduler_temperature,
            coba=coba if weighting == "coba" else None,
            learning_rate=train_args.learning_rate,
            mixed_precision=train_args.mixed_precision,
            push_to_hub=train_args.push_to_hub,
            hub_model_id=train_args.hub_model_id,
            num_workers=data_args.num_workers,
            verdict_calibration=train_args.verdict_calibration,
            verdict_target_fpr=train_args.verdict_target_fpr,
        )


def evaluate_all(
    model: torch.nn.Module,
    sources: dict[str, list[TaskSource]],
    loader_settings: LoaderSettings,
    labels: dict[str, list[str]],
    settings: FinishSettings,
    accelerator: Accelerator,
) -> dict[str, dict[str, Any]]:
    """Metrics of every config of every trained task on `loader_settings.split`."""
    return evaluate_sources(
        model,
        sources,
        loader_settings,
        labels,
        batch_size=settings.eval_batch_size,
        device=accelerator.device,
        autocast_dtype=autocast_dtype(accelerator.mixed_precision),
        max_batches=settings.max_eval_batches,
        show_progress=accelerator.is_local_main_process,
        domain_conditioning=settings.domain_conditioning,
    )


def final_results(
    model: torch.nn.Module,
    sources: dict[str, list[TaskSource]],
    eval_settings: LoaderSettings,
    labels: dict[str, list[str]],
    settings: FinishSettings,
    accelerator: Accelerator,
) -> dict[str, dict[str, Any]]:
    """The validation metrics of every config, and its test metrics under ``config@test`` when a test split is set."""
    results = evaluate_all(model, sources, eval_settings, labels, settings, accelerator)
    if settings.test_split:
        test_settings = replace(eval_settings, split=settings.test_split)
        test = evaluate_all(model, sources, test_settings, labels, settings, accelerator)
        results.update({f"{config}@{settings.test_split}": result for config, result in test.items()})
    return results


def results_tables(results: dict[str, dict[str, Any]], name: str) -> str:
    """The paper-shaped tables (`reporting.domain_tables`) of each evaluated split."""
    splits = dict.fromkeys(result["split"] for result in results.values())
    return "\n".join(domain_tables({name: results}, split=split) for split in splits)


def dataset_identity(dataset: str) -> tuple[str, list[str]]:
    """(the name to cite, the Hub dataset ids) of a dataset argument: a Hub id is cited and listed; a local folder
    is cited by its folder name and lists no Hub dataset, so a card never claims data it was not trained on."""
    if "/" in dataset and not Path(dataset).exists():
        return dataset, [dataset]
    return Path(dataset).resolve().name, []


def model_card_data(
    settings: FinishSettings, results: dict[str, dict[str, Any]], steps: int
) -> dict[str, Any]:
    """What `save_pretrained` renders into the Hub README (`modeling_cadmtl.model_card_cadmtl`)."""
    final_split = settings.test_split or settings.eval_split
    dataset_name, hub_datasets = dataset_identity(settings.dataset)
    return {
        "results": {
            config.split("@")[0]: {"task": r["task"], "split": r["split"], "metrics": r["metrics"]}
            for config, r in results.items()
            if r["split"] == final_split
        },
        "datasets": hub_datasets,
        "dataset_id": dataset_name,
        "dataset_name": dataset_name,
        "base_model": settings.base_model,
        "training": {
            "paradigm": settings.paradigm,
            "weighting": settings.weighting,
            "steps": steps,
            "coba": settings.coba,
            "scheduler_temperature": settings.scheduler_temperature,
            "learning_rate": settings.learning_rate,
            "mixed_precision": settings.mixed_precision,
        },
        "training_data": f"{dataset_name}: "
        + ", ".join(c for configs in settings.configs_by_task.values() for c in configs),
    }


def save_model_folder(
    accelerator: Accelerator,
    model: torch.nn.Module,
    folder: Path,
    processor: CadMtlImageProcessor,
    card_data: dict[str, Any],
) -> CadMtlModel:
    """A Hub-ready model folder (weights, config, Hub code, processor, card) of the unwrapped model; main process."""
    unwrapped: CadMtlModel = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        folder,
        state_dict=accelerator.get_state_dict(model),
        image_processor=processor,
        model_card_data=card_data,
    )
    return unwrapped


def save_run(
    accelerator: Accelerator,
    model: torch.nn.Module,
    summary: dict[str, Any],
    card_data: dict[str, Any],
    processor: CadMtlImageProcessor,
    settings: FinishSettings,
) -> None:
    """Main process: the Hub-ready model folder, eval_results.json / .md, the training curves; push if asked."""
    if not accelerator.is_main_process:
        return
    output_dir = settings.output_dir
    model_dir = output_dir / "model"
    verdict = summary.get("verdict")
    if verdict is not None:  # the card shows the verdict's settings and its metrics on the final split
        card_data = {**card_data, "verdict": verdict}
    # config.json records what the model was trained on, so the app can say when it serves a model of generated
    # demo images
    configs = [config for configs in settings.configs_by_task.values() for config in configs]
    accelerator.unwrap_model(model).config.training_data = training_data_record(settings.dataset, configs)
    unwrapped = save_model_folder(accelerator, model, model_dir, processor, card_data)
    tables = results_tables(summary["results"], output_dir.name)
    if verdict is not None and verdict["splits"]:
        status = verdict.get("status") + (f": {verdict['reason']}" if verdict.get("reason") else "")
        tables += f"\n\n**OK / NG verdict** (status {status})\n\n" + verdict_table(verdict["splits"]) + "\n"
    (output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2, default=str))
    (output_dir / "eval_results.md").write_text(tables)
    metrics_path = output_dir / "logs" / "metrics.jsonl"
    if metrics_path.exists():
        plot_training_curves(metrics_path, output_dir / "training_curves.png")
    logger.info("saved the model to %s\n%s", model_dir, tables)
    if settings.push_to_hub:
        unwrapped.push_to_hub(
            settings.hub_model_id or output_dir.name, image_processor=processor, model_card_data=card_data
        )
