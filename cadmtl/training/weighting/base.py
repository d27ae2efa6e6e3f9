"""The one interface every task-weighting method implements, and the registry that names them.

A method sees the tasks of a multi-task model and decides how their losses or gradients are combined:

* **loss-level** methods (equal weights, CoBa, FAMO) only publish :attr:`TaskWeighting.weights`; the training
  step sums ``K * w_task * loss_task`` (or samples the task with probabilities derived from the weights);
* **gradient-level** methods (PCGrad, CAGrad, Aligned-MTL, ...) set ``needs_task_gradients``: the step computes
  one gradient of the shared parameters per task and asks :meth:`TaskWeighting.combine_gradients` for the
  update direction.

Every method is checkpointable (``state_dict`` / ``load_state_dict``, registered with Accelerate) and
deterministic given the same inputs, so all DDP ranks, fed rank-averaged losses or all-reduced gradients,
hold the same state without communicating.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch


def check_task_names(task_names: Sequence[str], owner: str = "task weighting") -> tuple[str, ...]:
    """The task names as a tuple, or a ValueError naming ``owner`` and what is wrong with them."""
    if isinstance(task_names, str):
        raise ValueError(f"task_names must be a sequence of names, got the string {task_names!r}")
    names = tuple(task_names)
    if not names:
        raise ValueError(f"{owner} needs at least one task, got an empty task_names")
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"task names must be non-empty strings, got {list(names)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, got duplicates {duplicates} in {list(names)}")
    return names


class TaskWeighting:
    """Base class of the task-weighting methods (one small subclass per method, LibMTL style).

    Class attributes a subclass sets:
        name: the registry name (``--weighting NAME``).
        needs_held_out_losses: :meth:`update` wants each task's loss on held-out batches (CoBa).
        needs_task_gradients: the step must call :meth:`combine_gradients` with per-task gradients.
        needs_train_losses: :meth:`observe_train_losses` wants each step's rank-averaged training losses (FAMO).

    The default implementations are those of equal weighting: uniform weights, no state.
    """

    name: ClassVar[str] = ""
    needs_held_out_losses: ClassVar[bool] = False
    needs_task_gradients: ClassVar[bool] = False
    needs_train_losses: ClassVar[bool] = False

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = check_task_names(task_names, owner=type(self).__name__)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def weights(self) -> dict[str, float]:
        """Loss weight of each task, summing to 1 (the step scales a task's loss by ``K * w``)."""
        return dict.fromkeys(self.task_names, 1.0 / self.num_tasks)

    def update(self, step: int, held_out_losses: Mapping[str, float] | None = None) -> dict[str, float]:
        """Called every ``weighting_every`` optimizer steps (with held-out losses when the method needs them);
        returns the weights after the update."""
        return self.weights

    def observe_train_losses(self, step: int, losses: Mapping[str, float]) -> None:
        """Called after each optimizer step with the rank-averaged training loss of each task that ran."""

    def combine_gradients(self, gradients: torch.Tensor, losses: Mapping[str, float]) -> torch.Tensor:
        """The update direction of the shared parameters from per-task gradients.

        Args:
            gradients: ``(K, P)`` float32, row ``k`` the gradient of task ``task_names[k]``'s (unweighted) loss
                with respect to the ``P`` shared parameters, flattened (already averaged over ranks).
            losses: each task's loss value at this step.

        Returns:
            ``(P,)`` the combined gradient, on the same scale as the sum of the rows.
        """
        raise NotImplementedError(f"{type(self).__name__} is a loss-level method and combines no gradients")

    def log_dict(self) -> dict[str, float]:
        """Scalars for the training log, under ``weighting/`` by the caller."""
        return {f"weight/{task}": weight for task, weight in self.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


WEIGHTINGS: dict[str, type[TaskWeighting]] = {}

W = TypeVar("W", bound=type[TaskWeighting])


def register_weighting(cls: W) -> W:
    """Class decorator: make ``cls`` available as ``--weighting cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name (set the class attribute `name`)")
    if cls.name in WEIGHTINGS and WEIGHTINGS[cls.name] is not cls:
        raise ValueError(f"weighting name {cls.name!r} is taken by {WEIGHTINGS[cls.name].__name__}")
    WEIGHTINGS[cls.name] = cls
    return cls


def build_weighting(name: str, task_names: Sequence[str], **options: Any) -> TaskWeighting:
    """An instance of the method registered as ``name`` (options are its constructor's keyword arguments)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; registered: {sorted(WEIGHTINGS)}")
    factory: Callable[..., TaskWeighting] = WEIGHTINGS[name]
    return factory(task_names, **options)
