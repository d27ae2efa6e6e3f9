"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .base import TaskWeighting, register_weighting
from .gradients import combine_rows, prepare_gram

RESCALES = (0, 1, 2)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` onto ``{w >= 0, sum w = 1}`` (sort-based, Held et al. 1974)."""
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1.0
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int((u - css / idx > 0).nonzero().max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def solve_cagrad_dual(
    gram: torch.Tensor, c: float, max_iter: int = 500, tol: float = 1e-10, eps: float = 1e-12
) -> torch.Tensor:
    """``argmin_{w in simplex} F(w)``, ``F(w) = g_w . g_0 + c ||g_w||`` on the Gram matrix (``g_w = G^T w``,
    ``g_0`` the mean row), by projected gradient descent with Armijo backtracking (float64).

    ``gram`` should be normalised (mean diagonal 1) so ``eps`` (smoothing of the norm at ``g_w = 0``) and the
    initial step are scale-free; ``c`` is ``calpha * ||g_0||`` in the same units. Stops when ``w`` stops moving
    or ``F`` stops decreasing beyond rounding (typically 10-30 iterations for K=3). Deterministic.
    """
    k = gram.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if k == 1:
        return w
    mean_row = gram.sum(1) / k

    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        gx = gram @ x
        norm = float((x @ gx + eps).sqrt())
        return float(x @ mean_row) + c * norm, mean_row + (c / norm) * gx

    value, grad = value_and_grad(w)
    step = 1.0
    for _ in range(max_iter):
        while True:
            candidate = project_to_simplex(w - step * grad)
            diff = candidate - w
            new_value, new_grad = value_and_grad(candidate)
            if new_value <= value + float(grad @ diff) + float(diff @ diff) / (2 * step) + 1e-15:
                break
            step *= 0.5
            if step < 1e-20:
                return w
        moved, decrease = float(diff.abs().max()), value - new_value
        w, value, grad = candidate, new_value, new_grad
        # F is flat (quadratic) at the minimum: once it stops decreasing beyond rounding, w is within ~1e-8
        if moved < tol or decrease <= 1e-14 * max(abs(value), 1e-300):
            break
        step = min(step * 2.0, 1e6)
    return w


@register_weighting
class CAGrad(TaskWeighting):
    r"""CAGrad (Liu et al. 2021, arXiv:2110.14048), following the official code and LibMTL's port.

    With ``g_0`` the mean task gradient and ``g_w = sum_k w_k g_k``, solve the dual on the ``K x K`` Gram matrix::

        w* = argmin_{w in simplex}  g_w . g_0 + sqrt(phi) ||g_w||,      phi = c^2 ||g_0||^2

    then ``d = g_0 + sqrt(phi) / ||g_w*|| * g_w*``, rescaled like the official ``rescale`` option (``1``, the
    default: ``d / (1 + c^2)``; ``2``: ``d / (1 + c)``; ``0``: none). The official code returns this on the
    *mean* scale (``g_0``); here it is multiplied by ``K`` to match the interface's sum scale (with all
    gradients equal, ``rescale=0`` and ``c=0`` give exactly their sum).

    The dual is solved without scipy: projected gradient descent with backtracking in float64 on the Gram
    matrix normalised to unit mean diagonal (the minimiser is invariant to that scale). If ``g_w* = 0`` (a
    Pareto-stationary point inside the ball) the correction term is dropped, ``d = g_0``. Stateless.
    """

    name = "cagrad"
    needs_task_gradients = True

    def __init__(
        self, task_names: Sequence[str], c: float = 0.4, rescale: int = 1, max_iter: int = 500
    ) -> None:
        super().__init__(task_names)
        if not (c >= 0.0 and math.isfinite(c)):
            raise ValueError(f"CAGrad c must be a finite number >= 0, got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"CAGrad rescale must be one of {RESCALES}, got {rescale}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.max_iter = int(max_iter)
        self.last_w = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """``(K,)`` float64 ``a`` with the update ``sum_k a_k g_k`` (sum scale), from the Gram matrix."""
        k = self.num_tasks
        scale = float(gram.diagonal().mean())
        if scale <= 0.0:  # every gradient is zero
            return torch.zeros(k, dtype=torch.float64)
        gram = gram / scale
        g0_norm = math.sqrt(max(float(gram.sum()) / k**2, 0.0))
        c = self.c * g0_norm
        w = solve_cagrad_dual(gram, c, max_iter=self.max_iter)
        self.last_w = w
        gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        lam = c / gw_norm if gw_norm > 1e-12 else 0.0
        coef = torch.full((k,), 1.0 / k, dtype=torch.float64) + lam * w
        if self.rescale == 1:
            coef = coef / (1.0 + self.c**2)
        elif self.rescale == 2:
            coef = coef / (1.0 + self.c)
        return coef * k

    def combine_gradients(self, gradients: torch.Tensor, losses: Mapping[str, float]) -> torch.Tensor:
        gram = prepare_gram(gradients, self.task_names, type(self).__name__)
        return combine_rows(gradients, self.coefficients(gram))

    def log_dict(self) -> dict[str, float]:
        dual = {f"cagrad/w/{t}": float(w) for t, w in zip(self.task_names, self.last_w.tolist())}
        return {**super().log_dict(), **dual}
