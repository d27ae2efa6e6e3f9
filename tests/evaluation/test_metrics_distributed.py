"""The three metrics under torch.distributed: 2 real CPU processes (gloo) give the single-process result."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cadmtl.evaluation.metrics import (
    ClassificationMetrics,
    DetectionMetrics,
    MetricsReport,
    SegmentationMetrics,
)

NUM_CLASSES = 5
NUM_IMAGES = 11  # odd, so the two ranks hold different numbers of images


def _data() -> dict:
    """One deterministic split for every task (the same on every process)."""
    rng = np.random.default_rng(1234)
    logits = torch.from_numpy(rng.normal(size=(NUM_IMAGES, NUM_CLASSES)))
    labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, NUM_IMAGES))
    seg_targets, seg_predictions = [], []
    for index in range(NUM_IMAGES):
        shape = (8 + index % 3, 9)  # maps of different sizes
        target = rng.integers(0, NUM_CLASSES - 1, shape)  # the last class is absent from the ground truth
        target[rng.random(shape) < 0.1] = 255
        prediction = np.where(
            rng.random(shape) < 0.6, np.clip(target, 0, NUM_CLASSES - 1), rng.integers(0, NUM_CLASSES, shape)
        )
        seg_targets.append(torch.from_numpy(target))
        seg_predictions.append(torch.from_numpy(prediction))
    det_predictions, det_targets = [], []
    for index in range(NUM_IMAGES):
        count = int(rng.integers(0, 5)) if index != 3 else 0  # image 3 has no ground truth
        xy = rng.uniform(0, 200, (count, 2))
        wh = rng.uniform(10, 120, (count, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_labels = rng.integers(0, 3, count)
        keep = rng.random(count) < 0.8
        noisy = boxes[keep] + rng.normal(0, 4, (int(keep.sum()), 4))
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        det_predictions.append(
            {
                "boxes": torch.from_numpy(noisy).float(),
                # coarse scores make ties across images likely: the result must still not depend on sharding
                "scores": torch.from_numpy(np.round(rng.uniform(0, 1, len(noisy)), 1)).float(),
                "labels": torch.from_numpy(gt_labels[keep]),
            }
        )
        det_targets.append({"boxes": torch.from_numpy(boxes).float(), "labels": torch.from_numpy(gt_labels)})
    return {
        "logits": logits,
        "labels": labels,
        "seg_predictions": seg_predictions,
        "seg_targets": seg_targets,
        "det_predictions": det_predictions,
        "det_targets": det_targets,
    }


def _evaluate(rank: int, world_size: int) -> dict[str, MetricsReport]:
    """Each rank evaluates its shard; with world_size=1 this is the single-process reference."""
    data = _data()
    contiguous = np.array_split(np.arange(NUM_IMAGES), world_size)[rank]  # rank 0: 0..5, rank 1: 6..10
    interleaved = np.arange(rank, NUM_IMAGES, world_size)  # DistributedSampler style: rank 0: 0, 2, 4...

    classification = ClassificationMetrics(NUM_CLASSES, top_k=(1, 3))
    for index in interleaved:
        classification.update(data["logits"][index : index + 1], data["labels"][index : index + 1])

    segmentation = SegmentationMetrics(NUM_CLASSES)
    segmentation.update(
        [data["seg_predictions"][i] for i in interleaved], [data["seg_targets"][i] for i in interleaved]
    )

    detection = DetectionMetrics()  # no image ids: sequential ids in rank order, so shard contiguously
    detection.update(
        [data["det_predictions"][i] for i in contiguous], [data["det_targets"][i] for i in contiguous]
    )

    with_ids = DetectionMetrics(label_names=["a", "b", "c"])  # ids given: any sharding gives the same result
    with_ids.update(
        [data["det_predictions"][i] for i in interleaved],
        [{**data["det_targets"][i], "image_id": int(i)} for i in interleaved],
    )
    reports = {
        "classification": classification.compute_detailed(),
        "segmentation": segmentation.compute_detailed(),
        "detection": detection.compute_detailed(),
        "detection_with_ids": with_ids.compute_detailed(),
    }
    # a second compute() must not sum the state again
    reports["classification_again"] = classification.compute_detailed()
    reports["segmentation_again"] = segmentation.compute_detailed()
    return reports


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        outcome: dict = {"reports": _evaluate(rank, world_size)}
        # every rank adds image_id 7: the error must reach every rank (rank 0 evaluates, the others wait)
        duplicated = DetectionMetrics()
        empty = {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
        }
        duplicated.update([empty], [{**empty, "image_id": 7}])
        try:
            duplicated.compute()
        except ValueError as error:
            outcome["duplicate_error"] = str(error)
        # a rank without samples still takes part in the sum
        sparse = ClassificationMetrics(3, top_k=(1,))
        if rank == 0:
            sparse.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 0]))
        outcome["sparse"] = sparse.compute()
        # opting out of the sync: each rank sees only its own data
        local = ClassificationMetrics(3, top_k=(1,), sync_on_compute=False)
        local.update(torch.eye(3)[rank : rank + 1], torch.tensor([0]))
        outcome["local"] = local.compute()
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(outcome, handle)
    finally:
        dist.destroy_process_group()


def _assert_reports_equal(actual: MetricsReport, expected: MetricsReport) -> None:
    for section in ("metrics", "extra_metrics"):
        got, want = getattr(actual, section), getattr(expected, section)
        assert got.keys() == want.keys()
        for key in want:
            assert (math.isnan(got[key]) and math.isnan(want[key])) or got[key] == want[key], (section, key)
    assert actual.counts == expected.counts
    assert actual.label_names == expected.label_names
    assert actual.analysis == expected.analysis  # detection curves and confusion matrix (JSON-ready, no NaN)
    for name, row in expected.per_class.items():
        for key, value in row.items():
            other = actual.per_class[name][key]
            assert (isinstance(value, float) and math.isnan(value) and math.isnan(other)) or other == value
    if expected.confusion_matrix is None:
        assert actual.confusion_matrix is None
    else:
        np.testing.assert_array_equal(actual.confusion_matrix, expected.confusion_matrix)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_equal_single_process(tmp_path: Path, monkeypatch) -> None:
    if "OMP_NUM_THREADS" not in os.environ:  # the spawned ranks only; later subprocesses keep their default
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    outcomes = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]
    single = _evaluate(rank=0, world_size=1)

    assert single["detection"].metrics["AP"] > 0  # a non-trivial reference
    for outcome in outcomes:
        for name, report in single.items():
            _assert_reports_equal(outcome["reports"][name], report)
        assert "image_id 7 was added more than once" in outcome["duplicate_error"]
        assert outcome["sparse"] == {"acc@1": 0.5}
    assert outcomes[0]["local"] == {"acc@1": 1.0} and outcomes[1]["local"] == {"acc@1": 0.0}
    # the split really was uneven and shared: rank sums equal the whole split
    assert single["classification"].counts["num_samples"] == NUM_IMAGES
    assert single["detection"].counts["num_images"] == NUM_IMAGES
