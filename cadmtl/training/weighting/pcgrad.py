"""PCGrad: project conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import TaskWeighting, register_weighting
from .gradients import combine_rows, prepare_gram


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, step)`` alone, so every rank draws the same numbers."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (1 << 62))


@register_weighting
class PCGrad(TaskWeighting):
    r"""PCGrad (Yu et al. 2020, arXiv:2001.06782).

    For each task ``i``, visit the other tasks ``j`` in a random order; whenever the (partly projected) ``g_i'``
    conflicts with the original ``g_j`` (``g_i' . g_j < 0``), remove the conflicting component::

        g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 * g_j

    and return ``sum_i g_i'`` (the sum scale of the interface; the paper also sums). Projections are made
    against the original ``g_j``, as in the paper's Algorithm 1 and LibMTL.

    Every ``g_i'`` lies in the span of the rows, so the projections are computed on the ``K x K`` Gram matrix
    (float64) as coefficients ``C`` with ``g_i' = sum_k C_ik g_k``; the result is one weighted sum of the rows.
    The orders are drawn from a generator seeded by ``(seed, call index)``: ranks calling once per step with the
    same all-reduced gradients agree, and the call index is checkpointed.
    """

    name = "pcgrad"
    needs_task_gradients = True

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names)
        self.seed = int(seed)
        self.num_combined = 0
        self.num_conflicts = 0  # projections made at the last call

    def orders(self, step: int) -> list[list[int]]:
        """For each task ``i``, the order in which the other tasks are visited at call ``step``."""
        generator = step_generator(self.seed, step)
        orders = []
        for i in range(self.num_tasks):
            others = [j for j in range(self.num_tasks) if j != i]
            perm = torch.randperm(len(others), generator=generator).tolist()
            orders.append([others[p] for p in perm])
        return orders

    def coefficients(self, gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
        """``(K,)`` float64 ``a`` with ``sum_i g_i' = sum_k a_k g_k``, from the Gram matrix and the orders."""
        coef = torch.eye(self.num_tasks, dtype=torch.float64)
        conflicts = 0
        for i, order in enumerate(orders):
            for j in order:
                dot = float(coef[i] @ gram[:, j])  # g_i' . g_j
                if dot < 0.0:  # g_j != 0 here, so ||g_j||^2 > 0
                    coef[i, j] -= dot / float(gram[j, j])
                    conflicts += 1
        self.num_conflicts = conflicts
        return coef.sum(0)

    def combine_gradients(self, gradients: torch.Tensor, losses: Mapping[str, float]) -> torch.Tensor:
        gram = prepare_gram(gradients, self.task_names, type(self).__name__)
        coef = self.coefficients(gram, self.orders(self.num_combined))
        self.num_combined += 1
        return combine_rows(gradients, coef)

    def log_dict(self) -> dict[str, float]:
        return {**super().log_dict(), "pcgrad/conflicts": float(self.num_conflicts)}

    def state_dict(self) -> dict[str, Any]:
        return {"num_combined": self.num_combined, "num_conflicts": self.num_conflicts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_combined = int(state["num_combined"])
        self.num_conflicts = int(state.get("num_conflicts", 0))
