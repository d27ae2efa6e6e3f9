"""`benchmarks/cars_selection_set.py`: held-out normal photos, each also painted, scored by one model's weight sweep and,
with `--against`, by a second model paired on the same photos; on a small generated `_ad` repo with tiny random
scorers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cars_selection_set as selection_set
from cadmtl.anomaly.data import load_anomaly_split
from cadmtl.cli import main as cadmtl_main
from dataset_scripts.make_demo import build_demo_dataset

HELD_OUT_FROM = 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("selection") / "mini"
    build_demo_dataset(folder, train=12, validation=6, test=4, configs=["chassis_cls"])
    return folder


def _fit(repo: Path, output: Path, seed: int) -> Path:
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(output)]
    argv += ["--backbone", "tiny", "--image-size", "64", "--coreset-fraction", "0.5"]
    assert cadmtl_main([*argv, "--max-train", str(HELD_OUT_FROM), "--seed", str(seed)]) == 0
    return output / "model"


def test_the_set_holds_every_held_out_normal_and_its_painted_copy_and_pairs_two_models(
    repo: Path, tmp_path: Path, capsys
) -> None:
    first, second = _fit(repo, tmp_path / "s0", 0), _fit(repo, tmp_path / "s1", 1)
    output = tmp_path / "selection.json"
    argv = [str(first), str(repo), "--config", "exterior_ad", "--held-out-from", str(HELD_OUT_FROM)]
    argv += ["--data", str(tmp_path / "no-data"), "--against", str(second), "--output", str(output)]
    assert selection_set.main(argv) == 0
    summary = json.loads(output.read_text())

    train = load_anomaly_split(str(repo), "exterior_ad", "train")
    validation_normals = [
        s for s in load_anomaly_split(str(repo), "exterior_ad", "validation") if s.is_normal
    ]
    held_out = len(train) - HELD_OUT_FROM + len(validation_normals)
    assert held_out > 0 and summary["normal_photos"] == held_out
    assert summary["painted_photos"] + summary["defect_not_placed"] == held_out
    assert summary["painted_photos"] > 0

    # no defect head: one row, the distances alone, its paired difference to itself exactly zero
    (row,) = summary["rows"]
    assert row["weight"] == summary["saved_weight"] == 0.0
    assert row["difference_to_saved"] == 0.0 and row["difference_to_saved_std"] == 0.0
    assert 0.0 <= row["image_auroc"] <= 100.0 and 0.0 <= row["pixel_auroc"] <= 100.0

    against = summary["against"]
    assert against["model"] == str(second) and against["weight"] == 0.0
    assert against["difference_to_model_std"] >= 0.0
    # the paired mean difference is the difference of the two bootstrap means, close to that of the point values
    assert against["difference_to_model"] == pytest.approx(
        against["image_auroc"] - row["image_auroc"], abs=3 * against["difference_to_model_std"] + 5
    )
    per_type = summary["per_type"]
    assert sum(r["painted_photos"] for r in per_type.values()) == summary["painted_photos"]
    for rates in per_type.values():
        assert 0.0 <= rates["peak_on_defect_percent"] <= 100.0 and 0.0 <= rates["image_auroc"] <= 100.0
        assert rates["normal_score_std"] >= 0.0
    printed = capsys.readouterr().out
    assert "map's peak on the defect %" in printed
    assert f"`{second}` at its saved w 0" in printed and "(paired)" in printed


def test_a_model_against_itself_differs_by_exactly_nothing(repo: Path, tmp_path: Path) -> None:
    model = _fit(repo, tmp_path / "same", 0)
    summary = selection_set.measure(
        str(model),
        str(repo),
        config="exterior_ad",
        held_out_from=HELD_OUT_FROM,
        data_dir=None,
        seed=0,
        against=str(model),
    )
    against, (row,) = summary["against"], summary["rows"]
    assert against["image_auroc"] == row["image_auroc"] and against["pixel_auroc"] == row["pixel_auroc"]
    assert against["difference_to_model"] == 0.0 and against["difference_to_model_std"] == 0.0


def test_too_few_train_photos_name_the_repo_and_the_option(repo: Path) -> None:
    with pytest.raises(
        ValueError, match=r"exterior_ad/train has \d+ photos: none is left after --held-out-from 99"
    ):
        selection_set.selection_photos(str(repo), "exterior_ad", 99, None, 0)


def test_per_type_diagnostics_on_hand_made_maps() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    photos = [
        {"type": None, "mask": None},
        {"type": "dent", "mask": mask, "normal_index": 0},
        {"type": None, "mask": None},
        {"type": "dent", "mask": mask, "normal_index": 2},
    ]
    peak_on = np.zeros((4, 4), np.float32)
    peak_on[0, 0] = 5.0  # the defect holds the map's highest value
    peak_off = np.zeros((4, 4), np.float32)
    peak_off[0, 0], peak_off[3, 3] = 1.0, 2.0  # something outside it is higher
    maps = [np.zeros((4, 4), np.float32), peak_on, np.zeros((4, 4), np.float32), peak_off]
    scores = np.array([1.0, 3.0, 2.0, 1.5])
    labels = np.array([False, True, False, True])
    (row,) = selection_set.per_type_diagnostics(photos, maps, scores, labels).values()
    assert row["painted_photos"] == 2 and row["peak_on_defect_percent"] == 50.0
    assert row["median_score_rise"] == pytest.approx(np.median([3.0 - 1.0, 1.5 - 2.0]))
    assert row["image_auroc"] == pytest.approx(75.0)  # 3 of the 4 painted / normal pairs ordered right
    assert row["normal_score_std"] == pytest.approx(0.5)
