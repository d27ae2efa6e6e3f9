"""The OK / NG verdict at the end of a training run: calibrated on validation, stored in the model config."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator

from cadmtl.data.sources import LoaderSettings, TaskSource
from cadmtl.evaluation.verdict import (
    VerdictScores,
    apply_calibration,
    calibrate_verdict,
    score_verdict_split,
    verdict_report,
    verdict_table,
)
from cadmtl.precision import autocast_dtype
from cadmtl.training.finish import FinishSettings

logger = logging.getLogger(__name__)


def calibrate_and_report_verdict(
    model: torch.nn.Module,
    sources: dict[str, list[TaskSource]],
    eval_settings: LoaderSettings,
    settings: FinishSettings,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """The OK / NG verdict at the end of a run (every rank calls it: scoring is collective).

    Scores the validation images of every trained config, pooled; when they hold normal and anomalous images,
    picks the verdict source (best AUROC) and its threshold (`settings.verdict_calibration`: f1_max | fpr, never one that
    flags every normal image or no anomalous one: see `calibrate_verdict`) and stores them in the model config
    before it is saved, with the verdict's status (`calibrated`, `uninformative`: the score does not separate, the
    model then gives no OK / NG; `default`: nothing to calibrate on, the defaults stay) and its reason, both logged.
    Returns `{"status", "reason", "calibration", "source", "threshold", "splits": {split: verdict metrics}}` for
    eval_results.json and the model card (the test split too when one is set).
    """
    config = accelerator.unwrap_model(model).config
    configs = [source.config for task_sources in sources.values() for source in task_sources]

    def score(split: str):
        return score_verdict_split(
            model,
            settings.dataset,
            configs,
            split,
            image_sizes=eval_settings.image_sizes,
            heads=config.verdict_heads,
            normal_class_id=config.normal_class_id,
            device=accelerator.device,
            batch_size=settings.eval_batch_size,
            num_workers=settings.num_workers,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            autocast_dtype=autocast_dtype(accelerator.mixed_precision),
            max_batches=settings.max_eval_batches,
            show_progress=accelerator.is_local_main_process,
        )

    # A model none of whose heads gives an anomaly score (e.g. a classifier of part names, no `normal` class) has
    # no verdict: nothing to score, and the calibration records why.
    validation = score(eval_settings.split) if config.verdict_heads else VerdictScores()
    calibration = calibrate_verdict(
        validation, settings.verdict_calibration, settings.verdict_target_fpr, eval_settings.split
    )
    apply_calibration(config, calibration)  # on every rank: each one saves the same config
    if accelerator.is_main_process:
        _log_calibration(calibration, config)
    report: dict[str, Any] = {
        "status": config.verdict_status,
        "reason": config.verdict_reason,
        "calibration": calibration,
        "source": config.verdict_source,
        "threshold": config.verdict_threshold,
        "splits": {},
    }
    if not validation.scores:
        return report
    splits = {eval_settings.split: validation}
    if settings.test_split:
        splits[settings.test_split] = score(settings.test_split)
    for split, scores in splits.items():
        report["splits"][split] = verdict_report(
            scores, config.verdict_source, config.verdict_threshold, split
        )
    if accelerator.is_main_process:
        logger.info("OK / NG verdict\n%s", verdict_table(report["splits"]))
    return report


def _log_calibration(calibration: dict[str, Any], config: Any) -> None:
    if calibration.get("fallback"):
        logger.warning("OK / NG verdict: %s", calibration["fallback"])
    if config.verdict_status == "calibrated":
        logger.info(
            "OK / NG verdict calibrated on %s (%s): source %s, threshold %.6g, AUROC %.4f, false-positive rate "
            "%.1f %%, recall %.1f %%",
            calibration["split"],
            calibration["method"],
            calibration["source"],
            calibration["threshold"],
            calibration["auroc"],
            100 * calibration["fpr"],
            100 * calibration["recall"],
        )
    elif config.verdict_status == "uninformative":
        logger.warning(
            "OK / NG verdict UNINFORMATIVE (%s): the model gives anomaly scores without OK / NG "
            "(verdict_status=uninformative in config.json)",
            config.verdict_reason,
        )
    else:
        logger.warning(
            "OK / NG verdict not calibrated (%s); the model keeps verdict_source=%r, verdict_threshold=%s",
            config.verdict_reason,
            config.verdict_source,
            config.verdict_threshold,
        )
