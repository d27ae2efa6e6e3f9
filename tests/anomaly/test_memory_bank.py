"""Greedy coreset and chunked nearest-neighbour search."""

from __future__ import annotations

import pytest
import torch

from cadmtl.anomaly.memory_bank import NearestNeighborIndex, greedy_coreset, nearest_neighbor_distance


def _clusters(num_clusters=6, per_cluster=50, dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=generator) * 50  # far apart
    points = centres.repeat_interleave(per_cluster, 0) + torch.randn(
        num_clusters * per_cluster, dim, generator=generator
    )
    return points, torch.arange(num_clusters).repeat_interleave(per_cluster)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("projection_dim", [16, None])
def test_coreset_picks_one_point_per_cluster_first(dtype, projection_dim):
    points, cluster = _clusters()
    indices = greedy_coreset(points, fraction=0.1, seed=3, projection_dim=projection_dim, compute_dtype=dtype)
    assert indices.shape == (30,) and indices.unique().numel() == 30
    assert sorted(cluster[indices[:6]].tolist()) == list(range(6))  # the first 6 cover the 6 clusters


def test_coreset_keeps_its_seeded_first_point_and_is_deterministic():
    points, _ = _clusters()
    first = greedy_coreset(points, 0.05, seed=7)
    assert torch.equal(first, greedy_coreset(points, 0.05, seed=7))
    expected_start = int(torch.randint(points.shape[0], (1,), generator=torch.Generator().manual_seed(7)))
    assert int(first[0]) == expected_start  # the starting point is part of the coreset (anomalib #3459)
    assert not torch.equal(first, greedy_coreset(points, 0.05, seed=8))
    assert greedy_coreset(points, 1.0).tolist() == list(range(points.shape[0]))
    with pytest.raises(ValueError, match="fraction"):
        greedy_coreset(points, 0.0)


def test_coreset_without_projection_is_exact_farthest_point_sampling():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0], [5.0, 5.0], [1.0, 1.0]])
    generator_first = int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(0)))
    order = greedy_coreset(points, 0.8, seed=0, projection_dim=None, compute_dtype=torch.float32).tolist()
    # brute force farthest-point sampling from the same start
    chosen = [generator_first]
    while len(chosen) < 4:
        dist = torch.cdist(points, points[chosen]).min(dim=1).values
        chosen.append(int(dist.argmax()))
    assert order == chosen


@pytest.mark.parametrize("candidates,chunk_size", [(1, 1000), (8, 97), (512, 131072)])
def test_batched_coreset_keeps_farthest_point_order(candidates, chunk_size):
    # the batches (candidate pools, chunked updates) must not change the order of one-point-at-a-time sampling
    points = torch.randn(1500, 24, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 3, 24)
    order = greedy_coreset(
        points, 0.1, seed=2, projection_dim=None, candidates=candidates, chunk_size=chunk_size
    ).tolist()
    double = points.double()
    chosen = [int(torch.randint(1500, (1,), generator=torch.Generator().manual_seed(2)))]
    nearest = torch.cdist(double, double[chosen]).squeeze(1)
    while len(chosen) < 150:
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(double, double[chosen[-1:]]).squeeze(1))
    assert order == chosen


def test_coreset_of_duplicated_points_terminates_with_distinct_indices():
    # identical patches (a constant image) have distances that round below 0: every batch must still pick
    points = torch.cat([torch.ones(300, 16) * 0.37, torch.randn(5, 16)])
    indices = greedy_coreset(points, 0.5, seed=1, candidates=8)
    assert indices.numel() == 153 and indices.unique().numel() == 153
    assert set(range(300, 305)) <= set(indices.tolist())  # the 5 distinct points come before the duplicates


@pytest.mark.parametrize("chunk_size,bank_chunk_size", [(1, 17), (7, 13), (64, 1000), (1000, 5)])
@pytest.mark.parametrize("k", [1, 3])
def test_chunked_nearest_neighbor_matches_brute_force(chunk_size, bank_chunk_size, k):
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 24, generator=generator), torch.randn(120, 24, generator=generator)
    result = nearest_neighbor_distance(
        queries, bank, k=k, chunk_size=chunk_size, bank_chunk_size=bank_chunk_size
    )
    brute = torch.stack([((q - bank) ** 2).sum(1).sqrt().sort().values[:k].mean() for q in queries])
    torch.testing.assert_close(result, brute, rtol=1e-6, atol=1e-6)


def test_nearest_neighbor_cosine_exact_zero_and_reduced_precision():
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 32, generator=generator) * 20
    queries = torch.cat([bank[:5], torch.randn(20, 32, generator=generator)])
    l2 = nearest_neighbor_distance(queries, bank, chunk_size=8, bank_chunk_size=64)
    assert torch.equal(l2[:5], torch.zeros(5))  # copies of bank entries score exactly 0
    cosine = nearest_neighbor_distance(queries, bank, metric="cosine")
    similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    torch.testing.assert_close(cosine, 1 - similarity.max(dim=1).values, atol=1e-5, rtol=1e-5)
    fast = nearest_neighbor_distance(queries, bank, compute_dtype=torch.bfloat16, num_candidates=16)
    torch.testing.assert_close(fast, l2)  # candidates re-ranked exactly in float32
    with pytest.raises(ValueError, match="memory bank is empty"):
        nearest_neighbor_distance(queries, bank[:0])


def test_approximate_index_with_projection_and_bf16_finds_cluster_neighbours():
    points, _ = _clusters(num_clusters=20, per_cluster=30, dim=96, seed=2)
    generator = torch.Generator().manual_seed(5)
    queries = points[torch.randint(0, 600, (200,), generator=generator)] + 0.1 * torch.randn(
        200, 96, generator=generator
    )
    exact = nearest_neighbor_distance(queries, points)
    index = NearestNeighborIndex(points, compute_dtype=torch.bfloat16, projection_dim=32, num_candidates=32)
    assert index.search_bank.shape == (600, 32) and index.search_bank.dtype == torch.bfloat16
    approximate = index.search(queries)
    assert bool((approximate >= exact - 1e-5).all())  # never below the exact distance (exact re-rank)
    recall = (approximate - exact).abs().le(1e-5).float().mean()
    assert recall >= 0.95, recall


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_inverted_file_probing_every_list_equals_the_exact_search(metric, k):
    generator = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(2000, 32, generator=generator), torch.randn(150, 32, generator=generator)
    exact = NearestNeighborIndex(bank, metric, bank_chunk_size=512).search(queries, k)
    index = NearestNeighborIndex(bank, metric, num_lists=40, num_probes=40, bank_chunk_size=512)
    assert index.num_lists == 40 and index.list_offsets[-1] == 2000
    assert torch.equal(index.search(queries, k), exact)


def test_inverted_file_finds_cluster_neighbours_with_few_probes_and_is_deterministic():
    points, _ = _clusters(num_clusters=30, per_cluster=40, dim=64, seed=6)
    generator = torch.Generator().manual_seed(7)
    queries = points[torch.randint(0, 1200, (300,), generator=generator)] + 0.5 * torch.randn(
        300, 64, generator=generator
    )
    exact = nearest_neighbor_distance(queries, points)
    index = NearestNeighborIndex(points, num_lists=35, num_probes=3, seed=1)
    approximate = index.search(queries)
    assert bool((approximate >= exact - 1e-5).all())  # a subset of the bank: never below the exact distance
    recall = (approximate - exact).abs().le(1e-5).float().mean()
    assert recall >= 0.98, recall
    again = NearestNeighborIndex(points, num_lists=35, num_probes=3, seed=1)
    assert torch.equal(again.centroids, index.centroids) and torch.equal(again.list_ids, index.list_ids)


def test_inverted_file_bad_arguments_and_degenerate_banks():
    generator = torch.Generator().manual_seed(8)
    bank, queries = torch.randn(50, 8, generator=generator), torch.randn(20, 8, generator=generator)
    with pytest.raises(ValueError, match=r"num_probes must be between 1 and num_lists \(4\); got 5"):
        NearestNeighborIndex(bank, num_lists=4, num_probes=5)
    with pytest.raises(ValueError, match=r"num_lists .* must be >= 1"):
        NearestNeighborIndex(bank, num_lists=0)
    exact = nearest_neighbor_distance(queries, bank)
    # more lists than entries: clamped to one entry per list; probing them all is exact
    clamped = NearestNeighborIndex(bank, num_lists=80, num_probes=80)
    assert clamped.num_lists == 50 and torch.equal(clamped.search(queries), exact)
    # 40 identical entries: k-means leaves lists empty; they are dropped and the probes clamped
    repeated = torch.cat([bank[:1].repeat(40, 1), bank[10:20]])
    index = NearestNeighborIndex(repeated, num_lists=20, num_probes=20)
    assert index.num_lists < 20 and index.num_probes == index.num_lists
    assert min(torch.tensor(index.list_offsets).diff().tolist()) >= 1
    assert torch.equal(index.search(queries), nearest_neighbor_distance(queries, repeated))
    # k larger than what the probed lists hold: the mean over the neighbours found
    single = NearestNeighborIndex(bank, num_lists=50, num_probes=1)
    torch.testing.assert_close(single.search(queries, k=3), single.search(queries, k=1))
