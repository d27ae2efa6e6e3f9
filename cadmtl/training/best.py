"""Keeping what is best during training: the selection metric, the best-model tracker with early stopping,
``results.csv`` (one row per evaluation), the EMA of the weights, and the atomic ``best/`` model folder.

Names follow transformers' ``Trainer`` (``metric_for_best_model``, ``greater_is_better``,
``load_best_model_at_end``) and Ultralytics (``patience``, ``results.csv``, ``best``, ``fitness``).

* The selection metric ("fitness") of an evaluation is ``DEFAULT_METRIC`` = ``"mean_primary"``: the mean over the
  evaluated dataset configs of each config's primary metric (``reporting.HEADLINE``: classification acc@1,
  detection AP, segmentation mIoU; undefined values are skipped), or one explicit ``"CONFIG/METRIC"``
  (e.g. ``"exterior_det/AP50"``).
* An evaluation improves on the best only when strictly better (a tie keeps the earlier best, as transformers'
  ``Trainer`` does) and a NaN never improves; ``patience`` evaluations in a row without improvement stop the run.
* With an EMA (``build_ema``) the evaluations, ``best/`` and the final ``model/`` all use the averaged weights.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cadmtl.evaluation.reporting import HEADLINE
from cadmtl.model_kinds import load_pretrained
from cadmtl.training.finish import save_model_folder
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "mean_primary"
BEST_DIR = "best"
BEST_INFO = "best.json"
RESULTS_CSV = "results.csv"


# ------------------------------------------------------------------------------------------ the selection metric
def check_metric_for_best_model(metric: str, configs: list[str]) -> None:
    """Refuse a selection metric that no evaluation of this run can produce (before training starts)."""
    if metric == DEFAULT_METRIC:
        return
    config, _, name = metric.partition("/")
    if not name:
        raise ValueError(
            f"metric_for_best_model must be {DEFAULT_METRIC!r} or 'CONFIG/METRIC' (e.g. 'exterior_det/AP50'), "
            f"got {metric!r}."
        )
    if config not in configs:
        raise ValueError(
            f"metric_for_best_model {metric!r} names config {config!r}, which this run does not evaluate; "
            f"evaluated configs: {configs}."
        )


def default_greater_is_better(metric: str) -> bool:
    """As transformers: a loss is better lower, every other metric higher."""
    return not metric.endswith("loss")


def selection_value(results: Mapping[str, Mapping[str, Any]], metric: str = DEFAULT_METRIC) -> float:
    """The selection metric of one evaluation (``evaluate_sources`` results); NaN when it is undefined."""
    if metric == DEFAULT_METRIC:
        values = [
            value
            for result in results.values()
            if (value := result["metrics"].get(HEADLINE[result["task"]][0])) is not None
            and not math.isnan(value)
        ]
        return sum(values) / len(values) if values else math.nan
    config, _, name = metric.partition("/")
    if config not in results:
        raise KeyError(
            f"metric_for_best_model {metric!r}: no results for config {config!r} ({sorted(results)})."
        )
    metrics = results[config]["metrics"]
    if name not in metrics:
        raise KeyError(
            f"metric_for_best_model {metric!r}: config {config!r} has no metric {name!r}; it has {sorted(metrics)}."
        )
    value = metrics[name]
    return math.nan if value is None else float(value)


def broadcast_value(accelerator: Accelerator, value: float) -> float:
    """The main process's value on every rank, so every rank takes the same best / stop decision."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(tensor, from_process=0).item())


# ----------------------------------------------------------------------------------------------- the tracker
class BestTracker:
    """The best value of the selection metric so far, its step, and the evaluations since (checkpointed)."""

    def __init__(
        self, metric: str = DEFAULT_METRIC, greater_is_better: bool = True, patience: int = 0
    ) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}.")
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evaluations = 0
        self.evaluations_since_best = 0

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.greater_is_better else value < self.best_value

    def update(self, step: int, value: float) -> bool:
        """Record one evaluation; True when it is the new best."""
        self.evaluations += 1
        if self.is_improvement(value):
            self.best_value, self.best_step = float(value), step
            self.evaluations_since_best = 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_since_best >= self.patience

    def stop_reason(self) -> str:
        best = "none" if self.best_value is None else f"{self.best_value:.6g} at step {self.best_step}"
        return (
            f"{self.metric} did not improve for {self.evaluations_since_best} evaluations in a row "
            f"(patience {self.patience}; best {best})"
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("metric", "greater_is_better"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"The checkpoint tracked the best model by {key}={state[key]!r}, this run by "
                    f"{getattr(self, key)!r}: resume with the same --{key} (or start a new output_dir)."
                )
        # The patience of the resumed run wins: it may be raised or lowered on resume.
        vars(self).update({k: v for k, v in state.items() if k != "patience"})


# ---------------------------------------------------------------------------------------------- results.csv
def results_row(
    step: int,
    seconds: float,
    train_losses: Mapping[str, float],
    results: Mapping[str, Mapping[str, Any]],
    fitness: float,
    is_best: bool,
) -> dict[str, Any]:
    """One ``results.csv`` row: step, time, each task's last training loss, every metric per config, fitness."""
    row: dict[str, Any] = {"step": step, "time": round(seconds, 3)}
    row.update({f"train/{task}_loss": loss for task, loss in train_losses.items()})
    for config, result in results.items():
        row.update({f"metrics/{config}/{name}": value for name, value in result["metrics"].items()})
    row["fitness"] = fitness
    row["is_best"] = int(is_best)
    return row


class ResultsCsv:
    """``OUTPUT_DIR/results.csv``, one row per evaluation (main process), and the run's training clock.

    The clock counts the seconds of this run plus those of the runs it resumed from (its state is checkpointed),
    so ``time`` keeps growing across a resume. ``open`` starts a fresh file, or on resume keeps the rows up to
    the checkpoint's step (rows written after it are evaluated again), so no step appears twice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seconds_before = 0.0
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return self._seconds_before + time.perf_counter() - self._started

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self._seconds_before = float(state["elapsed"])
        self._started = time.perf_counter()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write(self, header: list[str], rows: list[Mapping[str, Any]]) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
        partial.replace(self.path)

    def open(self, resumed_step: int | None) -> None:
        """A fresh run: drop an old file. A resumed run: keep the rows up to ``resumed_step``."""
        if not self.path.exists():
            return
        if resumed_step is None:
            self.path.unlink()
            return
        header, rows = self._read()
        kept = [row for row in rows if int(row["step"]) <= resumed_step]
        if len(kept) < len(rows):
            self._write(header, kept)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add a row (the header is written once; a new column rewrites the file with the wider header)."""
        if not self.path.exists():
            self._write(list(row), [row])
            return
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), [])
        if set(row) <= set(header):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
            return
        header, rows = self._read()
        self._write(header + [key for key in row if key not in header], [*rows, row])


# ------------------------------------------------------------------------------------------------------- EMA
def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers, kept in fp32.

    ``ema.update_parameters(model)`` after each optimizer step that stepped: the first call copies the weights,
    each later one sets ``ema = decay * ema + (1 - decay) * weights``. Build it from the unwrapped model before
    ``torch.compile`` and DDP wrapping; every rank keeps its own copy, identical because the replicas are. Under
    Accelerate's bf16 the weights themselves stay fp32 (autocast computes in bf16), so the average does too.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}.")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.module.float()
    ema.requires_grad_(False)
    if hasattr(model, "config"):
        # One config object: what the run records in the model's config (sizes, thresholds) reaches the EMA copy.
        ema.module.config = model.config
    return ema


# --------------------------------------------------------------------------------------------------- best/
def save_best(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: str | Path,
    processor: CadMtlImageProcessor,
    card_data: Mapping[str, Any],
    info: Mapping[str, Any],
) -> Path:
    """Main process: write ``OUTPUT_DIR/best/`` (a Hub-ready model folder plus ``best.json``) to a temporary folder,
    then swap it in: an interrupted save leaves the previous ``best/`` whole."""
    best = Path(output_dir, BEST_DIR)
    if not accelerator.is_main_process:
        return best
    partial, old = best.with_name(f".{BEST_DIR}.partial"), best.with_name(f".{BEST_DIR}.old")
    for stale in (partial, old):
        if stale.exists():
            shutil.rmtree(stale)
    save_model_folder(accelerator, model, partial, processor, dict(card_data))
    (partial / BEST_INFO).write_text(json.dumps(dict(info), indent=2, default=str))
    if best.exists():
        best.rename(old)
    partial.rename(best)
    if old.exists():
        shutil.rmtree(old)
    return best


def read_best_info(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir, BEST_DIR, BEST_INFO)
    return json.loads(path.read_text()) if path.exists() else None


def prepare_best_dir(output_dir: str | Path, tracker: BestTracker, resumed: bool) -> None:
    """Main process, before the loop: a fresh run drops the ``best/`` of an earlier run in the same folder; a
    resumed run warns when ``best/`` does not hold the checkpoint's best step (it was saved after the
    checkpoint and is replaced at the next improvement)."""
    best = Path(output_dir, BEST_DIR)
    if not resumed:
        if best.exists():
            logger.info("removing %s of an earlier run in this output_dir", best)
            shutil.rmtree(best)
        return
    info = read_best_info(output_dir)
    saved_step = info["step"] if info else None
    if saved_step != tracker.best_step:
        logger.warning(
            "%s holds step %s but the checkpoint's best is step %s: it is replaced at the next improvement",
            best,
            saved_step,
            tracker.best_step,
        )


def load_best_weights(model: CadMtlModel, output_dir: str | Path) -> dict[str, Any] | None:
    """Load ``OUTPUT_DIR/best/``'s weights into ``model`` (every rank, so DDP replicas stay equal); its best.json,
    or None (and the weights untouched) when no evaluation ever improved."""
    info = read_best_info(output_dir)
    if info is None:
        return None
    best = load_pretrained(type(model), Path(output_dir, BEST_DIR), "the best checkpoint's model")
    model.load_state_dict(best.state_dict(), strict=True)
    return info


def finish_weights(
    accelerator: Accelerator,
    model: CadMtlModel,
    ema: AveragedModel | None,
    output_dir: str | Path,
    load_best_model_at_end: bool,
) -> str:
    """Put the weights the run ships into the (unwrapped) training model: the best/ weights with
    ``load_best_model_at_end``, else the EMA when on, else the last step's. Returns which, for the logs."""
    accelerator.wait_for_everyone()  # best/ is complete on disk before any rank reads it
    if load_best_model_at_end:
        info = load_best_weights(model, output_dir)
        if info is not None:
            return f"the best weights ({info['metric_for_best_model']} {info['value']:.6g} at step {info['step']})"
        logger.warning(
            "load_best_model_at_end: no evaluation improved on the metric, keeping the last weights"
        )
    if ema is not None:
        with torch.no_grad():
            model.load_state_dict(ema.module.state_dict(), strict=True)
        return "the EMA weights"
    return "the last weights"
