"""The cad100k-mini demo: all 8 configs, deterministic bytes, sharding, and consistent annotations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
import pytest

from dataset_scripts.make_demo import build_demo_dataset, demo_classes
from dataset_scripts.make_demo import main as demo_main
from dataset_scripts.schema import label_names, task_of_config
from dataset_scripts.taxonomy import load_taxonomy

COUNTS = {"train": 12, "validation": 4, "test": 4}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cad100k-mini"
    build_demo_dataset(out, **COUNTS)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_all_cad_configs_and_splits(demo: Path) -> None:
    configs = [*load_taxonomy().config_names(), "exterior_ad"]  # the 8 CAD configs, then the ad one
    assert datasets.get_dataset_config_names(str(demo)) == configs
    for config in configs:
        assert datasets.get_dataset_split_names(str(demo), config) == ["train", "validation", "test"]
        assert len(list((demo / config).glob("train-*-of-00004.parquet"))) == 4
        assert len(list((demo / config).glob("validation-*-of-00002.parquet"))) == 2


def test_same_arguments_same_bytes(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_demo_dataset(again, **COUNTS)
    assert _digests(again) == _digests(demo)
    different = tmp_path / "seed1"
    build_demo_dataset(different, seed=1, configs=["chassis_cls"], **COUNTS)
    assert (
        _digests(different)["chassis_cls/train-00000-of-00004.parquet"]
        != _digests(demo)["chassis_cls/train-00000-of-00004.parquet"]
    )


def test_classes_have_distinct_styles() -> None:
    taxonomy = load_taxonomy()
    for domain in taxonomy.domains:
        classes = demo_classes(taxonomy, domain, 3)
        assert len({taxonomy.node(c).synthesis for c in classes}) == 3
        assert all(taxonomy.node(c).domain == domain for c in classes)
    assert demo_classes(taxonomy, "exterior", 3) == ["corrosion", "scratch", "missing_part"]


@pytest.mark.parametrize("config", load_taxonomy().config_names())
def test_rows_are_consistent(demo: Path, config: str) -> None:
    task = task_of_config(config)
    dataset = datasets.load_dataset(str(demo), config, split="train", streaming=True)
    names = label_names(dataset.features, task)
    rows = list(dataset)
    assert len(rows) == COUNTS["train"] and len({r["image_id"] for r in rows}) == len(rows)
    assert sum(r["is_normal"] for r in rows) == round(0.2 * COUNTS["train"])
    taxonomy = load_taxonomy()
    for row in rows:
        width, height = row["image"].size
        assert (width, height) == (row["width"], row["height"]) and 96 <= width <= 192 and 96 <= height <= 192
        assert row["source"] == "synthetic" and row["domain"] == taxonomy.domain_of_config(config)
        taxonomy.check_hierarchy(row["domain"], row["system"], row["part"])
        if task == "cls":
            assert (names[row["label"]] == "normal") == row["is_normal"]
        elif task == "det":
            boxes = row["objects"]["bbox"]
            assert (len(boxes) == 0) == row["is_normal"]
            for (x, y, w, h), area in zip(boxes, row["objects"]["area"]):
                assert x >= 0 and y >= 0 and x + w <= width and y + h <= height and 0 < area <= w * h
        else:
            mask = np.asarray(row["mask"])
            assert mask.shape == (height, width)
            assert row["mask_classes"] == sorted(np.unique(mask).tolist())
            assert (mask.max() == 0) == row["is_normal"]
    present = {names[r["label"]] for r in rows} if task == "cls" else None
    if present is not None:
        assert present == set(names)  # every class, including normal, appears in train


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mini"
    assert demo_main([str(out), "--train", "4", "--validation", "2", "--test", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "README.md").read_text().count("| train | 4 |") == 9  # 8 CAD configs + exterior_ad
