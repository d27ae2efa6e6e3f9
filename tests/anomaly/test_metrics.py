"""Anomaly metrics against independent brute-force references (pairs, threshold scans, BFS components)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from cadmtl.anomaly.metrics import (
    METRIC_KEYS,
    AnomalyMetrics,
    aupro,
    average_precision,
    binary_auroc,
    compute_anomaly_metrics,
    connected_components,
    f1_max,
    metrics_table,
)

# ------------------------------------------------------------------------------------------------------------
# Brute-force references
# ------------------------------------------------------------------------------------------------------------


def auroc_pairs(scores, labels) -> float:
    """Mann-Whitney U over all (positive, negative) pairs, ties count 1/2."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def ap_steps(scores, labels) -> float:
    """sum_n (R_n - R_{n-1}) P_n over every distinct threshold, highest first."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = (predicted & labels).sum()
        recall, precision = tp / labels.sum(), tp / predicted.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def f1_scan(scores, labels) -> float:
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    best = 0.0
    for t in [*set(scores.tolist()), math.inf]:
        predicted = scores >= t
        tp = (predicted & labels).sum()
        fp, fn = (predicted & ~labels).sum(), (~predicted & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def components_bfs(mask):
    """8-connected components by breadth-first search: list of pixel sets."""
    mask = np.asarray(mask, bool)
    seen, regions = np.zeros_like(mask), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        region, queue = set(), deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.add((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if (
                        0 <= ny < mask.shape[0]
                        and 0 <= nx < mask.shape[1]
                        and mask[ny, nx]
                        and not seen[ny, nx]
                    ):
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def aupro_scan(maps, masks, limit=0.3) -> float:
    """PRO and FPR counted directly at every distinct threshold, trapezoid up to `limit` (np.interp there)."""
    regions = []  # per region: its scores
    normal = []
    for m, k in zip(maps, masks):
        normal.extend(m[k == 0].tolist())
        for region in components_bfs(k == 1):
            regions.append(np.array([m[p] for p in region]))
    normal = np.array(normal)
    thresholds = sorted({*normal.tolist(), *np.concatenate(regions).tolist()}, reverse=True)
    fpr, pro = [0.0], [0.0]
    for t in thresholds:
        fpr.append((normal >= t).mean())
        pro.append(np.mean([(r >= t).mean() for r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    inside = fpr <= limit
    xs, ys = fpr[inside], pro[inside]
    xs, ys = np.append(xs, limit), np.append(ys, np.interp(limit, fpr, pro))
    return float(np.trapezoid(ys, xs) / limit)


# ------------------------------------------------------------------------------------------------------------
# Scalar metrics
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_ap_f1_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 12, size=300).astype(np.float32)  # many ties
    labels = rng.random(300) < 0.3
    assert binary_auroc(scores, labels) == pytest.approx(auroc_pairs(scores, labels), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(ap_steps(scores, labels), abs=1e-12)
    assert f1_max(scores, labels)[0] == pytest.approx(f1_scan(scores, labels), abs=1e-12)


def test_small_known_values():
    # sklearn's documented example: roc_auc 0.75, average precision 0.8333
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert binary_auroc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(5 / 6)
    # thresholds: 0.8 -> P 1, R .5, F1 2/3; 0.35 -> P 2/3, R 1, F1 0.8
    assert f1_max(scores, labels) == (pytest.approx(0.8), pytest.approx(0.35))


def test_perfect_inverted_constant_and_degenerate():
    labels = np.array([0, 0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert binary_auroc(perfect, labels) == 1.0
    assert binary_auroc(-perfect, labels) == 0.0
    assert binary_auroc(np.ones(5), labels) == 0.5
    assert average_precision(np.ones(5), labels) == pytest.approx(0.4)  # the positive rate
    assert math.isnan(binary_auroc(perfect, np.zeros(5)))
    assert math.isnan(average_precision(perfect, np.zeros(5)))


# ------------------------------------------------------------------------------------------------------------
# Connected components and AUPRO
# ------------------------------------------------------------------------------------------------------------


def test_connected_components_match_bfs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) < 0.35
        labels, count = connected_components(mask)
        expected = components_bfs(mask)
        assert count == len(expected)
        found = {frozenset(zip(*np.nonzero(labels == i))) for i in range(1, count + 1)}
        assert found == {frozenset(r) for r in expected}


def test_connected_components_diagonal_is_connected():
    mask = np.eye(4, dtype=bool)
    mask[0, 3] = True
    labels, count = connected_components(mask)
    assert count == 2 and set(labels[np.eye(4, dtype=bool)]) == {1}


def test_connected_components_number_regions_in_raster_order_of_their_first_pixel():
    mask = np.zeros((6, 6), dtype=bool)
    mask[4:6, 0] = True  # first pixel (4, 0)
    mask[0, 3:6] = mask[1:5, 5] = True  # a hook: first pixel (0, 3), last pixel (4, 5)
    mask[2, 1:3] = True  # first pixel (2, 1)
    labels, count = connected_components(mask)
    assert count == 3 and labels.dtype == np.int32
    assert labels[0, 3] == labels[4, 5] == 1 and labels[2, 1] == 2 and labels[5, 0] == 3
    assert connected_components(np.zeros((3, 4), dtype=bool))[1] == 0


def test_aupro_hand_computed_two_images():
    # Image A (normal): 4 normal pixels 0.1, 0.2, 0.3, 0.4.
    # Image B: R1 = {(0,0), (1,0)} (scores 0.9, 0.4), R2 = {(1,2)} (0.7), normal (0,1)=0.8, (1,1)=0.35,
    # (0,2) ignored (its 0.05 must not count). 6 normal pixels: 0.1 0.2 0.3 0.35 0.4 0.8.
    # threshold 0.9: FPR 0,   PRO (1/2 + 0)/2 = .25
    #           0.8: FPR 1/6, PRO .25
    #           0.7: FPR 1/6, PRO (1/2 + 1)/2 = .75
    #           0.4: FPR 2/6, PRO 1             (0.3 lies between 1/6 and 2/6: PRO(0.3) = .75 + 1.5 * (0.3 - 1/6) = .95)
    # area = .25 * 1/6 + (.75 + .95)/2 * (0.3 - 1/6) = 0.041667 + 0.113333 = 0.155; / 0.3 = 0.516667
    map_a = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    mask_a = np.zeros((2, 2), np.uint8)
    map_b = np.array([[0.9, 0.8, 0.05], [0.4, 0.35, 0.7]], np.float32)
    mask_b = np.array([[1, 0, 255], [1, 0, 1]], np.uint8)
    assert aupro([map_a, map_b], [mask_a, mask_b]) == pytest.approx(0.155 / 0.3, abs=1e-6)
    assert aupro_scan([map_a, map_b], [mask_a, mask_b]) == pytest.approx(0.155 / 0.3, abs=1e-6)
    metrics = compute_anomaly_metrics([map_a, map_b], [mask_a, mask_b], [True, False])
    assert metrics["aupro"] == pytest.approx(100 * 0.155 / 0.3, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_threshold_scan_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for size in [(12, 9), (7, 15), (10, 10)]:
        mask = np.zeros(size, np.uint8)
        mask[rng.random(size) < 0.15] = 1
        mask[rng.random(size) < 0.05] = 255
        maps.append((rng.integers(0, 20, size) + 6 * (mask == 1)).astype(np.float32))  # ties, informative
        masks.append(mask)
    assert aupro(maps, masks) == pytest.approx(aupro_scan(maps, masks), abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Dataset-level metrics and the accumulator
# ------------------------------------------------------------------------------------------------------------


def _random_dataset(seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(9):
        size = (int(rng.integers(6, 14)), int(rng.integers(6, 14)))  # different sizes
        defect_type = [None, "dent", "scratch"][i % 3]
        mask = np.zeros(size, np.uint8)
        if defect_type:
            y, x = rng.integers(0, size[0] - 3), rng.integers(0, size[1] - 3)
            mask[y : y + 3, x : x + 3] = 1
        mask[rng.random(size) < 0.05] = 255
        anomaly_map = rng.random(size).astype(np.float32) + 0.7 * (mask == 1)
        items.append((anomaly_map, mask, defect_type is None, defect_type))
    return items


def test_pixel_metrics_exclude_ignored_pixels():
    items = _random_dataset()
    metrics = compute_anomaly_metrics([i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
    scores = np.concatenate([m[k != 255] for m, k, *_ in items])
    labels = np.concatenate([k[k != 255] == 1 for _, k, *_ in items])
    assert metrics["pixel_auroc"] == pytest.approx(100 * auroc_pairs(scores, labels), abs=1e-9)
    assert metrics["pixel_ap"] == pytest.approx(100 * ap_steps(scores, labels), abs=1e-9)
    assert metrics["pixel_f1_max"] == pytest.approx(100 * f1_scan(scores, labels), abs=1e-9)
    image_scores = [m.max() for m, *_ in items]  # default image score: map maximum
    image_labels = [not normal for _, _, normal, _ in items]
    assert metrics["image_auroc"] == pytest.approx(100 * auroc_pairs(image_scores, image_labels))
    # Setting an ignored pixel to a huge score changes nothing.
    items[1][0][items[1][1] == 255] = 1e6
    again = compute_anomaly_metrics([i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
    assert again["pixel_auroc"] == metrics["pixel_auroc"] and again["aupro"] == metrics["aupro"]


def test_perfect_inverted_constant_maps_give_100_0_50():
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    normal = np.zeros((4, 4), np.uint8)
    perfect = mask.astype(np.float32)
    result = compute_anomaly_metrics([perfect, np.zeros((4, 4))], [mask, normal], [False, True])
    assert (
        result["pixel_auroc"] == 100 and result["aupro"] == pytest.approx(100) and result["pixel_ap"] == 100
    )
    inverted = compute_anomaly_metrics([1 - perfect, np.ones((4, 4))], [mask, normal], [False, True])
    assert inverted["pixel_auroc"] == 0 and inverted["aupro"] == 0
    constant = compute_anomaly_metrics([np.ones((4, 4))] * 2, [mask, normal], [False, True])
    assert constant["pixel_auroc"] == 50 and constant["image_auroc"] == 50


def test_mask_values_and_shapes_are_checked():
    with pytest.raises(ValueError, match="0 \\(normal\\), 1 \\(defect\\) or 255"):
        compute_anomaly_metrics([np.zeros((2, 2))], [np.full((2, 2), 128, np.uint8)], [False])
    with pytest.raises(ValueError, match="original size"):
        compute_anomaly_metrics([np.zeros((2, 2))], [np.zeros((3, 2), np.uint8)], [True])


def test_nan_maps_and_scores_are_refused_by_name():
    masks = [np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8)]
    broken = np.zeros((2, 2))
    broken[0, 1] = np.nan
    with pytest.raises(ValueError, match="holds 1 NaN or infinite values"):
        compute_anomaly_metrics([np.zeros((2, 2)), broken], masks, [True, False])
    with pytest.raises(
        ValueError, match="1 of 2 image scores are NaN or infinite \\(the first is image 1\\)"
    ):
        compute_anomaly_metrics([np.zeros((2, 2))] * 2, masks, [True, False], image_scores=[0.5, np.inf])


def test_accumulator_keys_per_defect_type_and_table():
    items = _random_dataset()
    metrics = AnomalyMetrics()
    for anomaly_map, mask, is_normal, defect_type in items:
        metrics.update(torch.from_numpy(anomaly_map), torch.from_numpy(mask), is_normal, defect_type)
    result = metrics.compute()
    assert set(result) == {*METRIC_KEYS, "per_defect_type"}
    assert set(result["per_defect_type"]) == {"dent", "scratch"}
    # "dent" = dent images vs every normal image
    subset = [i for i in items if i[3] in (None, "dent")]
    image_scores = [m.max() for m, *_ in subset]
    expected = 100 * auroc_pairs(image_scores, [not i[2] for i in subset])
    assert result["per_defect_type"]["dent"]["image_auroc"] == pytest.approx(expected)
    scores = np.concatenate([m[k != 255] for m, k, *_ in subset])
    labels = np.concatenate([k[k != 255] == 1 for _, k, *_ in subset])
    assert result["per_defect_type"]["dent"]["pixel_auroc"] == pytest.approx(
        100 * auroc_pairs(scores, labels)
    )

    table = metrics_table(
        {"dent": dict.fromkeys(METRIC_KEYS, 91.26), "scratch": dict.fromkeys(METRIC_KEYS, 80.0)}
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| defect type | image AUROC | pixel AUROC | AUPRO | image F1-max | pixel F1-max | pixel AP |"
    )
    assert lines[2] == "| dent | 91.3 | 91.3 | 91.3 | 91.3 | 91.3 | 91.3 |"
    assert lines[-1] == "| **mean** | 85.6 | 85.6 | 85.6 | 85.6 | 85.6 | 85.6 |"
