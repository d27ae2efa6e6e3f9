"""CoBa (Convergence Balancer) task weights for multi-task training.

CoBa (Gong et al., EMNLP 2024, arXiv 2410.06741) balances tasks by how fast their *validation* losses
converge. This module follows the official implementation (``CoBaStatus`` in codefuse-ai/MFTCoder,
``mftcoder_accelerate/src/utils/loss_utils.py``) as documented in ``docs/coba.md`` of the shared notes, with
the paper's clamp of the divergence factor as the default and the guards the official code lacks.

Time unit: one :meth:`CoBa.update` call is one time step. The official code only behaves with
``coba_update_interval=1`` (one evaluation per optimizer step); our trainer evaluates every ``coba_every``
optimizer steps, so slopes are "loss ratio per update call" and ``history_length`` / ``warmup_steps`` count
update calls, not optimizer steps.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cadmtl.training.weighting.base import TaskWeighting, check_task_names, register_weighting

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass(frozen=True)
class CoBaScores:
    """Diagnostics of one CoBa weight computation (what the weights were made of).

    Attributes:
        update: Index of the :meth:`CoBa.update` call (1-based) that produced these scores.
        slopes: Per task, the least-squares slope of its validation-loss ratio over the window (α_i).
        max_ratio_slope: Slope of the element-wise maximum of the ratio curves over the window (β).
        rcs: Relative convergence score per task (more weight to slower-converging tasks).
        acs: Absolute convergence score per task (less weight to a task whose slope turned positive).
        divergence_factor: The DF used to mix RCS and ACS (clamped to [0, 1] when ``clamp_divergence``).
        raw_divergence_factor: DF before the clamp, as the official code computes it (in (0, n)).
        weights: Final task weights (sum 1).
        floor_applied: Whether the 1/(10K) minimum-weight floor lifted the weights.
    """

    update: int
    slopes: dict[str, float]
    max_ratio_slope: float
    rcs: dict[str, float]
    acs: dict[str, float]
    divergence_factor: float
    raw_divergence_factor: float
    weights: dict[str, float]
    floor_applied: bool

    def to_log_dict(self, prefix: str = "coba/") -> dict[str, float]:
        """Flat ``{name: number}`` dict for trackers, e.g. ``{"coba/weight/cls": 0.4, "coba/df": 1.0}``."""
        logs: dict[str, float] = {
            f"{prefix}df": self.divergence_factor,
            f"{prefix}df_raw": self.raw_divergence_factor,
            f"{prefix}max_ratio_slope": self.max_ratio_slope,
            f"{prefix}floor_applied": float(self.floor_applied),
        }
        for group, values in (
            ("weight", self.weights),
            ("slope", self.slopes),
            ("rcs", self.rcs),
            ("acs", self.acs),
        ):
            for task, value in values.items():
                logs[f"{prefix}{group}/{task}"] = value
        return logs

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (for ``state_dict``)."""
        return {
            "update": self.update,
            "slopes": dict(self.slopes),
            "max_ratio_slope": self.max_ratio_slope,
            "rcs": dict(self.rcs),
            "acs": dict(self.acs),
            "divergence_factor": self.divergence_factor,
            "raw_divergence_factor": self.raw_divergence_factor,
            "weights": dict(self.weights),
            "floor_applied": self.floor_applied,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def _divide_by_abs_sum(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``values / Σ|values|``, with 0 where the sum is 0 (the official code's 0/0 NaN on flat histories)."""
    abs_sum = np.abs(values).sum(axis=axis, keepdims=axis is not None)
    safe_sum = np.where(abs_sum > 0, abs_sum, 1.0)
    return np.where(abs_sum > 0, values / safe_sum, 0.0)


def window_slope(ratios: np.ndarray, close_up_zeros: bool = False) -> float:
    """Ordinary least-squares slope of ``ratios`` against their index (one unit per update call).

    A ratio of exactly 0 means "no measurement" in the official code (a task absent from the validation
    batch) and is left out of the fit. The official code then pairs the remaining values with the *first*
    x positions (``close_up_zeros=True``), which shifts every later point left and biases the slope; by
    default the remaining values keep their true positions. Fewer than 2 usable points give a slope of 0.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    positions = np.arange(len(ratios), dtype=np.float64)
    measured = ratios != 0
    values = ratios[measured]
    positions = positions[: len(values)] if close_up_zeros else positions[measured]
    if len(values) < 2:
        return 0.0
    centred = positions - positions.mean()
    # Centred closed form: same slope as the official normal equations, without their cancellation.
    return float(np.dot(centred, values - values.mean()) / np.dot(centred, centred))


class CoBa:
    """Convergence Balancer: per-task weights from the convergence speed of validation losses.

    Call :meth:`update` once per CoBa evaluation with each task's loss on a small held-out batch
    (averaged over ranks, so every rank computes the same weights):

    * **Call 1** stores each task's reference loss ℓ_i(0) and adds **no** history point. This mirrors the
      official code, where ℓ_i(0) comes from a validation pass before training and the sample taken at step
      0 is thrown away: a first point would be the ratio 1.0 by construction and carry no information. Pass
      the losses of a fuller validation pass here if you have them.
    * **Call n ≥ 2** appends the ratio r_i = ℓ_i / ℓ_i(0) as history point n − 1.
    * **Warm-up:** while fewer than ``warmup_steps`` update calls happened (calls 1 .. W−1) the weights
      are uniform. From call W on, each call recomputes the weights; call W uses the W − 1 history points
      there are, exactly as the official code's first update at step c = W uses c − 1 points.

    Each weight computation (official ``compute_per_task_weight``):

    1. α_i = OLS slope of task i's ratios over the last min(H, available) points; β = OLS slope of the
       element-wise maximum over tasks of the ratio curves over the same window (float64).
    2. RCS = softmax_i(K α_i / Σ_j |α_j|): slower-converging (or diverging) tasks get more.
    3. ACS = softmax_i(−M α_i / Σ_{last M slopes of task i} |α_i(j)|) with M = min(n − W + 1, H − W + 1)
       (the official window of slopes, not H).
    4. DF = m · softmax_j(τ · (−m β_j / Σ_k |β_k|))[last] over **all** m = n − W + 1 β values so far; the
       paper clamps it to [0, 1] (``clamp_divergence=True``, default), the official code does not.
    5. w = softmax(K (DF · RCS + (1 − DF) · ACS)); if any w_i < 1/(10K): w ← w (1 − 1/10) + 1/(10K).

    Guards the official code lacks: a 0/0 normalisation (all slopes exactly 0, e.g. flat losses) gives 0
    logits, so RCS is uniform, the task's ACS logit is 0 and DF is 1 (its limit when all β are equal).

    Only the last H ratio points and the last H − W + 1 slope vectors are kept (all the formulas read);
    the β history is kept whole because DF reads all of it.

    Args:
        task_names: Names of the tasks, in a fixed order (weights are reported in this order).
        history_length: H, the slope window in update calls (official default 200; the official README
            recommends 2W to 5W, larger giving smoother weights).
        warmup_steps: W, update calls with uniform weights (official default 100, at least 3 so the first
            slope has 2 points).
        tau: τ, temperature of the divergence factor's softmax (official default 5).
        clamp_divergence: Clamp DF to [0, 1] as in the paper. ``False`` gives the official unclamped DF,
            which can exceed 1 when the max-ratio curve speeds up (then 1 − DF < 0 extrapolates).
        close_up_zeros: Reproduce the official x close-up for zero ratios (see :func:`window_slope`).

    Example:
        >>> coba = CoBa(["cls", "det", "seg"], history_length=20, warmup_steps=5)
        >>> for step in range(30):
        ...     weights = coba.update({"cls": 1 / (1 + step), "det": 1 / (1 + 0.1 * step), "seg": 1.0})
        >>> round(sum(weights.values()), 6)
        1.0
    """

    def __init__(
        self,
        task_names: Sequence[str],
        history_length: int = 200,
        warmup_steps: int = 100,
        tau: float = 5.0,
        clamp_divergence: bool = True,
        close_up_zeros: bool = False,
    ) -> None:
        task_names = check_task_names(task_names, owner="CoBa")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 3:
            raise ValueError(
                f"warmup_steps must be an integer >= 3 (the first slope needs 2 history points after the "
                f"reference call), got {warmup_steps!r}"
            )
        if not isinstance(history_length, int) or isinstance(history_length, bool):
            raise ValueError(f"history_length must be an integer, got {history_length!r}")
        if history_length < warmup_steps:
            raise ValueError(
                f"history_length ({history_length}) must be >= warmup_steps ({warmup_steps}): the ACS "
                f"window holds history_length - warmup_steps + 1 slopes"
            )
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")

        self._task_names = task_names
        self.history_length = history_length
        self.warmup_steps = warmup_steps
        self.tau = float(tau)
        self.clamp_divergence = bool(clamp_divergence)
        self.close_up_zeros = bool(close_up_zeros)
        self._reset_state()

    def _reset_state(self) -> None:
        num_tasks = len(self._task_names)
        self._num_updates = 0
        self._reference_losses: tuple[float, ...] | None = None
        self._ratio_history: deque[tuple[float, ...]] = deque(maxlen=self.history_length)
        self._slope_history: deque[tuple[float, ...]] = deque(
            maxlen=self.history_length - self.warmup_steps + 1
        )
        # Grown by doubling: DF reads every β since warm-up, once per update.
        self._max_slope_buffer = np.zeros(64, dtype=np.float64)
        self._num_max_slopes = 0
        self._weights = tuple(1.0 / num_tasks for _ in range(num_tasks))
        self._zero_loss_counts = [0] * num_tasks
        self._last_scores: CoBaScores | None = None

    # ------------------------------------------------------------------ properties

    @property
    def task_names(self) -> tuple[str, ...]:
        return self._task_names

    @property
    def num_updates(self) -> int:
        """Number of :meth:`update` calls so far (the reference call included)."""
        return self._num_updates

    @property
    def is_warming_up(self) -> bool:
        """True while the weights are the uniform warm-up weights (fewer than ``warmup_steps`` updates)."""
        return self._num_updates < self.warmup_steps

    @property
    def reference_losses(self) -> dict[str, float] | None:
        """ℓ_i(0) per task, set by the first :meth:`update` call (None before)."""
        if self._reference_losses is None:
            return None
        return dict(zip(self._task_names, self._reference_losses))

    @property
    def weights(self) -> dict[str, float]:
        """Current task weights (sum 1); uniform during warm-up."""
        return dict(zip(self._task_names, self._weights))

    @property
    def last_scores(self) -> CoBaScores | None:
        """Slopes, RCS, ACS and DF of the latest weight computation (None during warm-up)."""
        return self._last_scores

    @property
    def zero_loss_counts(self) -> dict[str, int]:
        """Per task, how many validation losses were exactly 0 and so left out of the slope fits."""
        return dict(zip(self._task_names, self._zero_loss_counts))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task_names={list(self._task_names)}, history_length={self.history_length}, "
            f"warmup_steps={self.warmup_steps}, tau={self.tau}, clamp_divergence={self.clamp_divergence}, "
            f"close_up_zeros={self.close_up_zeros}, num_updates={self._num_updates})"
        )

    # ------------------------------------------------------------------ update

    def _validated_losses(self, val_losses: Mapping[str, float]) -> tuple[float, ...]:
        if not isinstance(val_losses, Mapping):
            raise ValueError(
                f"update() expects a mapping task -> validation loss, got {type(val_losses).__name__}"
            )
        missing = [name for name in self._task_names if name not in val_losses]
        unknown = [name for name in val_losses if name not in self._task_names]
        if missing or unknown:
            raise ValueError(
                f"update() needs a validation loss for exactly the tasks {list(self._task_names)}; "
                f"missing {missing}, unknown {unknown}"
            )
        losses = []
        for name in self._task_names:
            value = val_losses[name]
            if isinstance(value, (str, bytes, bool)):
                raise ValueError(f"validation loss of task {name!r} must be a number, got {value!r}")
            try:
                loss = float(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"validation loss of task {name!r} must be a number, got {value!r}"
                ) from error
            if not math.isfinite(loss) or loss < 0:
                raise ValueError(
                    f"validation loss of task {name!r} must be finite and >= 0, got {loss} "
                    f"(update call {self._num_updates + 1})"
                )
            losses.append(loss)
        if self._reference_losses is None:
            non_positive = {name: loss for name, loss in zip(self._task_names, losses) if loss <= 0}
            if non_positive:
                raise ValueError(
                    f"the first update() call sets the reference losses l_i(0), which must be > 0 to "
                    f"divide by; got {non_positive}"
                )
        return tuple(losses)

    def update(self, val_losses: Mapping[str, float]) -> dict[str, float]:
        """Record one evaluation of every task's validation loss and return the current weights.

        Args:
            val_losses: Loss of each task on the held-out batch, for exactly the tasks in ``task_names``
                (finite, >= 0; > 0 on the first call). A loss of exactly 0 is counted in
                :attr:`zero_loss_counts` and left out of the slope fits, as in the official code.

        Returns:
            The task weights after this call (uniform during warm-up), summing to 1.
        """
        losses = self._validated_losses(val_losses)
        self._num_updates += 1
        if self._reference_losses is None:
            self._reference_losses = losses
        else:
            for index, loss in enumerate(losses):
                if loss == 0:
                    self._zero_loss_counts[index] += 1
                    if self._zero_loss_counts[index] == 1:  # once per task; zero_loss_counts keeps the tally
                        logger.warning(
                            "CoBa: validation loss of task %r is 0 at update %d; zero losses are left out of "
                            "the slope fit and counted in CoBa.zero_loss_counts",
                            self._task_names[index],
                            self._num_updates,
                        )
            self._ratio_history.append(
                tuple(loss / reference for loss, reference in zip(losses, self._reference_losses))
            )
        if self._num_updates >= self.warmup_steps:
            self._compute_weights()
        return self.weights

    def _append_max_slope(self, slope: float) -> np.ndarray:
        if self._num_max_slopes == len(self._max_slope_buffer):
            self._max_slope_buffer = np.concatenate(
                [self._max_slope_buffer, np.zeros_like(self._max_slope_buffer)]
            )
        self._max_slope_buffer[self._num_max_slopes] = slope
        self._num_max_slopes += 1
        return self._max_slope_buffer[: self._num_max_slopes]

    def _compute_weights(self) -> None:
        num_tasks = len(self._task_names)
        ratios = np.asarray(self._ratio_history, dtype=np.float64)  # (points, tasks)
        slopes = np.array(
            [window_slope(ratios[:, task], self.close_up_zeros) for task in range(num_tasks)],
            dtype=np.float64,
        )
        max_ratio_slope = window_slope(ratios.max(axis=1), self.close_up_zeros)
        self._slope_history.append(tuple(slopes.tolist()))
        max_slopes = self._append_max_slope(max_ratio_slope)

        rcs = _softmax(num_tasks * _divide_by_abs_sum(slopes))

        slope_window = np.asarray(self._slope_history, dtype=np.float64)  # (M, tasks)
        acs_logits = -len(slope_window) * _divide_by_abs_sum(slope_window, axis=0)[-1]
        acs = _softmax(acs_logits)

        num_max_slopes = len(max_slopes)
        divergence_logits = self.tau * (-num_max_slopes * _divide_by_abs_sum(max_slopes))
        raw_divergence_factor = float(num_max_slopes * _softmax(divergence_logits)[-1])
        divergence_factor = (
            min(raw_divergence_factor, 1.0) if self.clamp_divergence else raw_divergence_factor
        )

        weights = _softmax(num_tasks * (divergence_factor * rcs + (1.0 - divergence_factor) * acs))
        minimum_weight = 1.0 / (10 * num_tasks)
        floor_applied = bool((weights < minimum_weight).any())
        if floor_applied:
            weights = weights * (1.0 - minimum_weight * num_tasks) + minimum_weight

        self._weights = tuple(weights.tolist())
        names = self._task_names
        self._last_scores = CoBaScores(
            update=self._num_updates,
            slopes=dict(zip(names, slopes.tolist())),
            max_ratio_slope=max_ratio_slope,
            rcs=dict(zip(names, rcs.tolist())),
            acs=dict(zip(names, acs.tolist())),
            divergence_factor=divergence_factor,
            raw_divergence_factor=raw_divergence_factor,
            weights=self.weights,
            floor_applied=floor_applied,
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically, as plain Python values.

        Accepted by ``torch.save`` / ``torch.load(weights_only=True)`` and by Accelerate's
        ``register_for_checkpointing``.
        """
        return {
            "version": _STATE_VERSION,
            "task_names": list(self._task_names),
            "history_length": self.history_length,
            "warmup_steps": self.warmup_steps,
            "tau": self.tau,
            "clamp_divergence": self.clamp_divergence,
            "close_up_zeros": self.close_up_zeros,
            "num_updates": self._num_updates,
            "reference_losses": None if self._reference_losses is None else list(self._reference_losses),
            "ratio_history": [list(point) for point in self._ratio_history],
            "slope_history": [list(slopes) for slopes in self._slope_history],
            "max_slope_history": self._max_slope_buffer[: self._num_max_slopes].tolist(),
            "weights": list(self._weights),
            "zero_loss_counts": list(self._zero_loss_counts),
            "last_scores": None if self._last_scores is None else self._last_scores.to_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the run then continues exactly as the saved one would have.

        The task names must match. Hyperparameters (H, W, τ, clamp, zero handling) are taken from the
        checkpoint, like ``torch.optim`` does, with a warning for each one that differs from this object's.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"CoBa.load_state_dict expects a mapping, got {type(state_dict).__name__}")
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported CoBa state version {version!r} (this code reads {_STATE_VERSION})")
        expected_keys = set(self.state_dict())
        missing_keys = sorted(expected_keys - set(state_dict))
        if missing_keys:
            raise ValueError(f"CoBa state is missing the keys {missing_keys}")
        task_names = tuple(state_dict["task_names"])
        if task_names != self._task_names:
            raise ValueError(
                f"CoBa state was saved for the tasks {list(task_names)}, this CoBa has {list(self._task_names)}"
            )
        for key in ("history_length", "warmup_steps", "tau", "clamp_divergence", "close_up_zeros"):
            if state_dict[key] != getattr(self, key):
                logger.warning(
                    "CoBa: %s=%r from the checkpoint replaces %r given to the constructor",
                    key,
                    state_dict[key],
                    getattr(self, key),
                )
        # Validate through the constructor so a corrupted state cannot give an impossible configuration.
        restored = type(self)(
            task_names,
            history_length=int(state_dict["history_length"]),
            warmup_steps=int(state_dict["warmup_steps"]),
            tau=float(state_dict["tau"]),
            clamp_divergence=bool(state_dict["clamp_divergence"]),
            close_up_zeros=bool(state_dict["close_up_zeros"]),
        )
        num_tasks = len(task_names)

        def rows(key: str) -> list[tuple[float, ...]]:
            values = [tuple(float(value) for value in row) for row in state_dict[key]]
            if any(len(row) != num_tasks for row in values):
                raise ValueError(f"CoBa state {key!r} has rows that do not have one value per task")
            return values

        restored._num_updates = int(state_dict["num_updates"])
        reference = state_dict["reference_losses"]
        restored._reference_losses = None if reference is None else tuple(float(value) for value in reference)
        restored._ratio_history.extend(rows("ratio_history"))
        restored._slope_history.extend(rows("slope_history"))
        for slope in state_dict["max_slope_history"]:
            restored._append_max_slope(float(slope))
        restored._weights = tuple(float(value) for value in state_dict["weights"])
        restored._zero_loss_counts = [int(count) for count in state_dict["zero_loss_counts"]]
        scores = state_dict["last_scores"]
        restored._last_scores = None if scores is None else CoBaScores(**scores)
        if len(restored._weights) != num_tasks or len(restored._zero_loss_counts) != num_tasks:
            raise ValueError("CoBa state 'weights' / 'zero_loss_counts' do not have one value per task")
        expected_points = max(0, restored._num_updates - 1)
        if len(restored._ratio_history) != min(expected_points, restored.history_length):
            raise ValueError(
                f"CoBa state is inconsistent: {restored._num_updates} updates but "
                f"{len(restored._ratio_history)} stored ratio points"
            )
        expected_slopes = max(0, restored._num_updates - restored.warmup_steps + 1)
        if restored._num_max_slopes != expected_slopes or len(restored._slope_history) != min(
            expected_slopes, restored.history_length - restored.warmup_steps + 1
        ):
            raise ValueError(
                f"CoBa state is inconsistent: {restored._num_updates} updates but "
                f"{restored._num_max_slopes} stored max-ratio slopes and {len(restored._slope_history)} "
                f"stored task slopes"
            )
        self.__dict__.update(restored.__dict__)


@register_weighting
class CoBaWeighting(TaskWeighting):
    """CoBa behind the task-weighting interface: weights from held-out loss convergence (see :class:`CoBa`).

    :meth:`update` is called every ``coba_every`` optimizer steps with each task's loss on fixed held-out batches
    (averaged over ranks); the weights scale the losses (``--all_tasks_per_step``) or set the task scheduler's
    sampling probabilities (the paper's adaptive paradigm).
    """

    name = "coba"
    needs_held_out_losses = True

    def __init__(
        self,
        task_names: Sequence[str],
        history_length: int = 200,
        warmup_steps: int = 100,
        tau: float = 5.0,
        clamp_divergence: bool = True,
        close_up_zeros: bool = False,
    ) -> None:
        super().__init__(task_names)
        self.coba = CoBa(
            self.task_names,
            history_length=history_length,
            warmup_steps=warmup_steps,
            tau=tau,
            clamp_divergence=clamp_divergence,
            close_up_zeros=close_up_zeros,
        )

    @property
    def weights(self) -> dict[str, float]:
        return self.coba.weights

    def update(self, step: int, held_out_losses: Mapping[str, float] | None = None) -> dict[str, float]:
        if held_out_losses is None:
            raise ValueError(
                f"CoBa needs held-out losses of {list(self.task_names)} at step {step}, got None"
            )
        return self.coba.update(held_out_losses)

    def log_dict(self) -> dict[str, float]:
        record = super().log_dict()
        if self.coba.last_scores is not None:
            record.update(self.coba.last_scores.to_log_dict(prefix=""))
        return record

    def state_dict(self) -> dict[str, Any]:
        return self.coba.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coba.load_state_dict(state)
