"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import TaskWeighting, register_weighting
from .gradients import combine_rows, prepare_gram


@register_weighting
class AlignedMTL(TaskWeighting):
    r"""Aligned-MTL (Senushkin et al. 2023, arXiv:2305.19000), as in the official code and LibMTL.

    With ``G`` the ``(K, P)`` task gradients and ``M = G G^T = V diag(lambda) V^T`` (eigenvalues above
    ``lambda_max * K * eps_float32`` only, rank ``r``), the aligned gradients are ``G_hat = B G`` with::

        B = sqrt(lambda_min) * V diag(lambda)^(-1/2) V^T      (lambda_min: the smallest kept eigenvalue)

    so ``G_hat G_hat^T = lambda_min * I`` on the span: the rows become orthogonal with equal norm
    ``sqrt(lambda_min)`` (the smallest singular value of ``G``), i.e. condition number 1. The update is the sum
    of the aligned rows, ``1^T B G = sum_k alpha_k g_k`` with ``alpha = B 1`` (already the sum scale).
    Collinear gradients (rank 1) come back as their plain sum. Stateless.
    """

    name = "aligned_mtl"
    needs_task_gradients = True

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names)
        self.last_alpha = torch.ones(self.num_tasks, dtype=torch.float64)
        self.last_rank = self.num_tasks

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """``alpha = B 1`` (``(K,)`` float64) from the Gram matrix; zeros when every gradient is zero."""
        eigenvalues, vectors = torch.linalg.eigh(gram)
        top = float(eigenvalues.max())
        if top <= 0.0:
            self.last_rank = 0
            return torch.zeros(self.num_tasks, dtype=torch.float64)
        tol = top * self.num_tasks * torch.finfo(torch.float32).eps
        keep = eigenvalues > tol
        eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
        self.last_rank = int(keep.sum())
        b = eigenvalues.min().sqrt() * (vectors * eigenvalues.rsqrt()) @ vectors.T
        return b.sum(1)

    def combine_gradients(self, gradients: torch.Tensor, losses: Mapping[str, float]) -> torch.Tensor:
        gram = prepare_gram(gradients, self.task_names, type(self).__name__)
        self.last_alpha = self.coefficients(gram)
        return combine_rows(gradients, self.last_alpha)

    def log_dict(self) -> dict[str, float]:
        alphas = {
            f"aligned_mtl/alpha/{t}": float(a) for t, a in zip(self.task_names, self.last_alpha.tolist())
        }
        return {**super().log_dict(), **alphas, "aligned_mtl/rank": float(self.last_rank)}
