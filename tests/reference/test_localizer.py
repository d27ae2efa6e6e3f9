"""The training-free reference localiser on synthetic feature maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cadmtl.anomaly.metrics import connected_components
from cadmtl.reference.localizer import (
    ReferenceLocalizer,
    best_f1_threshold,
    boxes_from_map,
    calibrate_threshold,
    difference_map,
    fpr_threshold,
    gaussian_kernel1d,
    window_nearest_distance,
)


def features(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- distances


def test_identical_pair_has_zero_distance_with_a_cached_3d_reference():
    reference = features(16, 6, 7)
    distances = window_nearest_distance(reference.expand(3, -1, -1, -1), reference, window=1)
    assert distances.shape == (3, 6, 7)
    assert distances.abs().max() < 1e-5


@pytest.mark.parametrize("shift", [(1, 2), (-2, 0), (2, -2)])
def test_shift_within_the_window_is_tolerated(shift):
    reference = features(1, 32, 12, 12, seed=1)
    query = torch.roll(reference, shifts=shift, dims=(2, 3))
    dy, dx = shift
    valid = (slice(max(dy, 0), 12 + min(dy, 0)), slice(max(dx, 0), 12 + min(dx, 0)))  # not wrapped around
    assert window_nearest_distance(query, reference, window=2)[0][valid].max() < 1e-5
    assert window_nearest_distance(query, reference, window=None)[0][valid].max() < 1e-5
    assert window_nearest_distance(query, reference, window=0)[0][valid].min() > 0.2  # random 32-d: cos ~ 0


@pytest.mark.parametrize("window", [0, 1, 3, None])
def test_a_patch_replaced_by_noise_gets_the_maximum(window):
    reference = features(2, 32, 9, 9, seed=2)
    query = reference.clone()
    query[1, :, 4, 6] = features(32, seed=3)
    distances = window_nearest_distance(query, reference, window=window)
    assert distances[0].max() < 1e-5
    assert divmod(int(distances[1].argmax()), 9) == (4, 6)
    assert distances[1, 4, 6] > 0.3


def test_global_search_matches_brute_force_in_chunks():
    query, reference = features(2, 8, 5, 6, seed=4), features(2, 8, 4, 3, seed=5)  # sizes may differ
    q = F.normalize(query, dim=1).flatten(2).transpose(1, 2)
    r = F.normalize(reference, dim=1).flatten(2)
    expected = (1 - torch.bmm(q, r).amax(dim=2)).view(2, 5, 6)
    torch.testing.assert_close(window_nearest_distance(query, reference, None, chunk_size=7), expected)


def test_window_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="same size"):
        window_nearest_distance(features(1, 4, 5, 5), features(4, 6, 6), window=1)
    with pytest.raises(ValueError, match="channels"):
        window_nearest_distance(features(1, 4, 5, 5), features(3, 5, 5), window=1)


# ----------------------------------------------------------------------------------------------- maps


def test_difference_map_keeps_values_and_shape():
    kernel = gaussian_kernel1d(2.0)
    assert kernel.numel() == 17 and kernel.sum().item() == pytest.approx(1.0)
    flat = torch.full((2, 4, 4), 0.1)
    out = difference_map(flat, (32, 40), sigma=3.0)
    assert out.shape == (2, 32, 40)
    torch.testing.assert_close(out, torch.full_like(out, 0.1))  # no per-image min-max normalisation
    tiny = difference_map(flat, (5, 5), sigma=4.0)  # kernel wider than the map: truncated, still valid
    torch.testing.assert_close(tiny, torch.full_like(tiny, 0.1))


def test_difference_map_smooths_a_spike():
    spike = torch.zeros(1, 8, 8)
    spike[0, 3, 3] = 1.0
    sharp, smooth = difference_map(spike, (64, 64), 0), difference_map(spike, (64, 64), 4.0)
    assert smooth.max() < sharp.max()
    assert smooth.sum().item() == pytest.approx(sharp.sum().item(), rel=0.02)  # mass kept away from borders
    assert divmod(int(smooth[0].argmax()), 64) in {(27, 27), (27, 28), (28, 27), (28, 28)}


# ----------------------------------------------------------------------------------------------- boxes


def test_two_blobs_give_two_boxes_in_place():
    anomaly_map = torch.zeros(20, 30)
    anomaly_map[2:6, 3:9] = 0.7  # rows 2..5, columns 3..8
    anomaly_map[12:18, 20:25] = 0.9
    anomaly_map[14, 22] = 0.95
    boxes, scores, mask = boxes_from_map(anomaly_map, threshold=0.5)
    torch.testing.assert_close(boxes, torch.tensor([[20.0, 12, 25, 18], [3, 2, 9, 6]]))
    torch.testing.assert_close(scores, torch.tensor([0.95, 0.7]))
    assert mask.sum() == 24 + 30


def test_diagonal_pixels_join_and_min_area_drops():
    anomaly_map = torch.zeros(8, 8)
    anomaly_map[1, 1] = anomaly_map[2, 2] = anomaly_map[3, 3] = 1.0  # one 8-connected diagonal line
    anomaly_map[6, 0] = 0.8  # a lone pixel
    labels, count = connected_components((anomaly_map > 0.5).numpy())
    assert count == labels.max() == 2 and labels[0, 0] == 0 and labels[1, 1] == labels[3, 3]
    boxes, _, mask = boxes_from_map(anomaly_map, threshold=0.5, min_area=2)
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 1, 4, 4]]))
    assert not mask[6, 0] and mask.sum() == 3
    assert np.unique(connected_components(np.ones((3, 3), dtype=bool))[0]).tolist() == [1]


def test_nothing_above_threshold_means_no_anomaly():
    boxes, scores, mask = boxes_from_map(torch.full((5, 5), 0.5), threshold=0.5)  # strictly above
    assert boxes.shape == (0, 4) and scores.shape == (0,) and not mask.any()


# ----------------------------------------------------------------------------------------------- thresholds


def test_best_f1_threshold_on_hand_made_scores():
    # calling the top k anomalous (P = 3): k=1 F1 2/4, k=2 4/5, k=3 4/6, k=4 6/7, k=5 6/8, k=6 6/9
    scores = [0.6, 0.1, 0.4, 0.3, 0.5, 0.2]
    labels = [1, 0, 0, 1, 1, 0]
    threshold, f1 = best_f1_threshold(scores, labels)
    assert threshold == pytest.approx(0.25) and f1 == pytest.approx(6 / 7)
    assert calibrate_threshold(scores, labels) == pytest.approx(0.25)


def test_best_f1_threshold_ties_and_edges():
    # the two 0.5 pairs cannot be split: calling only the top 2 (F1 1.0) is not a threshold; top 3 gives 4/5
    threshold, f1 = best_f1_threshold([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert (threshold, f1) == (pytest.approx(0.3), pytest.approx(0.8))
    # top 1 (2 / 3) ties with top 4 (4 / 6): the higher threshold wins
    threshold, f1 = best_f1_threshold([0.9, 0.7, 0.5, 0.3], [1, 0, 0, 1])
    assert (threshold, f1) == (pytest.approx(0.8), pytest.approx(2 / 3))
    threshold, f1 = best_f1_threshold([0.2, 0.3], [1, 1])  # everything anomalous: just below the minimum
    assert threshold < 0.2 and threshold == pytest.approx(0.2) and f1 == 1.0
    with pytest.raises(ValueError, match="at least one anomalous"):
        best_f1_threshold([0.1, 0.2], [0, 0])


def test_fpr_threshold_quantile():
    normal = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    assert fpr_threshold(normal, 0.1) == pytest.approx(0.9)  # one false alarm allowed: the 2nd largest
    assert fpr_threshold(normal, 0.0) == pytest.approx(1.0)
    assert fpr_threshold(normal, 0.25) == pytest.approx(0.8)  # floor(2.5) = 2 allowed
    rng = np.random.default_rng(0)
    scores = rng.random(37)
    for target in (0.0, 0.05, 0.1, 0.5, 0.9):
        t = fpr_threshold(scores, target)
        assert t == np.quantile(scores, 1 - target, method="inverted_cdf")
        assert (scores > t).mean() <= target
    labels = [0] * 10 + [1, 1]
    assert calibrate_threshold([*normal, 5.0, 6.0], labels, target_fpr=0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="target_fpr"):
        fpr_threshold(normal, 1.0)


# ----------------------------------------------------------------------------------------------- localizer


def test_reference_localizer_end_to_end():
    reference = features(16, 8, 8, seed=6)  # 8 x 8 patches of 8 pixels: a 64 x 64 image
    query = reference.clone()
    query[:, 2:4, 5:7] = features(16, 2, 2, seed=7)  # defect on patch rows 2-3, columns 5-6
    localizer = ReferenceLocalizer(window=1, sigma=2.0, threshold=0.3, min_area=4)
    result = localizer.localize(torch.stack([query, reference]), reference, (64, 64))
    defect, normal = result
    assert (
        defect["boxes"].shape == (1, 4)
        and defect["map"].shape == (64, 64)
        and defect["mask"].dtype == torch.bool
    )
    x1, y1, x2, y2 = defect["boxes"][0].tolist()
    assert 32 <= x1 <= 44 and 52 <= x2 <= 64 and 8 <= y1 <= 20 and 28 <= y2 <= 40  # around x 40-56, y 16-32
    assert defect["scores"][0] == defect["score"] == defect["map"].max()
    assert normal["boxes"].shape == (0, 4) and normal["score"] < 1e-4

    localizer.cache_reference(reference.unsqueeze(0))
    cached = localizer.localize(query, None, (64, 64))[0]
    torch.testing.assert_close(cached["map"], defect["map"])

    settings = localizer.to_dict()
    assert ReferenceLocalizer.from_dict(settings).to_dict() == settings
    with pytest.raises(ValueError, match="unknown"):
        ReferenceLocalizer.from_dict({**settings, "radius": 3})
    with pytest.raises(ValueError, match="no reference"):
        ReferenceLocalizer().localize(query, None, (64, 64))
