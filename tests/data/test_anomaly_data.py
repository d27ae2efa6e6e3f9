"""Anomaly-detection (``*_ad``) configs: the mvtec, magnetic_tile and ad_folders converters and the demo.

Every build goes to its own tmp folder and is read back streaming: a non-streaming ``load_dataset`` of a
local folder is cached by the folder's name in datasets 5.2, so a rebuilt folder could return stale rows.
"""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset_scripts.convert import main as convert_main
from dataset_scripts.make_demo import build_demo_dataset
from dataset_scripts.report import load_reports
from dataset_scripts.schema import CONFIG_KINDS, TASKS, features_for, label_names, task_of_config
from dataset_scripts.writer import split_names

MAGNETIC_TILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "magnetic_tile"
SIZE = (40, 32)  # width, height


def save_image(path: Path, size: tuple[int, int] = SIZE, mode: str = "RGB") -> Path:
    """A random image whose pixels depend on its path (no two test images share bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32("/".join(path.parts[-3:]).encode()))
    pixels = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    if mode == "I;16":
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(pixels).convert(mode).save(path)
    return path


def save_mask(
    path: Path,
    size: tuple[int, int] = SIZE,
    box: tuple[int, int, int, int] | None = (5, 4, 15, 12),
    value=255,
) -> Path:
    """An L mask, ``value`` inside ``box`` = (x0, y0, x1, y1), 0 elsewhere (all 0 without a box)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = value
    Image.fromarray(mask).save(path)
    return path


def convert(*args) -> int:
    return convert_main([*map(str, args), "--no-progress"])


def rows(repo: Path, config: str, split: str) -> list[dict]:
    return list(datasets.load_dataset(str(repo), config, split=split, streaming=True))


def names_of(repo: Path, config: str, split: str = "test") -> list[str]:
    return label_names(datasets.load_dataset(str(repo), config, split=split, streaming=True).features, "ad")


def reports(repo: Path, config: str) -> dict[str, Counter]:
    return {split: report.counts() for (cfg, split), report in load_reports(repo).items() if cfg == config}


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec AD category: 3 train/good, test/good 2, test/crack 2, test/scratch 1, with masks."""
    root = tmp_path / "src" / "bottle"
    for name in ("000", "001", "002"):
        save_image(root / "train" / "good" / f"{name}.png")
    for name in ("000", "001"):
        save_image(root / "test" / "good" / f"{name}.png")
        save_image(root / "test" / "crack" / f"{name}.png")
        save_mask(root / "ground_truth" / "crack" / f"{name}_mask.png")
    save_image(root / "test" / "scratch" / "000.png")
    save_mask(root / "ground_truth" / "scratch" / "000_mask.png", box=(0, 0, 40, 2))
    (root / "license.txt").write_text("not part of the layout\n")
    return root


def test_config_kinds_keep_the_model_tasks_apart() -> None:
    assert task_of_config("bottle_ad") == "ad" and "ad" in CONFIG_KINDS and "ad" not in TASKS
    features = features_for("ad", ["good", "crack"])
    assert label_names(features, "ad") == ["good", "crack"] and features["mask"] == datasets.Image()
    with pytest.raises(ValueError, match="first defect type must be 'good'"):
        features_for("ad", ["crack", "good"])


def test_mvtec_category_converts(mvtec: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad") == 0
    assert split_names(repo, "bottle_ad") == ["test", "train"]  # no validation by default
    assert datasets.get_dataset_split_names(str(repo), "bottle_ad") == ["train", "test"]
    names = names_of(repo, "bottle_ad")
    assert names == ["good", "crack", "scratch"]
    train = rows(repo, "bottle_ad", "train")
    assert len(train) == 3 and all(r["is_normal"] and names[r["defect_type"]] == "good" for r in train)
    test = {r["image_id"]: r for r in rows(repo, "bottle_ad", "test")}
    assert sorted(test) == [
        "test/crack/000",
        "test/crack/001",
        "test/good/000",
        "test/good/001",
        "test/scratch/000",
    ]
    for row in [*train, *test.values()]:
        mask = np.asarray(row["mask"])
        assert mask.shape == (SIZE[1], SIZE[0]) and row["image"].size == SIZE == (row["width"], row["height"])
        defect = names[row["defect_type"]]
        assert row["is_normal"] == (defect == "good") and defect == row["image_id"].split("/")[1]
        if row["is_normal"]:
            assert not mask.any()
        else:
            assert set(np.unique(mask)) == {0, 1}
    crack = np.asarray(test["test/crack/000"]["mask"])
    assert crack[4:12, 5:15].all() and crack.sum() == 80
    assert "bottle_ad" in (repo / "README.md").read_text()
    assert set(reports(repo, "bottle_ad")) == {"train", "test"}


def test_mvtec_validation_fraction_is_seeded_and_stratified(mvtec: Path, tmp_path: Path) -> None:
    def build(name: str, seed: int) -> dict[str, set[str]]:
        repo = tmp_path / name
        args = ["--validation-fraction", "0.5", "--seed", seed]
        assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad", *args) == 0
        return {
            s: {r["image_id"] for r in rows(repo, "bottle_ad", s)} for s in ("train", "validation", "test")
        }

    first, again = build("a", 0), build("b", 0)
    assert first == again
    assert len(first["train"]) == 3 and len(first["validation"]) == 2 and len(first["test"]) == 3
    # 1 of 2 good, 1 of 2 crack; the only scratch stays in test (test keeps every defect type)
    assert {i.split("/")[1] for i in first["validation"]} == {"good", "crack"}
    assert {i.split("/")[1] for i in first["test"]} == {"good", "crack", "scratch"}
    assert first["validation"] | first["test"] == {
        f"test/{t}/{n}" for t in ("good", "crack") for n in ("000", "001")
    } | {"test/scratch/000"}


def test_mvtec_bad_inputs_are_counted_or_refused(mvtec: Path, tmp_path: Path, capsys) -> None:
    save_mask(mvtec / "ground_truth" / "crack" / "007_mask.png")  # mask without an image
    save_image(mvtec / "test" / "scratch" / "001.png")  # anomalous image without a mask
    save_mask(mvtec / "ground_truth" / "crack" / "001_mask.png", size=(20, 16))  # size differs
    (mvtec / "test" / "good" / "broken.png").write_bytes(b"not a png at all")
    save_image(mvtec / "test" / "good" / "gray.png", mode="L")
    save_image(mvtec / "test" / "good" / "rgba.png", mode="RGBA")
    save_image(mvtec / "train" / "good" / "deep.png", mode="I;16")
    (mvtec / "train" / "good" / "notes.txt").write_text("x")
    repo = tmp_path / "repo"
    assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad") == 0
    counts = reports(repo, "bottle_ad")
    assert counts["test"]["missing_file"] == 1 and counts["test"]["missing_mask"] == 1
    assert counts["test"]["mask_size_mismatch"] == 1 and counts["test"]["undecodable"] == 1
    assert counts["test"]["converted_mode"] == 2 and counts["train"]["converted_mode"] == 1
    assert counts["train"]["not_an_image"] == 1
    test = {r["image_id"]: r for r in rows(repo, "bottle_ad", "test")}
    assert "test/crack/001" not in test and "test/scratch/001" not in test and "test/good/broken" not in test
    assert test["test/good/gray"]["image"].mode == "RGB" and len(rows(repo, "bottle_ad", "train")) == 4
    report_text = (repo / "reports" / "bottle_ad" / "test.md").read_text()
    assert "ground_truth/crack/007_mask.png" in report_text and "test/scratch/001.png" in report_text

    strict = tmp_path / "strict"
    assert convert("mvtec", mvtec, "--output-dir", strict, "--config", "bottle_ad", "--strict") == 1
    error = capsys.readouterr().err
    assert "ground_truth/crack/007_mask.png" in error and "mask_size_mismatch: test/crack/001.png" in error
    assert split_names(strict, "bottle_ad") == []  # nothing written, not even the clean train split


def test_anomalous_train_images_are_excluded_or_refused(mvtec: Path, tmp_path: Path, capsys) -> None:
    save_image(mvtec / "train" / "crack" / "000.png")
    repo = tmp_path / "repo"
    assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad") == 0
    assert reports(repo, "bottle_ad")["train"]["anomalous_in_train"] == 1
    train = rows(repo, "bottle_ad", "train")
    assert len(train) == 3 and all(r["is_normal"] for r in train)
    assert (
        convert("mvtec", mvtec, "--output-dir", tmp_path / "strict", "--config", "bottle_ad", "--strict") == 1
    )
    assert "anomalous_in_train: train/crack/000.png" in capsys.readouterr().err


def test_empty_source_mask_is_kept_and_counted(mvtec: Path, tmp_path: Path) -> None:
    save_mask(mvtec / "ground_truth" / "crack" / "000_mask.png", box=None)
    repo = tmp_path / "repo"
    assert (
        convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad", "--strict") == 0
    )  # a fix, not a skip
    assert reports(repo, "bottle_ad")["test"]["empty_anomaly_mask"] == 1
    row = next(r for r in rows(repo, "bottle_ad", "test") if r["image_id"] == "test/crack/000")
    assert not row["is_normal"] and names_of(repo, "bottle_ad")[row["defect_type"]] == "crack"
    assert not np.asarray(row["mask"]).any()


def test_cli_refuses_arguments_the_layout_decides(mvtec: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad", "--split", "test") == 1
    assert (
        convert(
            "mvtec", mvtec, "--output-dir", repo, "--config", "bottle_ad", "--normal-test-fraction", "0.2"
        )
        == 1
    )
    assert convert("mvtec", mvtec, "--output-dir", repo, "--config", "bottle_seg") == 1
    assert convert("folders", mvtec / "test", "--output-dir", repo, "--config", "bottle_ad") == 1
    assert convert("mvtec", mvtec / "test", "--output-dir", repo, "--config", "bottle_ad") == 1
    error = capsys.readouterr().err
    assert "--split not used" in error and "not an MVTec AD category folder" in error
    assert not repo.exists() or split_names(repo, "bottle_ad") == []


def test_magnetic_tile_layout_thresholds_soft_masks(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    for index in range(10):
        save_image(root / "MT_Free" / "Imgs" / f"free{index}.jpg", mode="L")
        save_mask(root / "MT_Free" / "Imgs" / f"free{index}.png", box=None)
    for index in range(2):
        save_image(root / "MT_Crack" / "Imgs" / f"crack{index}.jpg", mode="L")
        mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
        mask[0:10, 0:10], mask[10:20, 0:10], mask[20:30, 0:10] = 127, 128, 255
        Image.fromarray(mask).save(root / "MT_Crack" / "Imgs" / f"crack{index}.png")
    save_mask(root / "MT_Free" / "Imgs" / "free9.png")  # a "normal" tile whose mask marks a defect
    save_image(root / "MT_Crack" / "Imgs" / "lost.jpg", mode="L")  # no mask
    save_mask(root / "MT_Crack" / "Imgs" / "orphan.png")  # no image
    repo = tmp_path / "repo"
    args = ["--normal-test-fraction", "0.2", "--validation-fraction", "0.5"]
    assert convert("magnetic_tile", root, "--output-dir", repo, "--config", "tile_ad", *args) == 0
    counts = reports(repo, "tile_ad")
    total = sum(counts.values(), Counter())
    assert total["normal_mask_not_empty"] == 1 and total["missing_mask"] == 1 and total["missing_file"] == 1
    assert counts["test"]["missing_mask"] == 1
    split_rows = {s: rows(repo, "tile_ad", s) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in split_rows.items()} in (
        {"train": 7, "validation": 2, "test": 2},  # free9 drawn for train (skipped there)
        {"train": 8, "validation": 1, "test": 2},
        {"train": 8, "validation": 2, "test": 1},
    )
    assert names_of(repo, "tile_ad") == ["good", "crack"]
    anomalous = [r for rs in split_rows.values() for r in rs if not r["is_normal"]]
    assert len(anomalous) == 2
    for row in anomalous:
        mask = np.asarray(row["mask"])
        assert not mask[0:10, 0:10].any() and mask[10:30, 0:10].all() and mask.sum() == 200


def test_ad_folders_have_image_level_labels_only(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for index in range(6):
        save_image(root / "good" / f"ok{index}.jpg")
    for index in range(2):
        save_image(root / "dent" / f"d{index}.jpg")
    repo = tmp_path / "repo"
    assert convert("ad_folders", root, "--output-dir", repo, "--config", "panel_ad") == 0
    split_rows = {s: rows(repo, "panel_ad", s) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in split_rows.items()} == {"train": 4, "validation": 2, "test": 2}
    assert all(r["is_normal"] for r in split_rows["train"])
    for row in split_rows["validation"] + split_rows["test"]:
        mask = np.asarray(row["mask"])
        assert mask.shape == (SIZE[1], SIZE[0])
        assert set(np.unique(mask)) == ({0} if row["is_normal"] else {255})
    assert sum(not r["is_normal"] for r in split_rows["test"]) == 1
    assert "image-level labels only" in (repo / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(), reason=f"the shared real data folder {MAGNETIC_TILE} is absent"
)
def test_real_magnetic_tile_converts(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert (
        convert("magnetic_tile", MAGNETIC_TILE, "--output-dir", repo, "--config", "tile_ad", "--strict") == 0
    )
    counts = {}
    for split in ("train", "validation", "test"):
        table = pq.ParquetDataset(sorted((repo / "tile_ad").glob(f"{split}-*.parquet"))).read(
            columns=["is_normal", "defect_type"]
        )
        counts[split] = Counter(table["defect_type"].to_pylist())
        assert sum(table["is_normal"].to_pylist()) == counts[split][0]
    assert names_of(repo, "tile_ad") == ["good", "blowhole", "break", "crack"]
    assert counts["train"] == {0: 666}  # 952 normal tiles, 30 % (286) held out, half of them per eval split
    assert counts["validation"] == {0: 143, 1: 58, 2: 43, 3: 29}
    assert counts["test"] == {0: 143, 1: 57, 2: 42, 3: 28}
    issues = sum(reports(repo, "tile_ad").values(), Counter())
    assert set(issues) == {"converted_mode"}  # grayscale tiles stored as RGB; nothing skipped
    row = next(iter(datasets.load_dataset(str(repo), "tile_ad", split="test", streaming=True)))
    assert np.asarray(row["mask"]).shape == (row["height"], row["width"])


def test_demo_ad_config(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    written = build_demo_dataset(out, train=6, validation=4, test=4, configs=["chassis_cls"])
    assert written["exterior_ad"] == {"train": 6, "validation": 4, "test": 4}
    assert datasets.get_dataset_config_names(str(out)) == ["chassis_cls", "exterior_ad"]
    assert datasets.get_dataset_split_names(str(out), "exterior_ad") == ["train", "validation", "test"]
    names = names_of(out, "exterior_ad")
    assert names == ["good", "corrosion", "scratch", "missing_part"]
    assert all(r["is_normal"] and not np.asarray(r["mask"]).any() for r in rows(out, "exterior_ad", "train"))
    for split in ("validation", "test"):
        split_rows = rows(out, "exterior_ad", split)
        assert sum(r["is_normal"] for r in split_rows) == 2
        for row in split_rows:
            mask = np.asarray(row["mask"])
            assert mask.shape == (row["height"], row["width"]) and row["domain"] == "exterior"
            assert set(np.unique(mask)) == ({0} if row["is_normal"] else {0, 1})
            assert (names[row["defect_type"]] == "good") == row["is_normal"]
