"""Memory bank pieces of PatchCore: greedy k-centre coreset selection and chunked nearest-neighbour distances."""

from __future__ import annotations

import math

import torch


def random_projection(features: torch.Tensor, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian random projection (N, C) -> (N, dim) float32, scaled to preserve distances in expectation
    (Johnson-Lindenstrauss)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator).to(features.device) / math.sqrt(dim)
    return features.float() @ matrix


def _scaled_points(features: torch.Tensor, projection_dim: int | None, seed: int, dtype: torch.dtype):
    """Projected, centred points scaled to a maximum norm of 1: the farthest-point order is unchanged, and
    float16 products can neither overflow nor lose the small distances to the size of the norms."""
    if projection_dim is not None and projection_dim < features.shape[1]:
        points = random_projection(features, projection_dim, seed)
    else:
        points = features.float()
    points = points - points.mean(dim=0, keepdim=True)
    scale = points.norm(dim=1).max().clamp(min=torch.finfo(torch.float32).tiny)
    return (points / scale).to(dtype)


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    fraction: float = 0.1,
    seed: int = 0,
    projection_dim: int | None = 128,
    compute_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """PatchCore's greedy k-centre coreset: indices (M,) of `features` (N, C), M = ceil(fraction * N).

    Starts from a seeded random point (which is part of the result) and repeatedly adds the point farthest from
    the selected set. Distances use a seeded Gaussian projection to `projection_dim` dims (None: the raw
    features). `compute_dtype` is the dtype of the projected features: float16 halves the memory traffic of the
    per-step matrix-vector product (bandwidth-bound, 4x faster than float32 on our CPU); distances are
    accumulated in float32. Pass torch.float32 for full precision.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"coreset fraction must be in (0, 1]; got {fraction}")
    num_points = features.shape[0]
    if num_points == 0:
        raise ValueError("cannot select a coreset from an empty feature set")
    target = max(1, math.ceil(fraction * num_points))
    if target >= num_points:
        return torch.arange(num_points, device=features.device)
    points = _scaled_points(features, projection_dim, seed, compute_dtype)
    squared_norms = points.float().pow(2).sum(dim=1)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(num_points, (1,), generator=generator))
    selected = torch.empty(target, dtype=torch.long)
    selected[0] = first
    # min_distances[i] = squared distance from point i to the selected set; ||a||^2 - 2ab + ||b||^2.
    min_distances = squared_norms - 2 * torch.mv(points, points[first]).float() + squared_norms[first]
    min_distances[first] = -1.0
    for step in range(1, target):
        farthest = int(torch.argmax(min_distances))
        selected[step] = farthest
        distances = (
            torch.mv(points, points[farthest])
            .float()
            .mul_(-2)
            .add_(squared_norms)
            .add_(squared_norms[farthest])
        )
        torch.minimum(min_distances, distances, out=min_distances)
        min_distances[farthest] = -1.0  # never re-pick a selected point, even under rounding
    return selected.to(features.device)


def _pairwise_squared(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """(q, b) squared L2 distances via ||a||^2 - 2ab + ||b||^2, clamped at 0 against cancellation."""
    query_norms = queries.float().pow(2).sum(dim=1, keepdim=True)
    products = (queries @ bank.T).float()
    return (query_norms - 2 * products + bank_norms[None]).clamp_(min=0)


@torch.no_grad()
def nearest_neighbor_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    chunk_size: int = 1024,
    bank_chunk_size: int = 16384,
    metric: str = "l2",
    compute_dtype: torch.dtype | None = None,
    num_candidates: int = 16,
) -> torch.Tensor:
    """Distance of each query (N, C) to its nearest bank entry (M, C) -> (N,) float32; with k > 1, the mean
    distance to the k nearest entries.

    Memory: one (chunk_size, bank_chunk_size) float32 block at a time. `metric`: "l2" (Euclidean) or
    "cosine" (1 - cosine similarity, as AnomalyDINO). The distances of the chosen neighbours are recomputed
    directly as ||a - b|| so they are exact (a query equal to a bank entry scores exactly 0).

    `compute_dtype` (e.g. torch.bfloat16): search in reduced precision, keep `num_candidates` >= k candidates
    per query and re-rank them exactly in float32. This is approximate (a true neighbour may fall outside the
    candidates) but ~3x faster on CPUs with bf16 instructions; None (default) searches in float32, exactly.
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty: fit the scorer on at least one image first")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} channels but the bank has {bank.shape[1]}")
    queries, bank = queries.float(), bank.float()
    if metric == "cosine":
        # On unit vectors, ||a - b||^2 = 2 - 2 cos, so the L2 search ranks identically.
        queries = torch.nn.functional.normalize(queries, dim=1)
        bank = torch.nn.functional.normalize(bank, dim=1)
    keep = min(bank.shape[0], max(k, num_candidates) if compute_dtype is not None else k)
    search_bank = bank if compute_dtype is None else bank.to(compute_dtype)
    bank_norms = search_bank.float().pow(2).sum(dim=1)

    results = []
    for start in range(0, queries.shape[0], chunk_size):
        query_chunk = queries[start : start + chunk_size]
        search_queries = query_chunk if compute_dtype is None else query_chunk.to(compute_dtype)
        best_values = best_indices = None
        for bank_start in range(0, bank.shape[0], bank_chunk_size):
            block = _pairwise_squared(
                search_queries,
                search_bank[bank_start : bank_start + bank_chunk_size],
                bank_norms[bank_start : bank_start + bank_chunk_size],
            )
            values, indices = block.topk(min(keep, block.shape[1]), dim=1, largest=False)
            indices = indices + bank_start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, order = values.topk(min(keep, values.shape[1]), dim=1, largest=False)
                indices = indices.gather(1, order)
            best_values, best_indices = values, indices
        # Exact distances of the kept neighbours, then the k smallest.
        exact = (query_chunk[:, None, :] - bank[best_indices]).norm(dim=-1)
        exact = exact.topk(k, dim=1, largest=False).values
        if metric == "cosine":
            exact = exact.pow(2) / 2  # ||a - b||^2 / 2 = 1 - cos on unit vectors
        results.append(exact.mean(dim=1))
    return torch.cat(results)
