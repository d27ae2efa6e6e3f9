"""Experiment tracking: a JSONL tracker for Accelerate (always available, no extra package) and the end-of-run
plot of task losses, CoBa weights and sampling probabilities."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call (`{"step": ..., **values}`) to `<logging_dir>/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run, closed in finish()

    @property
    def tracker(self):
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        with open(self.path.parent / "config.json", "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2, sort_keys=True, default=str)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        record = {"step": step, **{key: _plain(value) for key, value in values.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(metrics_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Three panels over optimizer steps: each task's training loss, the task weights, the sampling probabilities.

    Reads the `loss/<task>`, `<weighting>/weight/<task>` (e.g. `coba/weight/cls`) and `scheduler/prob/<task>`
    series of a metrics.jsonl file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    records = read_jsonl(metrics_path)
    weighting = next(
        (
            key.split("/")[0]
            for record in records
            for key in record
            if key.count("/") == 2 and "/weight/" in key
        ),
        "coba",
    )
    panels = (
        ("loss/", "training loss"),
        (f"{weighting}/weight/", f"task weight ({weighting})"),
        ("scheduler/prob/", "P(task)"),
    )
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            if step is None or value is None or not isinstance(value, (int, float)):
                continue
            for prefix, _ in panels:
                if key.startswith(prefix) and "/" not in key[len(prefix) :]:
                    series[prefix][key[len(prefix) :]].append((step, float(value)))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for axis, (prefix, title) in zip(axes, panels):
        for task, points in sorted(series[prefix].items()):
            steps, values = zip(*points)
            axis.plot(steps, values, label=task, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        if prefix == "loss/":
            axis.set_yscale("log")
        if series[prefix]:
            axis.legend()
        else:
            axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes)
    output_path = Path(output_path)
    figure.savefig(output_path, dpi=110)
    plt.close(figure)
    return output_path
