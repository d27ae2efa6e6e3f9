"""The training log's windows: what one logging record says about the steps since the previous one."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch


class LogWindow:
    """Accumulates the steps between two logging records.

    A record holds each task's mean training loss over the window (this rank's batches), the learning rate,
    the count of skipped non-finite steps, the throughput of all ranks, the fraction of time spent in weighting
    updates (CoBa's held-out passes), the weighting's own scalars and the scheduler's task probabilities.
    """

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes = num_processes
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.images = 0
        self.weighting_seconds = 0.0
        self.task_losses: dict[str, list[torch.Tensor]] = {}

    def add_step(self, task_losses: Mapping[str, list[torch.Tensor]], images: int) -> None:
        for task, values in task_losses.items():
            self.task_losses.setdefault(task, []).extend(values)
        self.images += images * self.num_processes

    def add_weighting_time(self, seconds: float) -> None:
        self.weighting_seconds += seconds

    def record(
        self,
        *,
        lr: float,
        nonfinite_steps: int,
        weighting: Any,
        probabilities: Mapping[str, float],
    ) -> dict[str, float]:
        """The record of the window, then start a new one."""
        record = {
            f"loss/{task}": torch.stack(values).mean().item() for task, values in self.task_losses.items()
        }
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record["lr"] = lr
        record["nonfinite_steps"] = nonfinite_steps
        record["throughput/images_per_second"] = self.images / elapsed
        record["throughput/weighting_fraction"] = self.weighting_seconds / elapsed
        record.update({f"{weighting.name}/{key}": value for key, value in weighting.log_dict().items()})
        record.update({f"scheduler/prob/{task}": p for task, p in probabilities.items()})
        self._reset()
        return record
