"""Pair building on a tiny generated `_ad` repo: exact boxes, every query present, determinism, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cadmtl.reference.pairs import (
    MISALIGNMENT_LEVELS,
    build_pairs,
    draw_misalignment,
    load_pairs,
    mask_boxes,
    rephotograph,
    similar_shapes,
)
from dataset_scripts.make_demo import build_demo_dataset
from dataset_scripts.schema import features_for
from dataset_scripts.writer import shard_files, write_split


@pytest.fixture(scope="module")
def ad_repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    build_demo_dataset(folder, train=8, validation=4, test=4, configs=["exterior_seg"])
    return folder


@pytest.fixture(scope="module")
def pairs_repo(ad_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    for split in ("validation", "test"):
        build_pairs(str(ad_repo), "exterior_ad", split, out, seed=3)
    return out


def _rows(repo: Path, split: str, columns=None) -> list[dict]:
    return [
        row
        for path in shard_files(repo, "pairs", split)
        for row in pq.read_table(path, columns=columns).to_pylist()
    ]


def _source_queries(ad_repo: Path, split: str) -> dict[str, np.ndarray]:
    out = {}
    for path in shard_files(ad_repo, "exterior_ad", split):
        for row in pq.read_table(path, columns=["image_id", "mask"]).to_pylist():
            out[row["image_id"]] = np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"])))
    return out


def test_every_query_appears_with_boxes_equal_to_the_mask_extent(ad_repo, pairs_repo):
    for split in ("validation", "test"):
        masks = _source_queries(ad_repo, split)
        pairs = list(load_pairs(pairs_repo, split))
        assert sorted(p.query_id for p in pairs) == sorted(masks)
        assert [p.pair_id for p in pairs] == [f"{split}-{i:05d}" for i in range(len(pairs))]
        for pair in pairs:
            mask = masks[pair.query_id]
            np.testing.assert_array_equal(pair.mask, mask)
            assert similar_shapes(pair.reference.size, pair.query.size)
            assert pair.category == "exterior" and pair.source == "real"
            assert pair.misalignment in MISALIGNMENT_LEVELS
            assert pair.misalignment_params["level"] == pair.misalignment
            if pair.has_anomaly:
                ys, xs = np.nonzero(mask == 1)
                assert pair.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert pair.boxes and all(
                    pair.box[0] <= b[0]
                    and pair.box[1] <= b[1]
                    and b[2] <= pair.box[2]
                    and b[3] <= pair.box[3]
                    for b in pair.boxes
                )
            else:
                assert pair.box == [0.0, 0.0, 0.0, 0.0] and pair.boxes == []
        assert {p.has_anomaly for p in pairs} == {True, False}
        assert all(p.reference_id.startswith("train/") for p in pairs)


def test_the_card_declares_the_pairs_config_and_load_dataset_reads_it(pairs_repo):
    import datasets

    assert datasets.get_dataset_config_names(str(pairs_repo)) == ["pairs"]
    assert set(datasets.get_dataset_split_names(str(pairs_repo), "pairs")) == {"validation", "test"}
    report = json.loads((pairs_repo / "pairs" / "build-test.json").read_text())
    assert report["rows"] == 4 and report["config"] == "exterior_ad"


def test_building_is_seeded_and_deterministic(ad_repo, pairs_repo, tmp_path):
    build_pairs(str(ad_repo), "exterior_ad", "test", tmp_path, seed=3)
    columns = ["pair_id", "reference_id", "misalignment_params", "box"]
    assert _rows(tmp_path, "test", columns) == _rows(pairs_repo, "test", columns)
    [a] = shard_files(tmp_path, "pairs", "test")
    [b] = shard_files(pairs_repo, "pairs", "test")
    assert a.read_bytes() == b.read_bytes()
    other = tmp_path / "other"
    build_pairs(str(ad_repo), "exterior_ad", "test", other, seed=4, levels=["medium"])
    assert _rows(other, "test", ["misalignment_params"]) != _rows(pairs_repo, "test", ["misalignment_params"])


def test_synthetic_pairs_paint_about_half_and_keep_exact_masks(ad_repo, tmp_path):
    build_pairs(str(ad_repo), "exterior_ad", "train", tmp_path, source="synthetic", seed=1)
    pairs = list(load_pairs(tmp_path, "train"))
    assert len(pairs) == 8 and sum(p.has_anomaly for p in pairs) == 4
    for pair in pairs:
        assert pair.source == "synthetic"
        assert pair.reference_id.split("#")[0] == pair.query_id  # the clean image itself, re-photographed
        if pair.has_anomaly:
            ys, xs = np.nonzero(pair.mask == 1)
            assert pair.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        else:
            assert pair.box == [0.0, 0.0, 0.0, 0.0]


def test_mask_boxes_one_box_per_8_connected_region():
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 1:4] = 1  # 6 pixels
    mask[3, 4] = 1  # diagonal neighbour: same region
    mask[6:9, 8:11] = 1  # 9 pixels
    mask[0, 11] = 255  # ignored pixels are not anomalous
    box, boxes = mask_boxes(mask)
    assert box == [1.0, 1.0, 11.0, 9.0]
    assert boxes == [[8.0, 6.0, 11.0, 9.0], [1.0, 1.0, 5.0, 4.0]]
    assert mask_boxes(np.zeros((4, 4), np.uint8)) == ([0.0, 0.0, 0.0, 0.0], [])


def test_rephotograph_none_is_identity_and_levels_stay_within_bounds():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    none = draw_misalignment("none", (40, 60), rng)
    np.testing.assert_array_equal(np.asarray(rephotograph(image, none)), np.asarray(image))
    for _ in range(20):
        params = draw_misalignment("medium", (40, 60), rng)
        assert abs(params["dx"]) <= 0.05 * 60 and abs(params["rotation"]) <= 5
        assert abs(params["brightness"] - 1) <= 0.15
    shifted = rephotograph(image, {"dx": 2, "dy": 0, "scale": 1, "rotation": 0, "brightness": 1})
    np.testing.assert_allclose(
        np.asarray(shifted, np.float32)[:, 10:50], np.asarray(image, np.float32)[:, 8:48], atol=1
    )
    with pytest.raises(ValueError, match="unknown misalignment level"):
        draw_misalignment("huge", (4, 4), rng)


# ------------------------------------------------------------------------------------------------ bad input


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _ad_row(
    index: int, split: str, size: tuple[int, int], anomalous: bool, normal_flag: bool | None = None
) -> dict:
    height, width = size
    mask = np.zeros((height, width), np.uint8)
    if anomalous:
        mask[2:6, 3:9] = 1
    return {
        "image": _png(np.full((height, width, 3), 100 + index, np.uint8)),
        "image_id": f"{split}/{index}",
        "width": width,
        "height": height,
        "domain": "exterior",
        "system": "body",
        "part": "door",
        "source": "real",
        "is_normal": (not anomalous) if normal_flag is None else normal_flag,
        "mask": _png(mask),
        "defect_type": int(anomalous),
    }


def _hand_repo(folder: Path, train: list[dict], test: list[dict]) -> Path:
    from dataset_scripts.card import write_card

    features = features_for("ad", ["good", "dent"])
    write_split(folder, "panel_ad", "train", train, features)
    if test:
        write_split(folder, "panel_ad", "test", test, features)
    write_card(folder)
    return folder


def test_different_sizes_are_resized_and_anomalous_references_refused(tmp_path):
    train = [
        _ad_row(0, "train", (16, 16), anomalous=False),
        _ad_row(1, "train", (16, 16), anomalous=True, normal_flag=True),  # marked normal, mask says otherwise
    ]
    test = [_ad_row(i, "test", (12, 40), anomalous=i % 2 == 1) for i in range(4)]
    repo = _hand_repo(tmp_path / "repo", train, test)
    report = build_pairs(str(repo), "panel_ad", "test", tmp_path / "pairs")
    assert report.counts["anomalous_references"] == 1
    assert report.counts["resized_references"] >= 1
    pairs = list(load_pairs(tmp_path / "pairs", "test"))
    assert len(pairs) == 4 and all(p.reference.size == (40, 12) for p in pairs)
    assert all(p.reference_id.startswith("train/0#") and p.reference_id.endswith("@40x12") for p in pairs)
    assert [p.box for p in pairs if p.has_anomaly] == [[3.0, 2.0, 9.0, 6.0]] * 2
    # a similar shape at another size is kept as it is (one rendering serves every query)
    repo = _hand_repo(
        tmp_path / "similar", train[:1], [_ad_row(i, "test", (20, 22), False) for i in range(3)]
    )
    report = build_pairs(str(repo), "panel_ad", "test", tmp_path / "similar-pairs", levels=["small"])
    pairs = list(load_pairs(tmp_path / "similar-pairs", "test"))
    assert report.counts["resized_references"] == 0 and {p.reference.size for p in pairs} == {(16, 16)}
    assert {p.reference_id for p in pairs} == {"train/0#small"}


def test_no_normal_reference_is_an_error(tmp_path):
    repo = _hand_repo(
        tmp_path / "repo",
        [_ad_row(0, "train", (8, 8), anomalous=True, normal_flag=True)],
        [_ad_row(1, "test", (8, 8), anomalous=False)],
    )
    with pytest.raises(ValueError, match=r"no normal image to use as a reference.*1 anomalous"):
        build_pairs(str(repo), "panel_ad", "test", tmp_path / "pairs")


def test_an_empty_pairs_split_is_an_error_naming_it(tmp_path):
    repo = _hand_repo(
        tmp_path / "repo",
        [_ad_row(0, "train", (8, 8), anomalous=False)],
        [_ad_row(1, "test", (8, 8), anomalous=True)],
    )
    # synthetic pairs use the normal images of the split only: the test split has none
    with pytest.raises(ValueError, match=r"panel_ad/test: no pair was built.*anomalous_sources_skipped"):
        build_pairs(str(repo), "panel_ad", "test", tmp_path / "pairs", source="synthetic")
    with pytest.raises(ValueError, match="not a pairs repo folder"):
        next(load_pairs(tmp_path / "missing", "validation"))


def test_an_existing_split_is_kept_unless_overwritten(ad_repo, pairs_repo, tmp_path):
    with pytest.raises(ValueError, match=r"has no split 'train'; available splits: \['test', 'validation'\]"):
        next(load_pairs(pairs_repo, "train"))
    from dataset_scripts.writer import SplitExistsError

    with pytest.raises(SplitExistsError, match="already exists"):
        build_pairs(str(ad_repo), "exterior_ad", "test", pairs_repo)
    with pytest.raises(ValueError, match="not an anomaly-detection config"):
        build_pairs(str(ad_repo), "exterior_seg", "test", tmp_path)
