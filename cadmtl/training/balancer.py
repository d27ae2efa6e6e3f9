"""The task weighting of a training run, its whole life cycle behind one object.

A :class:`TaskBalancer` holds the weighting method (equal, CoBa, PCGrad, FAMO...), the task scheduler that draws
each step's task from the method's weights, the held-out batches of methods that learn from validation losses,
and the recipe's loss scaling. The loop calls it at fixed points and never asks what kind of method runs:

====================================  =========================================================================
``balancer.before_step(step, ...)``   refresh the weights from held-out losses every ``update_every`` steps
``balancer.tasks_for(step)``          the tasks of the step (every task, or one drawn by the scheduler)
``balancer.scale_loss(task, loss)``   inside the step: ``K * w_task * loss`` when the recipe scales losses
``balancer.combine_gradients(...)``   inside the step: the shared update of a gradient-level method
``balancer.after_step(step, ...)``    feed the step's rank-averaged training losses to methods that want them
``balancer.checkpoint_objects()``     the stateful parts, saved and restored with the run
====================================  =========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator

from cadmtl.data.sources import LoaderSettings, TaskSource, held_out_batches
from cadmtl.training.arguments import TrainingArguments
from cadmtl.training.recipe import Recipe, build_recipe_weighting
from cadmtl.training.scheduler import TaskScheduler
from cadmtl.training.step import StepOutcome, held_out_losses, reduced_task_losses
from cadmtl.training.weighting import TaskWeighting


class TaskBalancer:
    """A task weighting, the scheduler that samples tasks from its weights, and when each of them is fed.

    Args:
        weighting: the method; its ``task_names`` are the tasks of the run.
        sampler: ``"all"`` (every task each step), ``"round_robin"``, ``"adaptive"`` or ``"single"``.
        temperature: the scheduler's T in softmax(w / T); default 1 / number of tasks.
        seed: the scheduler's seed (its draws are a pure function of seed, step and weights).
        scale_losses: multiply each task's loss by ``K * w_task`` (every-task steps, or re-weighted sampling).
        update_every: optimizer steps between two held-out updates of the weights (CoBa's ``coba_every``).
    """

    def __init__(
        self,
        weighting: TaskWeighting,
        *,
        sampler: str = "all",
        temperature: float | None = None,
        seed: int = 0,
        scale_losses: bool = False,
        update_every: int = 1,
    ) -> None:
        self.weighting = weighting
        self.sampler = sampler
        self.scale_losses = scale_losses
        self.update_every = update_every
        self.scheduler = TaskScheduler(
            weighting.task_names,
            temperature=temperature or 1.0 / weighting.num_tasks,
            seed=seed,
            mode="round_robin" if sampler == "all" else sampler,
        )
        self.held_out: dict[str, list[tuple[TaskSource, dict[str, Any]]]] = {}

    @classmethod
    def from_recipe(cls, recipe: Recipe, tasks: list[str], train_args: TrainingArguments) -> TaskBalancer:
        """The balancer of a resolved recipe, its method's options taken from the training arguments."""
        return cls(
            build_recipe_weighting(recipe, tasks, train_args),
            sampler=recipe.sampler,
            temperature=train_args.temperature,
            seed=train_args.seed,
            scale_losses=recipe.scale_losses,
            update_every=train_args.coba_every,
        )

    # ------------------------------------------------------------------------------------------- set-up

    @property
    def name(self) -> str:
        return self.weighting.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.weighting.task_names

    @property
    def needs_task_gradients(self) -> bool:
        """Whether the step must compute one gradient of the shared parameters per task."""
        return self.weighting.needs_task_gradients

    def checkpoint_objects(self) -> dict[str, Any]:
        """The stateful parts, under the names a checkpoint stores them by."""
        return {"weighting": self.weighting, "task_scheduler": self.scheduler}

    def load_held_out(
        self,
        sources: Mapping[str, list[TaskSource]],
        settings: LoaderSettings,
        num_batches: int,
        batch_size: int,
    ) -> None:
        """Read each task's fixed held-out batches, if the method learns from held-out losses (CoBa)."""
        if self.weighting.needs_held_out_losses:
            self.held_out = {
                task: held_out_batches(sources[task], settings, num_batches, batch_size)
                for task in self.tasks
            }

    # ------------------------------------------------------------------------------------ the loop's points

    def before_step(
        self,
        step: int,
        model: torch.nn.Module,
        accelerator: Accelerator,
        candidates: Mapping[str, torch.Tensor],
    ) -> float:
        """Every ``update_every`` steps, update the weights from the held-out losses and hand them to the
        scheduler. Returns the seconds it took (0 when nothing was due), for the log's weighting fraction."""
        if not (self.held_out and step % self.update_every == 0):
            return 0.0
        started = time.perf_counter()
        losses = held_out_losses(model, self.held_out, accelerator, candidates)
        self.scheduler.set_weights(self.weighting.update(step, losses))
        return time.perf_counter() - started

    def tasks_for(self, step: int) -> list[str]:
        """The tasks of optimizer step ``step``: all of them, or the scheduler's draw (the same on every rank)."""
        return list(self.tasks) if self.sampler == "all" else [self.scheduler.sample(step)]

    def scale_loss(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        """A task's loss as the step back-propagates it: ``K * w_task * loss`` when the recipe scales losses
        (never for a gradient-level method, which combines the raw per-task gradients)."""
        if not self.scale_losses or self.needs_task_gradients:
            return loss
        return loss * self.weighting.num_tasks * self.weighting.weights[task]

    def combine_gradients(self, gradients: torch.Tensor, losses: Mapping[str, float]) -> torch.Tensor:
        """The shared parameters' update direction from the ``(K, P)`` per-task gradients."""
        return self.weighting.combine_gradients(gradients, losses)

    def after_step(self, step: int, outcome: StepOutcome, accelerator: Accelerator) -> None:
        """Feed the step's rank-averaged training losses to a method that learns from them (FAMO)."""
        if self.weighting.needs_train_losses and outcome.stepped:
            self.weighting.observe_train_losses(step, reduced_task_losses(accelerator, outcome))

    # ---------------------------------------------------------------------------------------- reporting

    @property
    def probabilities(self) -> dict[str, float]:
        return self.scheduler.probabilities

    @property
    def temperature(self) -> float:
        return self.scheduler.temperature

    def summary(self) -> dict[str, Any]:
        """The method and its final weights, for eval_results.json."""
        return {"name": self.name, "weights": self.weighting.weights}
