"""FAMO: fast adaptive multitask optimization (Liu et al., "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import TaskWeighting, register_weighting

EPS = 1e-8  # the official code's offset inside every log


@register_weighting
class FAMO(TaskWeighting):
    r"""FAMO (Liu et al. 2023, arXiv:2306.03792): loss-level, O(1) extra cost per step.

    Logits ``xi`` (``K``, zero at start), task weights ``z = softmax(xi)``. The model descends
    ``sum_k z_k log(l_k - m_k + eps) / c`` with ``c = sum_k z_k / (l_k - m_k + eps)`` (``m`` the loss lower
    bounds, default 0), whose gradient is ``sum_k w_k grad l_k`` with the convex weights::

        w_k = (z_k / (l_k - m_k + eps)) / sum_j (z_j / (l_j - m_j + eps))

    After the update, with ``delta_k = log(l_k^t - m_k + eps) - log(l_k^{t+1} - m_k + eps)`` (the log-loss
    decrease), the logits take one Adam step (lr ``lr``, L2 weight decay ``gamma``, betas (0.9, 0.999), as in
    the official code and LibMTL) on the gradient ``J_softmax(xi)^T delta``: tasks whose loss fell less than
    the z-weighted average gain weight.

    Two adaptations to this interface (documented, deliberate):

    * :attr:`weights` publishes ``w`` above, not ``z``: the step scales *raw* losses by ``K * w_k``, and the
      log-loss balancing is FAMO's point (a detection loss 10x the classification loss must not get 10x the
      gradient). ``w`` uses each task's last observed loss, i.e. the previous step's in place of the current
      batch's (``w = z`` until every task has been seen). ``z`` is :attr:`task_weights`, logged as
      ``famo/z/TASK``.
    * The official code (and LibMTL's trainer) recomputes the losses of the *same* batch after the optimizer
      step for ``l^{t+1}``, an extra forward. Here ``l^t, l^{t+1}`` are consecutive steps' rank-averaged
      training losses from :meth:`observe_train_losses` (different batches: noisier, no extra forward). An
      update needs every task in both observations (under task sampling, steps missing a task are skipped and
      counted); non-finite losses are rejected.
    """

    name = "famo"
    needs_train_losses = True

    def __init__(
        self,
        task_names: Sequence[str],
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | Sequence[float] = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        super().__init__(task_names)
        k = self.num_tasks
        mins = (
            [float(min_losses)] * k
            if isinstance(min_losses, (int, float))
            else [float(m) for m in min_losses]
        )
        if len(mins) != k:
            raise ValueError(f"FAMO min_losses needs one value per task ({k}), got {len(mins)}")
        if not (lr > 0 and gamma >= 0):
            raise ValueError(f"FAMO needs lr > 0 and gamma >= 0, got lr={lr}, gamma={gamma}")
        self.lr, self.gamma = float(lr), float(gamma)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.min_losses = torch.tensor(mins, dtype=torch.float64)
        self.logits = torch.zeros(k, dtype=torch.float64)
        self.exp_avg = torch.zeros(k, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(k, dtype=torch.float64)
        self.num_updates = 0
        self.num_skipped = 0
        self.prev_losses: torch.Tensor | None = (
            None  # (K,) the last observation with every task, to difference
        )
        self.seen_losses = torch.full((k,), math.nan, dtype=torch.float64)  # each task's latest loss

    @property
    def task_weights(self) -> dict[str, float]:
        """FAMO's ``z = softmax(xi)`` (the weights of the log-losses)."""
        return dict(zip(self.task_names, torch.softmax(self.logits, 0).tolist()))

    @property
    def weights(self) -> dict[str, float]:
        z = torch.softmax(self.logits, 0)
        if not bool(self.seen_losses.isnan().any()):
            z = z / self._shifted(self.seen_losses)
            z = z / z.sum()
        return dict(zip(self.task_names, z.tolist()))

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return (losses - self.min_losses).clamp_min(0.0) + EPS

    def logit_gradient(self, delta: torch.Tensor) -> torch.Tensor:
        """``J_softmax(xi)^T delta = z * (delta - z . delta)``."""
        z = torch.softmax(self.logits, 0)
        return z * (delta - z @ delta)

    def observe_train_losses(self, step: int, losses: Mapping[str, float]) -> None:
        present = [k for k, name in enumerate(self.task_names) if name in losses]
        values = {k: float(losses[self.task_names[k]]) for k in present}
        bad = [self.task_names[k] for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"FAMO: non-finite training loss for task(s) {bad} at step {step}")
        for k, v in values.items():
            self.seen_losses[k] = v
        if len(present) < self.num_tasks:
            self.num_skipped += 1  # cannot difference a task that did not run; the next full step restarts
            self.prev_losses = None
            return
        current = self.seen_losses.clone()
        if self.prev_losses is not None:
            delta = self._shifted(self.prev_losses).log() - self._shifted(current).log()
            self._adam_step(self.logit_gradient(delta))
        self.prev_losses = current

    def _adam_step(self, grad: torch.Tensor) -> None:
        """One step of torch.optim.Adam (L2 weight decay, no amsgrad) on the logits, in float64."""
        beta1, beta2 = self.betas
        grad = grad + self.gamma * self.logits
        self.num_updates += 1
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self.num_updates
        bias2 = 1 - beta2**self.num_updates
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.adam_eps)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)

    def log_dict(self) -> dict[str, float]:
        z = {f"famo/z/{t}": v for t, v in self.task_weights.items()}
        return {**super().log_dict(), **z, "famo/skipped": float(self.num_skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "seen_losses": self.seen_losses.clone(),
            "has_prev_losses": self.prev_losses is not None,
            "prev_losses": torch.zeros(self.num_tasks, dtype=torch.float64)
            if self.prev_losses is None
            else self.prev_losses.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        k = self.num_tasks
        for key in ("logits", "exp_avg", "exp_avg_sq", "seen_losses"):
            value = torch.as_tensor(state[key], dtype=torch.float64)
            if value.shape != (k,):
                raise ValueError(f"FAMO state {key!r} must have shape ({k},), got {tuple(value.shape)}")
            setattr(self, key, value.clone())
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state.get("num_skipped", 0))
        has_prev = bool(state["has_prev_losses"])
        self.prev_losses = (
            torch.as_tensor(state["prev_losses"], dtype=torch.float64).clone() if has_prev else None
        )
