"""The OK / NG verdict: image-level metrics and threshold calibration (hand-computed), scoring a config split,
choosing the source, and `cadmtl evaluate`'s verdict report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cadmtl.anomaly.metrics as anomaly_metrics
import cadmtl.anomaly.patch_memory as patch_memory
from cadmtl.data.pipeline import load_split
from cadmtl.evaluation import metrics
from cadmtl.evaluation.command import main as evaluate_main
from cadmtl.evaluation.metrics import calibrate_threshold, f1_max, verdict_metrics
from cadmtl.evaluation.verdict import (
    VerdictScores,
    apply_calibration,
    calibrate_verdict,
    score_verdict_split,
    verdict_processor,
)
from cadmtl.testing import tiny_cadmtl_config
from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel

# ------------------------------------------------------------------------------------------------------------
# Hand-computed metrics and calibration
# ------------------------------------------------------------------------------------------------------------


def test_one_definition_serves_the_anomaly_wing() -> None:
    for name in ("binary_auroc", "f1_max", "average_precision", "auroc_sorted", "split_scores"):
        assert getattr(anomaly_metrics, name) is getattr(metrics, name)
    assert patch_memory.calibrate_fpr is metrics.calibrate_fpr
    assert patch_memory.calibrate_f1 is metrics.calibrate_f1


def test_f1_max_threshold_by_hand() -> None:
    # t = 0.35: tp 2, fp 1 (0.4) -> F1 4/5; t = 0.8: tp 1, fp 0 -> 2/3
    assert f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx((0.8, 0.35))
    # a normal and an anomalous image tie at 0.5: the threshold 0.5 takes both (tp 2, fp 1)
    assert calibrate_threshold([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], "f1_max") == 0.5


def test_fpr_target_never_splits_ties() -> None:
    normal = [0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    scores = np.array([*normal, 0.05, 0.95], dtype=np.float32)  # two anomalous images: not counted
    labels = np.array([0] * 10 + [1, 1])

    def fpr_at(threshold: float) -> float:
        return float((np.array(normal, dtype=np.float32) >= threshold).mean())

    assert fpr_at(calibrate_threshold(scores, labels, "fpr", 0.3)) == 0.3  # just above 0.5
    assert 0.5 < calibrate_threshold(scores, labels, "fpr", 0.3) < 0.5001
    # 5 allowed: just above the three tied 0.3s; 6 allowed: still 5 (taking one 0.3 means taking all three)
    assert fpr_at(calibrate_threshold(scores, labels, "fpr", 0.5)) == 0.5
    assert calibrate_threshold(scores, labels, "fpr", 0.6) == calibrate_threshold(scores, labels, "fpr", 0.5)
    assert fpr_at(calibrate_threshold(scores, labels, "fpr", 0.0)) == 0.0
    assert calibrate_threshold(scores, labels, "fpr", 1.0) == pytest.approx(0.1)  # every normal image NG
    with pytest.raises(ValueError, match="Unknown calibration method 'youden'"):
        calibrate_threshold(scores, labels, "youden")
    with pytest.raises(ValueError, match="at least one normal score"):
        calibrate_threshold([0.5], [1], "fpr")


def test_verdict_metrics_by_hand() -> None:
    scores = {"det": [0.1, 0.6, 0.7, 0.3], "seg": [0.0, 0.0, 0.0, 0.0]}
    result = verdict_metrics(scores, [True, True, False, False], threshold=0.5, source="det")
    assert (result["n_images"], result["n_normal"], result["n_anomalous"]) == (4, 2, 2)
    # det: anomalous 0.3 beats normal 0.1 only, 0.7 beats both -> 3/4; F1-max 0.8 at 0.3 (tp 2, fp 1)
    assert result["sources"]["det"] == pytest.approx({"auroc": 0.75, "f1_max": 0.8, "f1_max_threshold": 0.3})
    assert result["sources"]["seg"]["auroc"] == 0.5  # all tied: half a win per pair
    at = result["at_threshold"]
    assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (1, 1, 1, 1)
    assert at["precision"] == at["recall"] == at["fpr"] == at["f1"] == at["accuracy"] == 0.5
    nobody_ng = verdict_metrics(scores, [True, True, False, False], threshold=0.99, source="det")
    assert np.isnan(nobody_ng["at_threshold"]["precision"]) and nobody_ng["at_threshold"]["fpr"] == 0.0


def scores_of(is_normal: list[bool], **by_source: list[float]) -> VerdictScores:
    return VerdictScores(
        [str(i) for i in range(len(is_normal))],
        np.asarray(is_normal),
        {source: np.asarray(values, dtype=np.float64) for source, values in by_source.items()},
    )


def test_source_choice_prefers_max_on_ties_and_records_the_calibration() -> None:
    is_normal = [True, True, False, False]
    tied = scores_of(is_normal, cls=[0.1, 0.2, 0.8, 0.9], det=[0.1, 0.6, 0.7, 0.3], max=[0.1, 0.6, 0.8, 0.9])
    calibration = calibrate_verdict(tied, "f1_max", split="validation")
    assert calibration["calibrated"] and calibration["source"] == "max"  # cls and max both reach AUROC 1
    assert calibration["status"] == "calibrated" and calibration["fpr"] == 0.0
    assert calibration["aurocs"] == {"cls": 1.0, "det": 0.75, "max": 1.0}
    assert calibration["threshold"] == pytest.approx(0.8) and calibration["f1"] == 1.0
    assert (calibration["n_normal"], calibration["n_anomalous"], calibration["split"]) == (2, 2, "validation")

    det_best = scores_of(
        is_normal, cls=[0.9, 0.2, 0.8, 0.1], det=[0.1, 0.2, 0.7, 0.3], max=[0.9, 0.2, 0.8, 0.3]
    )
    calibration = calibrate_verdict(det_best, "fpr", target_fpr=0.0)
    assert calibration["source"] == "det" and calibration["fpr"] == 0.0 and calibration["target_fpr"] == 0.0
    assert (
        0.2 < calibration["threshold"] < 0.2001
    )  # just above the highest normal score: both anomalous are NG
    config = CadMtlConfig()
    assert apply_calibration(config, calibration)
    assert (config.verdict_source, config.verdict_threshold) == ("det", calibration["threshold"])
    assert config.verdict_calibration["method"] == "fpr"


def test_without_both_kinds_of_images_nothing_is_calibrated() -> None:
    only_anomalous = scores_of([False, False], det=[0.3, 0.4], max=[0.3, 0.4])
    calibration = calibrate_verdict(only_anomalous, "f1_max", split="validation")
    assert calibration["calibrated"] is False
    assert "0 normal and 2 anomalous" in calibration["reason"] and "needs both" in calibration["reason"]
    assert calibration["status"] == "default" and "threshold" not in calibration
    config = CadMtlConfig()
    assert config.verdict_status == "uncalibrated" and config.verdict_reason is None
    assert not apply_calibration(config, calibration)
    assert (config.verdict_source, config.verdict_threshold) == ("max", 0.5)  # the documented defaults stay
    assert config.verdict_status == "default" and config.verdict_reason == calibration["reason"]
    assert config.verdict_calibration == calibration
    assert "no head gives" in calibrate_verdict(VerdictScores(), "f1_max")["reason"]


def test_f1_max_that_flags_every_normal_image_falls_back_to_the_target_fpr() -> None:
    # 2 normal, 8 anomalous: flagging everything has F1 16/18 = 0.889, better than any real cut (0.2: 14/16),
    # so F1-max picks the lowest score and every normal image is NG. AUROC (7 + 5) / 16 = 0.75.
    weak = scores_of(
        [True, True] + [False] * 8,
        max=[0.1, 0.5, 0.05, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95],
    )
    assert f1_max(weak.scores["max"], ~weak.is_normal) == pytest.approx((16 / 18, 0.05))
    calibration = calibrate_verdict(weak, "f1_max", target_fpr=0.01)
    assert calibration["status"] == "calibrated" and calibration["calibrated"]
    assert (calibration["method"], calibration["requested_method"], calibration["target_fpr"]) == (
        "fpr",
        "f1_max",
        0.01,
    )
    assert "flags all 2 normal images (false-positive rate 100 %)" in calibration["fallback"]
    assert 0.5 < calibration["threshold"] < 0.5001  # just above the highest normal score
    assert calibration["fpr"] == 0.0 and calibration["recall"] == pytest.approx(5 / 8)
    assert calibration["auroc"] == pytest.approx(0.75) and "reason" not in calibration
    config = CadMtlConfig()
    assert apply_calibration(config, calibration)
    assert (config.verdict_status, config.verdict_reason) == ("calibrated", None)


def test_f1_max_that_flags_nearly_every_image_falls_back_too() -> None:
    # 20 normal (19 tie at 0.5 with 32 anomalous), 40 anomalous: AUROC (32 * 10.5 + 8 * 20) / 800 = 0.62; F1-max
    # takes 0.5: recall 100 % but 19 of 20 normal images NG (informedness 0.05, the demo run's shape)
    crowded = scores_of([True] * 20 + [False] * 40, max=[0.1] + [0.5] * 19 + [0.5] * 32 + [0.9] * 8)
    assert f1_max(crowded.scores["max"], ~crowded.is_normal)[1] == 0.5
    assert metrics.VERDICT_MIN_INFORMEDNESS == 0.1
    assert metrics.degenerate_threshold(crowded.scores["max"], ~crowded.is_normal, 0.5) == (
        "the threshold 0.5 flags 19 of 20 normal images (false-positive rate 95.0 %) and 40 of 40 anomalous ones "
        "(recall 100.0 %): recall minus false-positive rate is 0.050, below 0.1"
    )
    calibration = calibrate_verdict(crowded, "f1_max", target_fpr=0.01)
    assert calibration["status"] == "calibrated" and calibration["method"] == "fpr"
    assert calibration["fallback"].startswith(
        "f1_max rejected (the threshold 0.5 flags 19 of 20 normal images"
    )
    assert calibration["fpr"] == 0.0 and calibration["recall"] == pytest.approx(8 / 40)


def test_a_score_that_does_not_separate_makes_the_verdict_uninformative(tmp_path: Path) -> None:
    # AUROC (1 + 2 + 3 + 0) / 16 = 0.375 < 0.6: no threshold is worth showing
    chance = scores_of([True] * 4 + [False] * 4, max=[0.2, 0.4, 0.6, 0.8, 0.3, 0.5, 0.7, 0.1])
    calibration = calibrate_verdict(chance, "f1_max", target_fpr=0.0, split="validation")
    assert calibration["status"] == "uninformative" and calibration["calibrated"] is False
    assert calibration["reason"] == (
        "the best image AUROC on the validation images (max: 0.375) is below 0.6: the anomaly score does not "
        "separate normal from anomalous images"
    )
    assert metrics.VERDICT_AUROC_FLOOR == 0.6
    assert calibration["method"] == "fpr" and 0.8 < calibration["threshold"] < 0.8001  # kept for the reports
    config = CadMtlConfig()
    assert apply_calibration(config, calibration)
    assert (config.verdict_status, config.verdict_reason) == ("uninformative", calibration["reason"])

    config.save_pretrained(tmp_path)  # the status and its reason survive config.json
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["verdict_status"], saved["verdict_reason"]) == ("uninformative", calibration["reason"])
    loaded = CadMtlConfig.from_pretrained(tmp_path)
    assert (loaded.verdict_status, loaded.verdict_reason) == ("uninformative", calibration["reason"])
    assert np.isnan(calibration["precision"])  # no image is NG at the threshold: NaN == NaN is False
    assert {k: v for k, v in loaded.verdict_calibration.items() if k != "precision"} == {
        k: v for k, v in calibration.items() if k != "precision"
    }

    # a good score ranks them and is calibrated (F1-max, false-positive rate below 100 %)
    good = scores_of([True] * 4 + [False] * 4, max=[0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
    calibration = calibrate_verdict(good, "f1_max")
    assert calibration["status"] == "calibrated" and calibration["method"] == "f1_max"
    assert "fallback" not in calibration and calibration["fpr"] < 1.0 and calibration["recall"] > 0.0


def test_when_even_the_target_fpr_cannot_separate_the_verdict_is_uninformative() -> None:
    # AUROC 9 / 12 = 0.75, but one normal image scores above every anomalous one: at a 0 % FPR target the
    # threshold sits above it and flags no anomalous image
    outlier = scores_of([True] * 4 + [False] * 3, max=[0.0, 0.0, 0.0, 0.99, 0.5, 0.6, 0.7])
    calibration = calibrate_verdict(outlier, "fpr", target_fpr=0.0)
    assert calibration["status"] == "uninformative" and calibration["recall"] == 0.0
    assert "flags none of the 3 anomalous images (recall 0 %)" in calibration["reason"]
    assert metrics.degenerate_threshold([0.0, 0.5], [0, 1], 0.5) is None
    assert metrics.degenerate_threshold([0.1, 0.5], [0, 1], 0.1).endswith("(false-positive rate 100 %)")


def test_a_checkpoint_saved_before_the_status_existed_reads_as_calibrated() -> None:
    assert CadMtlConfig(verdict_calibration={"calibrated": True}).verdict_status == "calibrated"
    assert CadMtlConfig(verdict_calibration={"calibrated": False}).verdict_status == "uncalibrated"
    with pytest.raises(ValueError, match="verdict_status 'maybe' is not one of"):
        CadMtlConfig(verdict_status="maybe")


def test_verdict_heads_follow_the_trained_tasks() -> None:
    assert tiny_cadmtl_config().verdict_heads == ("cls", "det", "seg")
    assert tiny_cadmtl_config(image_sizes={"det": 64}).verdict_heads == ("det",)
    assert tiny_cadmtl_config(
        cls_labels=["door", "hood"], image_sizes={"cls": 32, "seg": 64}
    ).verdict_heads == ("seg",)
    processor = verdict_processor({"cls": 32, "det": 64, "seg": 64}, ("cls", "det", "seg"))
    assert processor.size_groups(("cls", "det", "seg")) == [
        ({"height": 32, "width": 32}, ("cls",)),
        ({"height": 64, "width": 64}, ("det", "seg")),
    ]
    with pytest.raises(ValueError, match=r"No input size for the heads \['seg'\]"):
        verdict_processor({"cls": 32}, ("cls", "seg"))


# ------------------------------------------------------------------------------------------------------------
# Scoring a split, and `cadmtl evaluate`
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verdict") / "demo"
    build_demo_dataset(folder, train=4, validation=10, test=10, configs=["exterior_det", "chassis_cls"])
    return folder


@pytest.fixture(scope="module")
def tiny_model(demo: Path, tmp_path_factory) -> Path:
    from cadmtl.data.sources import discover_sources, merged_labels

    sources = discover_sources(str(demo), {"cls": ["chassis_cls"], "det": ["exterior_det"]}, "test")
    torch.manual_seed(0)
    config = tiny_cadmtl_config(
        cls_labels=merged_labels(sources["cls"]),
        det_labels=merged_labels(sources["det"]),
        image_sizes={"cls": 32, "det": 64},
        verdict_source="det",
        verdict_threshold=0.2,
    )
    folder = tmp_path_factory.mktemp("model")
    CadMtlModel(config).save_pretrained(folder)
    return folder


def test_split_scores_match_the_processor_path(demo: Path, tiny_model: Path) -> None:
    from dataset_scripts.images import to_rgb

    model = CadMtlModel.from_pretrained(tiny_model).eval()
    config = model.config
    scores = score_verdict_split(
        model,
        str(demo),
        ["exterior_det", "chassis_cls"],
        "validation",
        image_sizes=config.image_sizes,
        heads=config.verdict_heads,
        normal_class_id=config.normal_class_id,
        batch_size=4,
        show_progress=False,
    )
    rows = {
        f"{c}/{row['image_id']}": row
        for c in ("exterior_det", "chassis_cls")
        for row in load_split(str(demo), c, "validation", streaming=False)
    }
    assert sorted(scores.image_ids) == sorted(rows) and len(scores.image_ids) == 20
    assert scores.is_normal.tolist() == [rows[i]["is_normal"] for i in scores.image_ids]
    assert 0 < scores.n_normal < 20
    assert set(scores.scores) == {"cls", "det", "max"}  # seg was not trained: it gives no score
    np.testing.assert_array_equal(
        scores.scores["max"], np.maximum(scores.scores["cls"], scores.scores["det"])
    )

    # The served path (image processor at each head's size, post_process_verdict) gives the same scores.
    processor = CadMtlImageProcessor()
    images = [to_rgb(rows[i]["image"]) for i in scores.image_ids[:6]]
    with torch.no_grad():
        outputs = {
            "cls_logits": model(
                processor(images, size={"height": 32, "width": 32}, return_tensors="pt")["pixel_values"],
                task="cls",
            ).cls_logits,
            **{
                k: v
                for k, v in model(
                    processor(images, size={"height": 64, "width": 64}, return_tensors="pt")["pixel_values"],
                    task="det",
                ).items()
                if k.startswith("det_")
            },
        }
    served = processor.post_process_verdict(outputs, config)
    for index, result in enumerate(served):
        assert result["head_scores"]["cls"] == pytest.approx(scores.scores["cls"][index], abs=2e-3)
        assert result["head_scores"]["det"] == pytest.approx(scores.scores["det"][index], abs=2e-3)
        assert result["verdict"] == ("NG" if result["anomaly_score"] >= 0.2 else "OK")


def test_evaluate_reports_the_verdict_at_the_stored_threshold(
    demo: Path, tiny_model: Path, tmp_path: Path
) -> None:
    output = tmp_path / "eval"
    argv = [
        str(tiny_model),
        str(demo),
        "--split",
        "test",
        "--output-dir",
        str(output),
        "--mixed-precision",
        "no",
    ]
    assert evaluate_main(argv) == 0
    verdict = json.loads((output / "eval_results.json").read_text())["verdict"]
    assert (verdict["source"], verdict["threshold"], verdict["calibration"]) == ("det", 0.2, None)
    report = verdict["report"]
    assert report["split"] == "test" and report["n_images"] == 20
    assert report["n_normal"] + report["n_anomalous"] == 20 and report["n_normal"] > 0
    assert set(report["sources"]) == {"cls", "det", "max"}
    at = report["at_threshold"]
    assert (at["source"], at["threshold"]) == ("det", 0.2)
    assert at["tp"] + at["fn"] == report["n_anomalous"] and at["fp"] + at["tn"] == report["n_normal"]
    assert "OK / NG verdict" in (output / "eval_results.md").read_text()
    assert evaluate_main([*argv, "--output-dir", str(tmp_path / "plain"), "--no-verdict"]) == 0
    assert "verdict" not in json.loads((tmp_path / "plain" / "eval_results.json").read_text())
