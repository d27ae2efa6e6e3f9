"""Memory bank pieces of PatchCore: greedy k-centre coreset selection and chunked nearest-neighbour distances."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    accumulated in float32. Pass torch.float32 for full precision. Each step is latency-bound: on a CPU shared
    with other processes one intra-op thread is faster than two (see BENCHMARKS.md).
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


def _ranking_distances(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """(q, b) ||b||^2 - 2ab: the squared L2 distance minus the per-query constant ||a||^2, all a ranking needs
    (the kept neighbours' distances are recomputed exactly). One fused GEMM in float32, no extra passes."""
    if queries.dtype == torch.float32:
        return torch.addmm(bank_norms[None], queries, bank.T, alpha=-2)
    return (queries @ bank.T).float().mul_(-2).add_(bank_norms[None])


class NearestNeighborIndex:
    """Distances from queries to their nearest entries of a fixed bank (M, C), searched in memory-bounded chunks.

    The search representation of the bank (normalised for cosine, projected, cast) is built once here, so
    repeated `search` calls pay only for the queries.

    Args:
        bank: (M, C) stored features.
        metric: "l2" (Euclidean) or "cosine" (1 - cosine similarity, as AnomalyDINO).
        compute_dtype: None searches in float32, exactly. torch.bfloat16 / float16 searches in reduced
            precision, keeps `num_candidates` per query and re-ranks them exactly (approximate: a true neighbour
            may fall outside the candidates; ~3x faster on CPUs with bf16 instructions).
        projection_dim: search on a seeded Gaussian projection of the features to this many dims, then re-rank
            the candidates exactly (approximate; the cost of the search drops by C / projection_dim).
        chunk_size, bank_chunk_size: queries x bank entries per distance block (float32), bounding memory.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        metric: str = "l2",
        compute_dtype: torch.dtype | None = None,
        projection_dim: int | None = None,
        num_candidates: int = 16,
        seed: int = 0,
        chunk_size: int = 1024,
        bank_chunk_size: int = 4096,
    ):
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError("the memory bank is empty: fit the scorer on at least one image first")
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
        self.metric = metric
        self.bank = self._prepare(bank.float())
        self.projection_dim = projection_dim if projection_dim and projection_dim < bank.shape[1] else None
        self.seed = seed
        self.compute_dtype = compute_dtype
        self.approximate = compute_dtype is not None or self.projection_dim is not None
        self.num_candidates = num_candidates
        self.chunk_size = chunk_size
        self.bank_chunk_size = bank_chunk_size
        self.search_bank = self._search_space(self.bank)
        self.search_norms = self.search_bank.float().pow(2).sum(dim=1)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        # On unit vectors, ||a - b||^2 = 2 - 2 cos, so the L2 search ranks cosine neighbours identically.
        return F.normalize(features, dim=1) if self.metric == "cosine" else features

    def _search_space(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection_dim is not None:
            features = random_projection(features, self.projection_dim, self.seed)
        return features if self.compute_dtype is None else features.to(self.compute_dtype)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(N, C) queries -> (N,) float32 distance to the nearest entry (mean over the k nearest if k > 1).

        The kept neighbours' distances are recomputed directly as ||a - b||, so they are exact (a query equal to
        a bank entry scores exactly 0) whichever search space found them.
        """
        if queries.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"queries have {queries.shape[1]} channels but the bank has {self.bank.shape[1]}"
            )
        queries = self._prepare(queries.float().to(self.bank.device))
        keep = min(self.bank.shape[0], max(k, self.num_candidates) if self.approximate else k)
        results = []
        for start in range(0, queries.shape[0], self.chunk_size):
            chunk = queries[start : start + self.chunk_size]
            candidates = self._candidates(self._search_space(chunk), keep)
            exact = (chunk[:, None, :] - self.bank[candidates]).norm(dim=-1)
            exact = exact.topk(min(k, exact.shape[1]), dim=1, largest=False).values
            if self.metric == "cosine":
                exact = exact.pow(2) / 2  # ||a - b||^2 / 2 = 1 - cos on unit vectors
            results.append(exact.mean(dim=1))
        return torch.cat(results)

    def _candidates(self, search_queries: torch.Tensor, keep: int) -> torch.Tensor:
        """(q, keep) indices of the nearest bank entries in the search space, merged block by block."""
        best_values = best_indices = None
        for bank_start in range(0, self.search_bank.shape[0], self.bank_chunk_size):
            stop = bank_start + self.bank_chunk_size
            block = _ranking_distances(
                search_queries, self.search_bank[bank_start:stop], self.search_norms[bank_start:stop]
            )
            if keep == 1:
                values, indices = block.min(dim=1, keepdim=True)
            else:
                values, indices = block.topk(min(keep, block.shape[1]), dim=1, largest=False)
            indices = indices + bank_start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, order = values.topk(min(keep, values.shape[1]), dim=1, largest=False)
                indices = indices.gather(1, order)
            best_values, best_indices = values, indices
        return best_indices


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
