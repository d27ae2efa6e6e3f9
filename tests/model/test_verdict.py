"""The image-level anomaly score and OK / NG verdict of the multi-task model (`post_process_anomaly_score`)."""

import math

import pytest
import torch

from dataset_scripts.taxonomy import NORMAL
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor
from modeling_cadmtl.configuration_cadmtl import NORMAL_LABEL


def _outputs() -> dict[str, torch.Tensor]:
    cls_logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3]]))
    det_logits = torch.full((2, 4, 2), -20.0)
    det_logits[1, 2, 1] = 0.0  # sigmoid 0.5
    centerness = torch.zeros(2, 4)  # sigmoid 0.5
    seg_logits = torch.zeros(2, 2, 4, 4)
    seg_logits[:, 0] = 1.0
    seg_logits[0, 1, :2, :] = 2.0  # half the first image is anomalous
    return {
        "cls_logits": cls_logits,
        "det_logits": det_logits,
        "det_centerness_logits": centerness,
        "seg_logits": seg_logits,
    }


def test_each_head_scores_as_documented() -> None:
    results = CadMtlImageProcessor().post_process_anomaly_score(_outputs(), normal_class_id=0, threshold=0.5)
    first, second = (r["head_scores"] for r in results)
    assert first["cls"] == pytest.approx(0.1) and second["cls"] == pytest.approx(0.8)
    assert first["det"] == pytest.approx(math.sqrt(torch.sigmoid(torch.tensor(-20.0)).item() * 0.5))
    assert second["det"] == pytest.approx(0.5)
    assert first["seg"] == pytest.approx(0.5) and second["seg"] == 0.0
    assert [r["anomaly_score"] for r in results] == pytest.approx([0.5, 0.8])
    assert [r["verdict"] for r in results] == ["NG", "NG"]


def test_source_threshold_and_padding() -> None:
    processor = CadMtlImageProcessor()
    det = processor.post_process_anomaly_score(_outputs(), source="det", threshold=0.6)
    assert [r["verdict"] for r in det] == ["OK", "OK"] and "cls" not in det[0]["head_scores"]
    # only the top half is the image: the anomalous half fills all of it
    pixel_mask = torch.zeros(2, 4, 4, dtype=torch.long)
    pixel_mask[:, :2] = 1
    seg = processor.post_process_anomaly_score(_outputs(), source="seg", pixel_mask=pixel_mask)
    assert seg[0]["anomaly_score"] == 1.0 and "verdict" not in seg[0]


def test_bad_sources_are_clear_errors() -> None:
    processor = CadMtlImageProcessor()
    with pytest.raises(ValueError, match="reads the 'cls' head"):
        processor.post_process_anomaly_score(_outputs(), source="cls")  # no normal class given
    with pytest.raises(ValueError, match="not one of"):
        processor.post_process_anomaly_score(_outputs(), source="mean")
    with pytest.raises(ValueError, match="No head gives an anomaly score"):
        processor.post_process_anomaly_score({"cls_logits": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="verdict_source"):
        CadMtlConfig(verdict_source="area")


def test_config_defaults_and_normal_class() -> None:
    assert NORMAL_LABEL == NORMAL
    config = CadMtlConfig(cls_labels=["dent", NORMAL, "scratch"])
    assert config.normal_class_id == 1 and CadMtlConfig(cls_labels=["a", "b"]).normal_class_id is None
    assert (config.verdict_source, config.verdict_threshold, config.verdict_calibration) == ("max", 0.5, None)
    restored = CadMtlConfig.from_dict(
        {**config.to_dict(), "verdict_threshold": 0.27, "verdict_source": "det"}
    )
    assert (restored.verdict_threshold, restored.verdict_source) == (0.27, "det")


def test_heads_and_the_config_settings() -> None:
    processor = CadMtlImageProcessor()
    only_det = processor.post_process_anomaly_score(_outputs(), normal_class_id=0, heads=("det",))
    assert [set(r["head_scores"]) for r in only_det] == [{"det"}, {"det"}]
    assert only_det[1]["anomaly_score"] == pytest.approx(0.5)  # "max" ignores the heads left out
    config = CadMtlConfig(
        cls_labels=[NORMAL, "dent"], image_sizes={"cls": 32, "seg": 64}, verdict_threshold=0.7
    )
    assert config.trained_tasks == ("cls", "seg") and config.verdict_heads == ("cls", "seg")
    results = processor.post_process_verdict(_outputs(), config)
    assert [set(r["head_scores"]) for r in results] == [{"cls", "seg"}] * 2
    assert [r["verdict"] for r in results] == ["OK", "NG"]  # max(0.1, 0.5) < 0.7 <= max(0.8, 0.0)
    assert [r["verdict"] for r in processor.post_process_verdict(_outputs(), config, threshold=0.5)] == [
        "NG",
        "NG",
    ]


def test_a_model_without_an_anomaly_head_has_no_verdict() -> None:
    # a part classifier (no `normal` class) trained alone: no head gives an anomaly score
    config = CadMtlConfig(cls_labels=["door", "hood"], image_sizes={"cls": 64})
    assert config.verdict_heads == ()
    outputs = {"cls_logits": torch.zeros(3, 2)}
    results = CadMtlImageProcessor().post_process_verdict(outputs, config)
    assert results == [{"verdict": None, "anomaly_score": None, "head_scores": {}}] * 3


def test_an_uninformative_verdict_gives_the_score_without_ok_or_ng() -> None:
    config = CadMtlConfig(verdict_status="uninformative", verdict_reason="AUROC 0.52", verdict_threshold=0.3)
    results = CadMtlImageProcessor().post_process_verdict(_outputs(), config)
    assert [r["verdict"] for r in results] == [None, None]
    assert [r["anomaly_score"] for r in results] == pytest.approx([0.5, 0.8])  # the score still shows
    # an explicit threshold is the caller's own decision
    overridden = CadMtlImageProcessor().post_process_verdict(_outputs(), config, threshold=0.6)
    assert [r["verdict"] for r in overridden] == ["OK", "NG"]
    for status in ("calibrated", "default", "uncalibrated"):
        config = CadMtlConfig(verdict_status=status, verdict_threshold=0.6)
        assert [r["verdict"] for r in CadMtlImageProcessor().post_process_verdict(_outputs(), config)] == [
            "OK",
            "NG",
        ]
