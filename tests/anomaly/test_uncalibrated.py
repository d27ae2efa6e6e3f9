"""An anomaly model without thresholds is never silent: a warning when it is fitted, "uncalibrated" wherever its
verdict would show (`fit_results.json`, `evaluate`'s scores.csv and eval_results.json, `predict`'s scores.csv)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from cadmtl.anomaly.data import load_anomaly_split
from cadmtl.cli import main
from dataset_scripts.make_demo import build_demo_dataset


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ad") / "mini"
    build_demo_dataset(folder, train=4, validation=2, test=3, configs=["exterior_ad"])
    return folder


FIT = [
    "--backbone",
    "tiny",
    "--image-size",
    "64",
    "--coreset-fraction",
    "0.5",
    "--calibration-split",
    "nosuch",
]


def test_a_scorer_fitted_without_calibration_images_says_uncalibrated(repo: Path, tmp_path, caplog) -> None:
    output = tmp_path / "fit"
    argv = [
        "anomaly",
        "fit",
        str(repo),
        "--config",
        "exterior_ad",
        "--output-dir",
        str(output),
        "--max-train",
        "1",
    ]
    with caplog.at_level(logging.WARNING, logger="cadmtl.anomaly"):
        assert main([*argv, *FIT]) == 0
    assert "the scorer is saved UNCALIBRATED" in caplog.text and "no 'nosuch' split" in caplog.text
    summary = json.loads((output / "fit_results.json").read_text())
    assert summary["calibration"]["status"] == "uncalibrated" and summary["calibration"]["method"] == "none"
    config = json.loads((output / "model" / "config.json").read_text())
    assert config["image_threshold"] is None and config["pixel_threshold"] is None

    evaluation = tmp_path / "eval"
    argv = [
        "anomaly",
        "evaluate",
        str(output / "model"),
        str(repo),
        "--config",
        "exterior_ad",
        "--split",
        "test",
    ]
    assert main([*argv, "--output-dir", str(evaluation)]) == 0
    assert json.loads((evaluation / "eval_results.json").read_text())["verdict_status"] == "uncalibrated"
    rows = list(csv.DictReader((evaluation / "scores.csv").open()))
    assert len(rows) == 3 and {row["verdict"] for row in rows} == {"uncalibrated"}

    (tmp_path / "photos").mkdir()
    load_anomaly_split(str(repo), "exterior_ad", "test", limit=1)[0].image.save(
        tmp_path / "photos" / "part.png"
    )
    predicted = tmp_path / "predict"
    argv = [
        "anomaly",
        "predict",
        str(output / "model"),
        str(tmp_path / "photos"),
        "--output-dir",
        str(predicted),
    ]
    assert main(argv) == 0
    (row,) = csv.DictReader((predicted / "scores.csv").open())
    assert row["verdict"] == "uncalibrated" and float(row["anomaly_score"]) >= 0 and row["error"] == ""


def test_held_out_train_images_calibrate_with_a_warning(repo: Path, tmp_path, caplog) -> None:
    output = tmp_path / "fit"
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(output)]
    with caplog.at_level(logging.WARNING, logger="cadmtl.anomaly"):
        assert main([*argv, *FIT]) == 0
    assert "exterior_ad has no 'nosuch' split: the thresholds come from 1 held-out normal train image(s)" in (
        caplog.text
    )
    assert "no anomalous image checked them" in caplog.text
    summary = json.loads((output / "fit_results.json").read_text())
    assert (
        summary["calibration"]["method"] == "fpr@0.01"
        and summary["calibration"]["image_threshold"] is not None
    )
