"""Which task to train at each optimizer step, identical on every rank without communication.

In DDP every rank must run the same head at the same step, or the gradient all-reduce waits for parameters a
rank skipped. :meth:`TaskScheduler.sample` is therefore a pure function of ``(seed, step, weights)``: it reads
no global random state and does not depend on earlier draws, so ranks that hold the same CoBa weights (CoBa
is fed losses averaged over ranks) draw the same task, and a resumed run draws the same tasks as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cadmtl.training.weighting.base import check_task_names

logger = logging.getLogger(__name__)

SCHEDULER_MODES = ("adaptive", "round_robin", "single")


def uniform_from_seed_and_step(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, step)``.

    ``numpy.random.SeedSequence(seed, spawn_key=(step,))`` is the ``step``-th child of the seed's sequence:
    a documented, version-stable hash, so any process and any NumPy version get the same number.
    """
    (state,) = np.random.SeedSequence(seed, spawn_key=(step,)).generate_state(1, dtype=np.uint64)
    return int(state >> np.uint64(11)) * 2.0**-53


class TaskScheduler:
    """Draws the task of each optimizer step.

    Modes:

    * ``"adaptive"``: P(task) = softmax(w / T) over the task weights ``w`` (the CoBa weights, uniform until
      :meth:`set_weights` is called).
    * ``"round_robin"``: ``task_names[step % K]``, the paper's Base MTL; weights are stored but not used.
    * ``"single"``: single-task training; ``task_names`` must hold exactly that one task.

    :meth:`sample` is a pure function of ``(seed, step, weights)`` (see the module docstring), so every rank
    draws the same task at the same step as long as it holds the same weights.

    Args:
        task_names: The tasks, in a fixed order.
        temperature: T > 0. Lower values sharpen the distribution towards the largest weight. CoBa weights
            sum to 1, so with T = 1 the probabilities stay close to uniform.
        seed: Non-negative integer that, with the step, determines every draw.
        mode: One of ``"adaptive"``, ``"round_robin"``, ``"single"``.

    Example:
        >>> scheduler = TaskScheduler(["cls", "det", "seg"], temperature=0.2, seed=7)
        >>> scheduler.set_weights({"cls": 0.2, "det": 0.3, "seg": 0.5})
        >>> scheduler.sample(12) == scheduler.sample(12)
        True
    """

    def __init__(
        self, task_names: Sequence[str], temperature: float = 1.0, seed: int = 0, mode: str = "adaptive"
    ) -> None:
        self._task_names = check_task_names(task_names, owner="TaskScheduler")
        self._temperature = self._checked_temperature(temperature)
        self._seed = self._checked_seed(seed)
        self._mode = self._checked_mode(mode, self._task_names)
        self._weights = tuple(1.0 / len(self._task_names) for _ in self._task_names)
        self._probabilities = self._probabilities_of(self._weights)

    @staticmethod
    def _checked_temperature(temperature: float) -> float:
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        return float(temperature)

    @staticmethod
    def _checked_seed(seed: int) -> int:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return seed

    @staticmethod
    def _checked_mode(mode: str, task_names: tuple[str, ...]) -> str:
        if mode not in SCHEDULER_MODES:
            raise ValueError(f"mode must be one of {list(SCHEDULER_MODES)}, got {mode!r}")
        if mode == "single" and len(task_names) != 1:
            raise ValueError(
                f"mode='single' trains one task: pass only that task's name, got {list(task_names)}"
            )
        return mode

    # ------------------------------------------------------------------ properties

    @property
    def task_names(self) -> tuple[str, ...]:
        return self._task_names

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def weights(self) -> dict[str, float]:
        """The stored task weights (uniform until :meth:`set_weights`)."""
        return dict(zip(self._task_names, self._weights))

    @property
    def probabilities(self) -> dict[str, float]:
        """Probability of each task at a step: softmax(w / T) in ``"adaptive"`` mode; the long-run share
        of steps (uniform) in ``"round_robin"`` mode; 1 for the task in ``"single"`` mode."""
        return dict(zip(self._task_names, self._probabilities))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task_names={list(self._task_names)}, temperature={self._temperature}, "
            f"seed={self._seed}, mode={self._mode!r})"
        )

    # ------------------------------------------------------------------ weights and sampling

    def _validated_weights(self, weights: Mapping[str, float]) -> tuple[float, ...]:
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a mapping task -> weight, got {type(weights).__name__}")
        missing = [name for name in self._task_names if name not in weights]
        unknown = [name for name in weights if name not in self._task_names]
        if missing or unknown:
            raise ValueError(
                f"weights must name exactly the tasks {list(self._task_names)}; missing {missing}, "
                f"unknown {unknown}"
            )
        values = []
        for name in self._task_names:
            value = weights[name]
            if isinstance(value, (str, bytes, bool)):
                raise ValueError(f"weight of task {name!r} must be a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"weight of task {name!r} must be a number, got {value!r}") from error
            if not math.isfinite(number):
                raise ValueError(f"weight of task {name!r} must be finite, got {number}")
            values.append(number)
        return tuple(values)

    def _probabilities_of(self, weights: tuple[float, ...]) -> tuple[float, ...]:
        num_tasks = len(self._task_names)
        if self._mode == "single":
            return (1.0,)
        if self._mode == "round_robin":
            return tuple(1.0 / num_tasks for _ in range(num_tasks))
        # Plain Python floats in a fixed order: the same bits on every rank and every platform.
        logits = [weight / self._temperature for weight in weights]
        largest = max(logits)
        exponentials = [math.exp(logit - largest) for logit in logits]
        total = math.fsum(exponentials)
        return tuple(value / total for value in exponentials)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Store the task weights (e.g. ``coba.weights``) that :meth:`sample` uses from now on."""
        self._weights = self._validated_weights(weights)
        self._probabilities = self._probabilities_of(self._weights)

    def sample(self, step: int, weights: Mapping[str, float] | None = None) -> str:
        """The task to train at ``step``.

        Args:
            step: Non-negative optimizer step (the global step, the same number on every rank).
            weights: Use these weights for this draw instead of the stored ones (the stored ones are left
                unchanged).

        Returns:
            A task name; the same for the same ``(seed, step, weights)`` whatever was drawn before.
        """
        try:
            step = operator.index(step)
        except TypeError as error:
            raise ValueError(f"step must be an integer, got {step!r}") from error
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._mode == "single":
            return self._task_names[0]
        if self._mode == "round_robin":
            return self._task_names[step % len(self._task_names)]
        probabilities = (
            self._probabilities
            if weights is None
            else self._probabilities_of(self._validated_weights(weights))
        )
        threshold = uniform_from_seed_and_step(self._seed, step)
        cumulative = 0.0
        for name, probability in zip(self._task_names, probabilities):
            cumulative += probability
            if threshold < cumulative:
                return name
        # Rounding can leave the cumulative sum a hair below 1.
        return self._task_names[-1]

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Tasks, weights, temperature, seed and mode as plain Python values (``torch.save`` and
        Accelerate's ``register_for_checkpointing`` accept it)."""
        return {
            "task_names": list(self._task_names),
            "weights": list(self._weights),
            "temperature": self._temperature,
            "seed": self._seed,
            "mode": self._mode,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        The task names must match. Temperature, seed and mode are taken from the checkpoint (so a resumed
        run draws the same tasks), with a warning for each one that differs from this object's.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"TaskScheduler.load_state_dict expects a mapping, got {type(state_dict).__name__}"
            )
        missing_keys = sorted({"task_names", "weights", "temperature", "seed", "mode"} - set(state_dict))
        if missing_keys:
            raise ValueError(f"TaskScheduler state is missing the keys {missing_keys}")
        task_names = tuple(state_dict["task_names"])
        if task_names != self._task_names:
            raise ValueError(
                f"TaskScheduler state was saved for the tasks {list(task_names)}, this scheduler has "
                f"{list(self._task_names)}"
            )
        temperature = self._checked_temperature(state_dict["temperature"])
        seed = self._checked_seed(state_dict["seed"])
        mode = self._checked_mode(state_dict["mode"], task_names)
        for key, value in (("temperature", temperature), ("seed", seed), ("mode", mode)):
            if value != getattr(self, key):
                logger.warning(
                    "TaskScheduler: %s=%r from the checkpoint replaces %r given to the constructor",
                    key,
                    value,
                    getattr(self, key),
                )
        if len(state_dict["weights"]) != len(task_names):
            raise ValueError("TaskScheduler state 'weights' does not have one value per task")
        weights = self._validated_weights(dict(zip(task_names, state_dict["weights"])))
        self._temperature, self._seed, self._mode = temperature, seed, mode
        self._weights = weights
        self._probabilities = self._probabilities_of(weights)
