"""`cadmtl reference localize / evaluate`: metric values on hand-made predictions, the threshold rule, and the
whole chain on a tiny generated repo with the random `tiny` backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cadmtl.reference.evaluate import (
    ScoredPair,
    localization_metrics,
    pixel_auroc,
    read_predictions,
    score_pairs,
)

# ------------------------------------------------------------------------------------------------ metrics

BOX = (10.0, 10.0, 20.0, 20.0)
ZERO = (0.0, 0.0, 0.0, 0.0)


def pair(has_anomaly, boxes, parse_ok=True, true_box=BOX, category="a", level="none", pair_id="p"):
    return ScoredPair(
        pair_id, true_box if has_anomaly else ZERO, has_anomaly, boxes, parse_ok, category, level
    )


def test_metrics_on_hand_made_predictions():
    pairs = [
        pair(True, [BOX]),  # IoU 1
        pair(True, [(10.0, 10.0, 20.0, 15.0), BOX]),  # first box only: IoU 0.5
        pair(True, [(15.0, 10.0, 25.0, 20.0)]),  # IoU 50 / 150 = 1/3
        pair(True, []),  # missed: IoU 0, FN
        pair(False, []),  # correct normal: IoU 1
        pair(False, [(0.0, 0.0, 5.0, 5.0)]),  # false alarm: IoU 0, FP
        pair(True, [BOX], parse_ok=False),  # parse failure: IoU 0, FN
        pair(False, [], parse_ok=False),  # parse failure on a normal pair: IoU 0, FP
    ]
    metrics = localization_metrics(pairs)
    assert metrics["miou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0 + 1 + 0 + 0 + 0) / 8)
    assert metrics["acc@0.3"] == pytest.approx(4 / 8)
    assert metrics["acc@0.5"] == pytest.approx(3 / 8)
    # TP 3 (three anomalous pairs with a box), FN 2, FP 2 -> 2*3 / (6 + 2 + 2)
    assert metrics["f1"] == pytest.approx(0.6)
    assert metrics["normal_accuracy"] == pytest.approx(1 / 3)
    assert metrics["anomalous_miou"] == pytest.approx((1 + 0.5 + 1 / 3) / 5)
    assert metrics["parse_failure_rate"] == pytest.approx(2 / 8)


def test_all_normal_pairs_predicted_empty_score_one_and_f1_is_undefined():
    metrics = localization_metrics([pair(False, []), pair(False, [])])
    assert metrics["miou"] == metrics["acc@0.5"] == metrics["normal_accuracy"] == 1.0
    assert math.isnan(metrics["f1"]) and math.isnan(metrics["anomalous_miou"])


def test_pixel_auroc_is_tie_aware():
    maps = [np.array([[0.1, 0.4], [0.35, 0.8]]), np.array([[0.4, 0.0]])]
    masks = [np.array([[0, 0], [1, 1]], np.uint8), np.array([[1, 255]], np.uint8)]
    # positives 0.35, 0.8, 0.4; negatives 0.1, 0.4: wins 1 + 2 + 1.5 (a tie at 0.4) of 6
    assert pixel_auroc(maps, masks) == pytest.approx(4.5 / 6)
    assert math.isnan(pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 2), np.uint8)]))


def test_predictions_are_joined_by_pair_id_with_clear_errors(tmp_path):
    from types import SimpleNamespace

    truth = [
        SimpleNamespace(pair_id=f"t{i}", box=BOX, has_anomaly=True, category="c", misalignment="none")
        for i in range(2)
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text(
        '{"pair_id": "t0", "box": [10, 10, 20, 20]}\n{"pair_id": "t1", "boxes": [[0, 0, 0, 0]]}\n'
    )
    scored = score_pairs(read_predictions(path), truth, "p")
    assert [s.iou for s in scored] == [1.0, 0.0] and not scored[1].predicted_anomalous
    with pytest.raises(ValueError, match="no prediction for pair 't1'"):
        score_pairs({"t0": {"pair_id": "t0", "boxes": []}}, truth, "p")
    with pytest.raises(ValueError, match="not in the split \\(first: 'x'\\)"):
        score_pairs({**read_predictions(path), "x": {}}, truth, "p")
    path.write_text('{"pair_id": "t0"}\n{"pair_id": "t0"}\n')
    with pytest.raises(ValueError, match=":2: pair 't0' is predicted twice"):
        read_predictions(path)
    with pytest.raises(ValueError, match="bad boxes"):
        score_pairs({"t0": {"boxes": [[1, 2, 3]]}, "t1": {"boxes": []}}, truth, "p")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pairs_repo(tmp_path_factory) -> Path:
    from cadmtl.reference.pairs import build_pairs
    from dataset_scripts.make_demo import build_demo_dataset

    ad = tmp_path_factory.mktemp("demo")
    build_demo_dataset(ad, train=8, validation=4, test=4, configs=["exterior_seg"])
    out = tmp_path_factory.mktemp("pairs")
    for split in ("validation", "test"):
        build_pairs(str(ad), "exterior_ad", split, out)
    return out


def test_the_threshold_never_comes_from_the_evaluated_pairs(pairs_repo, tmp_path):
    from cadmtl.reference.localize_pairs import localize

    with pytest.raises(ValueError, match="calibration split 'test' is the split being evaluated"):
        localize("tiny", str(pairs_repo), "test", tmp_path, calibration_split="test")
    with pytest.raises(ValueError, match="neither a backbone preset"):
        localize("no-such-model", str(pairs_repo), "test", tmp_path / "missing")


@pytest.mark.slow
def test_localize_then_evaluate_through_the_command(pairs_repo, tmp_path):
    from cadmtl.cli import main as cadmtl
    from cadmtl.reference.localize_pairs import localize

    out = tmp_path / "out"
    common = ["--output-dir", str(out), "--image-size", "32", "--window", "1"]
    assert (
        cadmtl(["reference", "localize", "tiny", str(pairs_repo), "--split", "test", *common, "--save-maps"])
        == 0
    )
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == [f"test-{i:05d}" for i in range(4)]
    for line in lines:
        assert line["has_anomaly"] == bool(line["boxes"]) and len(line["scores"]) == len(line["boxes"])
        assert all(0 <= b[0] < b[2] and 0 <= b[1] < b[3] for b in line["boxes"])
    run = json.loads((out / "localizer.json").read_text())
    assert run["calibration"]["split"] == "validation" and run["layers"] == [2, 3]
    assert len(list((out / "overlays").glob("*.png"))) == 4 and len(list((out / "maps").glob("*.npy"))) == 4

    assert cadmtl(["reference", "evaluate", str(out), str(pairs_repo), "--split", "test"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["counts"]["pairs"] == 4 and results["counts"]["anomalous"] == 2
    assert set(results["metrics"]) >= {"miou", "acc@0.3", "acc@0.5", "f1", "normal_accuracy", "pixel_auroc"}
    assert 0 <= results["metrics"]["miou"] <= 100 and list(results["per_category"]) == ["exterior"]
    assert "| all | 4 |" in (out / "eval_results.md").read_text()

    # saved settings reuse the threshold without a calibration split, and give the same predictions
    again = tmp_path / "again"
    settings = ["--settings", str(out / "localizer.json"), "--overlays", "0"]
    assert (
        cadmtl(["reference", "localize", "tiny", str(pairs_repo), "--output-dir", str(again), *settings]) == 0
    )
    assert (again / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    with pytest.raises(ValueError, match="calibrated for model 'tiny', not 'vits16'"):
        localize("vits16", str(pairs_repo), "test", again, settings=out / "localizer.json")


def test_reference_features_are_cached_by_reference_id():
    import torch
    from PIL import Image

    from cadmtl.features import PatchFeatureExtractor, backbone_from_preset
    from cadmtl.reference.localize_pairs import PairRunner
    from cadmtl.reference.localizer import ReferenceLocalizer
    from cadmtl.reference.pairs import Pair

    torch.manual_seed(0)
    runner = PairRunner(
        PatchFeatureExtractor(backbone_from_preset("tiny"), [2]), ReferenceLocalizer(window=1), 32
    )
    image = Image.new("RGB", (20, 30), (120, 90, 60))
    pairs = [
        Pair(
            f"p{i}", f"q{i}", "ref", image, image, [0.0] * 4, [], None, False, "c", "good", "real", "none", {}
        )
        for i in range(5)
    ]
    maps = [m for _, m in runner.run(pairs, batch_size=2)]
    assert runner.misses == 1 and runner.hits == 4 and runner.forwards == 5 + 1
    assert maps[0].shape == (30, 20) and float(maps[0].max()) < 1e-4  # identical images: no difference


def test_every_subcommand_has_help_with_an_example(capsys):
    from cadmtl.cli import COMMANDS, main

    reference = COMMANDS.commands["reference"]
    assert main(["reference"]) == 0 and "build-pairs" in capsys.readouterr().out
    assert main(["reference", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: cadmtl reference")
    for name in reference.commands:
        with pytest.raises(SystemExit):
            main(["reference", name, "--help"])
        text = capsys.readouterr().out
        assert f"cadmtl reference {name}" in text and "example" in text
    assert main(["reference", "nope"]) == 2


def test_vision_language_models_are_told_from_feature_backbones(tmp_path):
    from cadmtl.reference.localize_pairs import is_vision_language_model

    assert is_vision_language_model("tiny-random") and is_vision_language_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert not is_vision_language_model("tiny") and not is_vision_language_model(
        "facebook/dinov3-vits16-pretrain-lvd1689m"
    )
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (tmp_path / "cadmtl").mkdir()
    (tmp_path / "cadmtl" / "config.json").write_text(json.dumps({"model_type": "cadmtl"}))
    assert is_vision_language_model(str(tmp_path / "vlm")) and not is_vision_language_model(
        str(tmp_path / "cadmtl")
    )


@pytest.mark.slow
def test_one_localize_command_also_serves_a_vlm(pairs_repo, tmp_path):
    from cadmtl.cli import main as cadmtl

    out = tmp_path / "vlm"
    assert (
        cadmtl(
            [
                "reference",
                "localize",
                "tiny-random",
                str(pairs_repo),
                "--split",
                "test",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == [f"test-{i:05d}" for i in range(4)]
    assert all("parse_ok" in line for line in lines)
    assert cadmtl(["reference", "evaluate", str(out), str(pairs_repo), "--split", "test"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["metrics"]["parse_failure_rate"] <= 100
