"""The OK / NG threshold is calibrated at the end of a training run and stored in the saved config."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl import CadMtlConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["--cls_configs", "chassis_cls", "--det_configs", "exterior_det", "--seg_configs", "exterior_seg"]
FAST = [
    "--cls_image_size", "32", "--det_image_size", "64", "--seg_image_size", "64",
    "--batch_size", "4", "--eval_batch_size", "8", "--coba_val_batch_size", "4",
    "--coba_every", "2", "--coba_warmup_steps", "3", "--coba_history_length", "4",
    "--warmup_steps", "1", "--freeze_steps", "1", "--logging_steps", "1", "--shuffle_buffer", "8",
    "--max_steps", "2", "--mixed_precision", "no", *CONFIGS,
]  # fmt: skip


def run_main(argv: list[str]) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import train_accelerate
    finally:
        sys.path.pop(0)
    return train_accelerate.main(argv)


def demo(folder: Path, validation: int) -> Path:
    build_demo_dataset(
        folder,
        train=8,
        validation=validation,
        test=10,
        configs=["chassis_cls", "exterior_det", "exterior_seg"],
    )
    return folder


@pytest.mark.slow
def test_a_run_stores_the_calibrated_threshold(tmp_path: Path) -> None:
    dataset = demo(tmp_path / "demo", validation=10)
    output = tmp_path / "run"
    summary = run_main(
        ["--dataset", str(dataset), "--output_dir", str(output), "--verdict_calibration", "fpr",
         "--verdict_target_fpr", "0.25", *FAST]
    )  # fmt: skip
    calibration = summary["verdict"]["calibration"]
    assert calibration["calibrated"] and calibration["method"] == "fpr" and calibration["target_fpr"] == 0.25
    # 3 configs x 10 validation images, 2 normal per config (the demo makes 20 % normal)
    assert (calibration["n_normal"], calibration["n_anomalous"]) == (6, 24)
    assert calibration["fpr"] <= 0.25
    assert calibration["source"] == max(
        calibration["aurocs"], key=lambda s: (calibration["aurocs"][s], s == "max")
    )

    saved = CadMtlConfig.from_pretrained(output / "model")
    assert saved.verdict_threshold == calibration["threshold"] != 0.5
    assert saved.verdict_source == calibration["source"] and saved.verdict_calibration == calibration

    results = json.loads((output / "eval_results.json").read_text())["verdict"]
    assert set(results["splits"]) == {"validation", "test"}
    for split, report in results["splits"].items():
        at = report["at_threshold"]
        assert (at["source"], at["threshold"]) == (saved.verdict_source, saved.verdict_threshold), split
        assert report["n_images"] == 30 and set(report["sources"]) == {"cls", "det", "seg", "max"}
    assert results["splits"]["validation"]["at_threshold"]["fpr"] == pytest.approx(calibration["fpr"])
    card = (output / "model" / "README.md").read_text()
    assert f"at least **{saved.verdict_threshold:.4g}**" in card and "| test | 6 | 24 |" in card
    assert saved.verdict_status == results["status"] == "calibrated" and results["reason"] is None
    assert "**Verdict status: calibrated.**" in card and calibration["fpr"] < 1.0
    assert "OK / NG verdict" in (output / "eval_results.md").read_text()


@pytest.mark.slow
def test_without_normal_validation_images_the_default_stays(tmp_path: Path, caplog) -> None:
    dataset = demo(tmp_path / "demo", validation=2)  # round(0.2 * 2) = 0 normal images per config
    output = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        summary = run_main(["--dataset", str(dataset), "--output_dir", str(output), *FAST])
    calibration = summary["verdict"]["calibration"]
    assert calibration["calibrated"] is False and (calibration["n_normal"], calibration["n_anomalous"]) == (
        0,
        6,
    )
    assert "0 normal and 6 anomalous" in calibration["reason"]
    assert "OK / NG verdict not calibrated" in caplog.text and calibration["reason"] in caplog.text
    saved = CadMtlConfig.from_pretrained(output / "model")
    assert (saved.verdict_source, saved.verdict_threshold) == ("max", 0.5)
    assert (saved.verdict_status, saved.verdict_reason) == ("default", calibration["reason"])
    results = json.loads((output / "eval_results.json").read_text())["verdict"]
    assert results["calibration"]["reason"] == calibration["reason"]
    assert (results["status"], results["reason"]) == ("default", calibration["reason"])
    assert (
        "**Verdict status: default.** An image is **NG** when" in (output / "model" / "README.md").read_text()
    )
    # still measured where the split allows it: the test split has normal images
    test = results["splits"]["test"]
    assert test["at_threshold"]["threshold"] == 0.5 and test["n_normal"] > 0
    assert np.isnan(results["splits"]["validation"]["sources"]["max"]["auroc"])
    assert (
        "(verdict status: default, the documented default: the validation images hold 0 normal"
        in (output / "model" / "README.md").read_text()
    )
