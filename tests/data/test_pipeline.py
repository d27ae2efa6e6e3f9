"""The training data pipeline: rank/worker sharding, box and mask alignment, label maps, batching."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cadmtl.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TaskTransform,
    collate_fn,
    decode_rgb,
    load_split,
    make_dataloader,
)
from dataset_scripts.card import write_card
from dataset_scripts.images import encode_jpeg, encode_png
from dataset_scripts.schema import features_for
from dataset_scripts.writer import write_split

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _common(image: np.ndarray, image_id: str, normal: bool, fmt: str = "PNG") -> dict:
    data = encode_png(image) if fmt == "PNG" else encode_jpeg(image)
    return {
        "image": {"bytes": data, "path": None},
        "image_id": image_id,
        "width": image.shape[1],
        "height": image.shape[0],
        "domain": "exterior",
        "system": "",
        "part": "",
        "source": "synthetic",
        "is_normal": normal,
    }


def rectangle_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black image with a white rectangle at ``box`` = (x, y, w, h)."""
    image = np.zeros((height, width, 3), np.uint8)
    x, y, w, h = box
    image[y : y + h, x : x + w] = 255
    return image


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_repo")
    rng = np.random.default_rng(0)
    cls_rows = [
        {
            **_common(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), f"cls/{i:02d}", i % 3 == 0),
            "label": i % 3,
        }
        for i in range(16)
    ]
    write_split(
        root, "chassis_cls", "train", cls_rows, features_for("cls", ["normal", "a", "b"]), num_shards=4
    )
    write_split(
        root,
        "chassis_cls",
        "validation",
        cls_rows[:6],
        features_for("cls", ["normal", "a", "b"]),
        num_shards=3,
    )
    det_rows, seg_rows = [], []
    for i in range(4):
        box = (20 + 5 * i, 15, 40, 30)
        image = rectangle_image(120, 80, box)
        det_rows.append(
            {
                **_common(image, f"det/{i}", False),
                "objects": {"bbox": [list(map(float, box))], "category": [1], "area": [1200.0], "id": [i]},
            }
        )
        mask = np.zeros((80, 120), np.uint8)
        mask[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = 2
        seg_rows.append(
            {
                **_common(image, f"seg/{i}", False),
                "mask": {"bytes": encode_png(mask), "path": None},
                "mask_classes": [0, 2],
            }
        )
    write_split(
        root, "exterior_det", "train", det_rows, features_for("det", ["dent", "scratch"]), num_shards=2
    )
    write_split(
        root,
        "exterior_seg",
        "train",
        seg_rows,
        features_for("seg", ["background", "dent", "scratch"]),
        num_shards=2,
    )
    write_card(root)
    return root


def _ids(loader) -> list[str]:
    return [image_id for batch in loader for image_id in batch["image_ids"]]


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_split(repo: Path, train: bool) -> None:
    seen = []
    for rank in range(2):
        loader = make_dataloader(
            str(repo), "chassis_cls", "train", "cls", batch_size=3, image_size=16, train=train, infinite=False,
            num_workers=2, rank=rank, world_size=2, seed=5,
        )  # fmt: skip
        seen.append(_ids(loader))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"cls/{i:02d}" for i in range(16)]
    assert len(seen[0]) == len(seen[1]) == 8  # 4 shards: 2 per rank, 1 per worker


def test_eval_covers_the_split_even_when_shards_do_not_divide(repo: Path) -> None:
    seen = [
        _ids(make_dataloader(str(repo), "chassis_cls", "validation", "cls", batch_size=4, image_size=16, train=False,
                             rank=rank, world_size=2))
        for rank in range(2)
    ]  # fmt: skip
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == [
        f"cls/{i:02d}" for i in range(6)
    ]


def test_training_cycles_with_a_new_order_each_epoch(repo: Path) -> None:
    loader = make_dataloader(
        str(repo), "chassis_cls", "train", "cls", batch_size=4, image_size=16, train=True, seed=1
    )
    iterator = iter(loader)
    ids = [image_id for _ in range(12) for image_id in next(iterator)["image_ids"]]
    epochs = [ids[0:16], ids[16:32], ids[32:48]]
    assert all(sorted(epoch) == [f"cls/{i:02d}" for i in range(16)] for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def _pixels_to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    return ((pixel_values * STD + MEAN).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def test_detection_boxes_follow_the_pixels_through_augmentation(repo: Path) -> None:
    transform = TaskTransform("det", (64, 96), train=True)
    example = next(iter(datasets.load_dataset(str(repo), "exterior_det", split="train", streaming=True)))
    torch.manual_seed(0)
    checked_empty = checked_boxes = 0
    for _ in range(40):
        out = transform(example)
        pixels = _pixels_to_uint8(out["pixel_values"]).max(axis=2) > 128
        boxes = out["labels"]["boxes"]
        assert out["pixel_values"].shape == (3, 64, 96) and out["orig_size"] == (80, 120)
        if len(boxes) == 0:
            assert pixels.sum() < 64  # nothing (or a sliver under 1 px wide) of the rectangle is left
            checked_empty += 1
            continue
        assert out["labels"]["class_labels"].tolist() == [1]
        cx, cy, w, h = (boxes[0] * torch.tensor([96, 64, 96, 64])).tolist()
        rows, cols = np.nonzero(pixels)
        assert abs(cols.min() - (cx - w / 2)) <= 1.5 and abs(cols.max() + 1 - (cx + w / 2)) <= 1.5
        assert abs(rows.min() - (cy - h / 2)) <= 1.5 and abs(rows.max() + 1 - (cy + h / 2)) <= 1.5
        checked_boxes += 1
    assert checked_boxes >= 30


def test_segmentation_masks_follow_the_pixels_through_augmentation(repo: Path) -> None:
    transform = TaskTransform("seg", 48, train=True, crop_scale=(0.3, 1.0))
    example = next(iter(datasets.load_dataset(str(repo), "exterior_seg", split="train", streaming=True)))
    torch.manual_seed(0)
    for _ in range(20):
        out = transform(example)
        bright = _pixels_to_uint8(out["pixel_values"]).max(axis=2) > 128
        mask = out["labels"]
        assert mask.dtype == torch.long and mask.shape == (48, 48)
        assert set(torch.unique(mask).tolist()) <= {0, 2}
        labelled = (mask == 2).numpy()
        if labelled.sum() + bright.sum() == 0:
            continue
        # Bilinear image edges vs nearest mask edges may disagree on a one-pixel border only.
        iou = (labelled & bright).sum() / (labelled | bright).sum()
        assert iou > 0.8


def test_eval_resizes_the_whole_image_so_boxes_map_back_exactly(repo: Path) -> None:
    example = next(iter(datasets.load_dataset(str(repo), "exterior_det", split="train", streaming=True)))
    out = TaskTransform("det", 64, train=False)(example)
    x, y, w, h = example["objects"]["bbox"][0]
    expected = torch.tensor([(x + w / 2) / 120, (y + h / 2) / 80, w / 120, h / 80])
    assert torch.allclose(out["labels"]["boxes"][0], expected, atol=1e-6)
    assert out["orig_size"] == (80, 120) and out["image_id"] == example["image_id"]


def test_label_map_is_applied_and_unknown_ids_are_errors(repo: Path) -> None:
    det = next(iter(datasets.load_dataset(str(repo), "exterior_det", split="train", streaming=True)))
    assert TaskTransform("det", 32, False, label_map={0: 4, 1: 7})(det)["labels"][
        "class_labels"
    ].tolist() == [7]
    with pytest.raises(ValueError, match=r"dataset class id 1 is not in label_map \(it maps ids \[0\]\)"):
        TaskTransform("det", 32, False, label_map={0: 4})(det)
    seg = next(iter(datasets.load_dataset(str(repo), "exterior_seg", split="train", streaming=True)))
    mapped = TaskTransform("seg", 32, False, label_map={0: 0, 1: 3, 2: 9})(seg)["labels"]
    assert set(torch.unique(mapped).tolist()) == {0, 9}
    with pytest.raises(ValueError, match=r"mask class ids \[2\] are not in label_map"):
        TaskTransform("seg", 32, False, label_map={0: 0, 1: 3})(seg)
    loader = make_dataloader(
        str(repo),
        "chassis_cls",
        "validation",
        "cls",
        batch_size=6,
        image_size=16,
        train=False,
        label_map={0: 2, 1: 0, 2: 1},
    )
    batch = next(iter(loader))
    # Row i was written with label i % 3; the map sends 0 -> 2, 1 -> 0, 2 -> 1.
    assert batch["labels"].tolist() == [[2, 0, 1][int(i[-2:]) % 3] for i in batch["image_ids"]]


def test_collate_shapes_per_task(repo: Path) -> None:
    cls = next(
        iter(
            make_dataloader(
                str(repo), "chassis_cls", "validation", "cls", batch_size=4, image_size=(16, 24), train=False
            )
        )
    )
    assert cls["pixel_values"].shape == (4, 3, 16, 24) and cls["pixel_values"].dtype == torch.float32
    assert cls["labels"].dtype == torch.long and cls["labels"].shape == (4,)
    assert cls["orig_sizes"].tolist() == [[16, 24]] * 4 and len(set(cls["image_ids"])) == 4
    det = next(
        iter(
            make_dataloader(
                str(repo), "exterior_det", "train", "det", batch_size=2, image_size=32, train=False
            )
        )
    )
    assert isinstance(det["labels"], list) and len(det["labels"]) == 2
    assert det["labels"][0]["boxes"].shape == (1, 4) and det["labels"][0]["class_labels"].dtype == torch.long
    seg = next(
        iter(
            make_dataloader(
                str(repo), "exterior_seg", "train", "seg", batch_size=2, image_size=32, train=False
            )
        )
    )
    assert seg["labels"].shape == (2, 32, 32) and seg["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="unknown task"):
        collate_fn("ocr")


def test_load_split_errors_list_what_exists(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"config 'nope' not found; available configs: \['chassis_cls', 'exterior_det'"
    ):
        load_split(str(repo), "nope", "train")
    with pytest.raises(ValueError, match=r"has no split 'test'; available splits: \['train'\]"):
        load_split(str(repo), "exterior_det", "test")
    with pytest.raises(ValueError, match="cannot open dataset"):
        load_split(str(tmp_path / "missing"), "exterior_det", "train")
    with pytest.raises(ValueError, match="is a cls config, not det"):
        make_dataloader(str(repo), "chassis_cls", "train", "det", batch_size=2, image_size=16, train=False)
    # An empty split (a shard with no rows) is refused with a clear message.
    empty = tmp_path / "empty"
    (empty / "plant_cls").mkdir(parents=True)
    features = features_for("cls", ["normal", "a"])
    pq.write_table(
        pa.Table.from_pylist([], schema=features.arrow_schema),
        empty / "plant_cls" / "train-00000-of-00001.parquet",
    )
    (empty / "README.md").write_text(
        "---\nconfigs:\n- config_name: plant_cls\n  data_files:\n  - split: train\n    path: plant_cls/train-*.parquet\n---\n"
    )
    with pytest.raises(ValueError, match="split 'train' of config 'plant_cls' is empty"):
        load_split(str(empty), "plant_cls", "train")
    assert len(load_split(str(repo), "chassis_cls", "validation", streaming=False)) == 6


def test_reduced_scale_jpeg_decoding_keeps_sizes_and_boxes_exact() -> None:
    image = rectangle_image(800, 600, (200, 150, 400, 300))
    data = encode_jpeg(image)
    full, full_size = decode_rgb(data)
    small, small_size = decode_rgb(data, min_size=(96, 128))
    assert full.shape == (3, 600, 800) and full_size == small_size == (600, 800)
    assert small.shape == (3, 150, 200)  # 1/4 scale is the smallest still >= 96 x 128
    example = {
        **_common(image, "big", False, fmt="JPEG"),
        "objects": {"bbox": [[200.0, 150.0, 400.0, 300.0]], "category": [0]},
    }
    out = TaskTransform("det", (96, 128), train=False)(example)
    assert torch.allclose(out["labels"]["boxes"][0], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    bright = _pixels_to_uint8(out["pixel_values"]).max(axis=2) > 128
    rows, cols = np.nonzero(bright)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (32, 96, 24, 72)
    assert decode_rgb(Image.open(io.BytesIO(data)))[0].shape == (3, 600, 800)  # a decoded PIL image works too


def test_a_repo_rebuilt_in_place_is_read_as_it_is_now(tmp_path: Path, monkeypatch) -> None:
    """datasets 5.2 caches non-streaming local loads by folder name; load_split must never return stale rows."""
    from dataset_scripts.make_demo import build_demo_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    first, second = tmp_path / "a" / "repo", tmp_path / "b" / "repo"
    build_demo_dataset(first, train=4, validation=2, test=2, seed=0)
    build_demo_dataset(second, train=6, validation=2, test=2, seed=1)
    for streaming in (False, True):
        rows_a = [
            row["image_id"] for row in load_split(str(first), "chassis_cls", "train", streaming=streaming)
        ]
        rows_b = [
            row["image_id"] for row in load_split(str(second), "chassis_cls", "train", streaming=streaming)
        ]
        assert len(rows_a) == 4 and len(rows_b) == 6  # same folder name, different repos
    build_demo_dataset(first, train=5, validation=2, test=2, seed=2)  # rebuilt in place with other rows
    for streaming in (False, True):
        dataset = load_split(str(first), "chassis_cls", "train", streaming=streaming)
        assert len([row["image_id"] for row in dataset]) == 5
