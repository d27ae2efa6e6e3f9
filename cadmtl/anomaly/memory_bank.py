"""Memory bank pieces of PatchCore: greedy k-centre coreset selection (fitting, here) and chunked
nearest-neighbour distances (`NearestNeighborIndex`, the search the Hub package ships and serves with)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_cadmtl_anomaly.features_cadmtl_anomaly import NearestNeighborIndex, random_projection

__all__ = ["NearestNeighborIndex", "greedy_coreset", "nearest_neighbor_distance", "random_projection"]


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
    compute_dtype: torch.dtype = torch.float32,
    candidates: int = 512,
    chunk_size: int = 131072,
    progress: bool = False,
) -> torch.Tensor:
    """PatchCore's greedy k-centre coreset: indices (M,) of `features` (N, C), M = ceil(fraction * N).

    Starts from a seeded random point (which is part of the result) and repeatedly adds the point farthest from
    the selected set. Distances use a seeded Gaussian projection to `projection_dim` dims (None: the raw
    features) in `compute_dtype`. `progress` shows a progress bar of the selected points.

    The order is exactly farthest-point sampling's, computed in batches: the `candidates` farthest points are
    taken with their distances to each other, and picked greedily among themselves for as long as the next pick
    is still at least as far from the set as every point outside them (whose distances can only shrink). The
    whole set is then updated once per batch by a matrix product instead of once per point by a
    matrix-vector product, which is compute-bound instead of bandwidth-bound: 1.5 M patches to 1 % took 180 s on
    one core instead of ~25 min (BENCHMARKS.md). float32 is the fast dtype on a CPU (float16 matrix products are
    not); bfloat16 rounds distances too coarsely to keep the order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"coreset fraction must be in (0, 1]; got {fraction}")
    num_points = features.shape[0]
    if num_points == 0:
        raise ValueError("cannot select a coreset from an empty feature set")
    target = max(1, math.ceil(fraction * num_points))
    if target >= num_points:
        return torch.arange(num_points, device=features.device)
    points = _scaled_points(features.cpu(), projection_dim, seed, compute_dtype)
    squared_norms = points.float().pow(2).sum(dim=1)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(num_points, (1,), generator=generator))
    selected = [first]
    # min_distances[i] = squared distance from point i to the selected set; ||a||^2 - 2ab + ||b||^2.
    # Clamped at 0 (rounding can dip below it for duplicates), so -1 marks exactly the selected points and every
    # batch's first pick, the farthest point overall, is always taken.
    min_distances = (
        squared_norms - 2 * torch.mv(points, points[first]).float() + squared_norms[first]
    ).clamp_(min=0)
    min_distances[first] = -1.0
    bar = tqdm(
        total=target, initial=1, desc=f"coreset of {num_points} patches", disable=not progress, leave=False
    )
    while len(selected) < target:
        # num_candidates + 1 <= N, so topk has a (c + 1)-th value: the farthest point outside the candidates.
        num_candidates = min(candidates, num_points - len(selected))
        distances, indices = torch.topk(min_distances, num_candidates + 1)
        outside = float(distances[num_candidates])
        batch = _farthest_among(
            points,
            squared_norms,
            indices[:num_candidates],
            distances[:num_candidates],
            outside,
            target - len(selected),
        )
        selected.extend(batch.tolist())
        bar.update(len(batch))
        _lower_to_new_centres(points, squared_norms, min_distances, batch, chunk_size)
    bar.close()
    return torch.tensor(selected, dtype=torch.long, device=features.device)


def _farthest_among(
    points: torch.Tensor,
    squared_norms: torch.Tensor,
    indices: torch.Tensor,
    distances: torch.Tensor,
    outside: float,
    limit: int,
) -> torch.Tensor:
    """The next picks of farthest-point sampling among the candidate `indices`: greedy on their own pairwise
    distances while the best remaining candidate is at least `outside` (the farthest non-candidate's distance)."""
    candidate_points = points[indices]
    norms = squared_norms[indices]
    pairwise = (
        torch.mm(candidate_points, candidate_points.T)
        .float()
        .mul_(-2)
        .add_(norms[:, None])
        .add_(norms[None])
        .clamp_(min=0)
    )
    pairwise, remaining = pairwise.numpy(), distances.clone().numpy()
    picked: list[int] = []
    while len(picked) < limit:
        best = int(remaining.argmax())
        if remaining[best] < outside or remaining[best] < 0:
            break
        picked.append(best)
        np.minimum(remaining, pairwise[best], out=remaining)
        remaining[best] = -1.0
    return indices[picked]


def _lower_to_new_centres(
    points: torch.Tensor,
    squared_norms: torch.Tensor,
    min_distances: torch.Tensor,
    centres: torch.Tensor,
    chunk_size: int,
) -> None:
    """min_distances <- min(min_distances, squared distance to any of `centres`), in place, chunk by chunk."""
    centre_points, centre_norms = points[centres], squared_norms[centres]
    for start in range(0, points.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        # min_j ||a - c_j||^2 = ||a||^2 + min_j (||c_j||^2 - 2 a.c_j): one fused product, one reduction
        nearest = torch.addmm(
            centre_norms[None].to(points.dtype), points[rows], centre_points.T, alpha=-2
        ).float()
        torch.minimum(
            min_distances[rows],
            nearest.min(dim=1).values.add_(squared_norms[rows]).clamp_(min=0),
            out=min_distances[rows],
        )
    min_distances[centres] = -1.0


def nearest_neighbor_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    chunk_size: int = 1024,
    bank_chunk_size: int = 4096,
    metric: str = "l2",
    compute_dtype: torch.dtype | None = None,
    num_candidates: int = 16,
    projection_dim: int | None = None,
) -> torch.Tensor:
    """Distance of each query (N, C) to its nearest bank entry (M, C) -> (N,) float32; with k > 1, the mean
    distance to the k nearest entries. Exact by default; see `NearestNeighborIndex` for the options (build one
    index to search a fixed bank repeatedly)."""
    index = NearestNeighborIndex(
        bank,
        metric,
        compute_dtype,
        projection_dim,
        num_candidates,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
    )
    return index.search(queries, k)
