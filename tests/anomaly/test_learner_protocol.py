"""The learner's training budget (`--max-minutes`) and the leave-one-type-out protocol (`cadmtl anomaly protocol`)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cadmtl.anomaly.learner import AnomalyLearner, normal_statistics_of, normalize
from cadmtl.anomaly.learner_protocol import (
    CANDIDATES,
    EXTRA_BLURS,
    Setting,
    blurred,
    choose_setting,
    protocol_table,
    tuning_score,
)

TINY = ["--image-size", "32", "--batch-size", "4", "--held-out-images", "4", "--mixed-precision", "no"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    from dataset_scripts.make_demo import build_demo_dataset

    repo = tmp_path_factory.mktemp("demo") / "repo"
    # 3 defect types with 2 images each in validation and in test (see make_demo's class draw).
    build_demo_dataset(
        repo, train=12, validation=12, test=12, configs=["chassis_cls"], ad_configs=["exterior_ad"]
    )
    return repo


def test_normal_statistics_global_and_per_pixel():
    maps = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)  # image 1 = image 0 + 9
    pixel = normal_statistics_of(maps, "pixel")
    torch.testing.assert_close(pixel["location"], maps.mean(0))
    torch.testing.assert_close(pixel["scale"], torch.full((3, 3), 9 / 2**0.5))
    glob = normal_statistics_of(maps, "global")
    assert glob["location"].shape == (1, 1) and float(glob["location"]) == pytest.approx(
        8.0
    )  # median of 0..17
    assert float(glob["scale"]) == pytest.approx(1.4826 * 4)  # lower median of |0..17 - 8| is 4
    with pytest.raises(ValueError, match="standardization must be one of"):
        normal_statistics_of(maps, "image")


def test_tuning_score_and_setting_choice_follow_the_tuning_images():
    masks = torch.zeros(4, 8, 8, dtype=torch.uint8)
    masks[2:, 2:4, 2:4] = 1
    masks[3, 0, 0] = 255
    labels = np.array([False, False, True, True])
    perfect = masks.float() * (masks != 255)
    assert tuning_score(perfect, perfect.flatten(1).amax(1), labels, masks) == pytest.approx(100.0)

    class Sample:
        def __init__(self, normal: bool):
            self.is_normal = normal

    # Task "good" marks the defects, "noise" is large everywhere on normals: global statistics per task and a
    # rule that drops or down-weights "noise" win; every candidate is scored.
    rng = torch.Generator().manual_seed(0)
    raw = {"good": perfect * 5 + torch.rand(4, 8, 8, generator=rng) * 0.1, "noise": torch.rand(4, 8, 8) * 20}
    normals = {"good": torch.rand(6, 8, 8, generator=rng) * 0.1, "noise": torch.rand(6, 8, 8) * 20}
    statistics = {
        (s, b): {t: normal_statistics_of(m, s) for t, m in blurred(normals, b).items()}
        for s in ("global", "pixel")
        for b in EXTRA_BLURS
    }
    setting, weights, scored = choose_setting(
        {b: blurred(raw, b) for b in EXTRA_BLURS},
        statistics,
        [Sample(not a) for a in labels],
        masks,
        "top_mean",
        0.05,
    )
    assert set(scored) == {c.name for c in CANDIDATES} and scored[setting.name] == max(scored.values())
    assert scored[setting.name] > scored["global+mean"] or scored["global+mean"] == max(scored.values())
    assert isinstance(setting, Setting) and (weights is None or set(weights) == {"good", "noise"})


def test_protocol_table_reports_every_fold_with_mean_and_std():
    fold = {
        "seeds": {"0": {"setting": "global+select"}, "1": {"setting": "pixel+mean"}},
        "test": {k: {"mean": 80.0, "std": 2.0} for k in ("image_auroc", "pixel_auroc", "aupro")},
        "default_command": {k: {"mean": 70.0, "std": 1.0} for k in ("image_auroc", "pixel_auroc", "aupro")},
    }
    table = protocol_table({"seeds": [0, 1], "types": ["a", "b"], "per_fold": {"a": fold, "b": fold}})
    assert (
        "| a | b | 80.0 ± 2.0 | 80.0 ± 2.0 | 80.0 ± 2.0 | global+select, pixel+mean | 70.0 / 70.0 / 70.0 |"
        in table
    )
    assert "| **mean of folds** | | 80.0 | 80.0 | 80.0 | | |" in table


@pytest.mark.slow
def test_max_minutes_stops_early_and_saves_a_model_that_predicts(
    demo_repo, tmp_path, caplog, fresh_accelerate_state
):
    from cadmtl.anomaly.learner_training import train

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="cadmtl.anomaly.learner_training"):
        argv = [str(demo_repo), "--config", "exterior_ad", "--output-dir", str(out), *TINY]
        summary = train([*argv, "--max-steps", "1000", "--max-minutes", "0.01"])
    assert summary["stopped_early"] and 1 <= summary["steps"] < 1000 and summary["max_steps"] == 1000
    assert any(
        f"stopped at step {summary['steps']} after" in r.getMessage()
        and "--max-minutes 0.01" in r.getMessage()
        for r in caplog.records
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == summary["steps"] and saved["seconds_to_saved_model"] >= saved["train_seconds"]
    learner = AnomalyLearner.from_pretrained(out / "model")
    assert learner.normal_statistics and learner.config.image_threshold is not None
    out_maps = learner.predict(
        normalize(torch.full((2, 3, 32, 32), 120, dtype=torch.uint8), [0.5] * 3, [0.25] * 3)
    )
    assert out_maps.anomaly_maps.shape == (2, 32, 32) and torch.isfinite(out_maps.image_scores).all()


@pytest.mark.slow
def test_protocol_trains_once_per_seed_and_reports_every_fold(demo_repo, tmp_path, fresh_accelerate_state):
    from cadmtl.cli import main

    out = tmp_path / "loto"
    argv = ["anomaly", "protocol", str(demo_repo), "--config", "exterior_ad", "--output-dir", str(out)]
    argv += ["--seeds", "0", "1", "--figure-images", "1", *TINY, "--max-steps", "3"]
    assert main(argv) == 0
    report = json.loads((out / "protocol.json").read_text())
    assert report["types"] == ["corrosion", "missing_part", "scratch"] and report["seeds_done"] == [0, 1]
    assert {r["steps"] for r in report["runs"].values()} == {3}
    for held_out, fold in report["per_fold"].items():
        assert set(fold["seeds"]) == {"0", "1"}
        for run in fold["seeds"].values():
            assert run["setting"] in {c.name for c in CANDIDATES}
            assert run["tuning_scores"][run["setting"]] == max(run["tuning_scores"].values())
            assert all(0.0 <= run["test"][k] <= 100.0 for k in ("image_auroc", "pixel_auroc", "aupro"))
        values = [run["test"]["image_auroc"] for run in fold["seeds"].values()]
        assert fold["test"]["image_auroc"]["mean"] == pytest.approx(np.mean(values))
        assert f"| {held_out} |" in (out / "protocol.md").read_text()
    from PIL import Image

    figure = Image.open(out / "maps.png")
    assert figure.height > 3 * 150  # one row per fold (1 worst image each) plus headings
    # A second call reuses the finished runs instead of training again.
    (out / "seed-0" / "logs").rename(out / "seed-0" / "logs-moved")
    assert main(argv) == 0
    assert not (out / "seed-0" / "logs").exists()
    bad = [
        "anomaly",
        "protocol",
        str(demo_repo),
        "--config",
        "exterior_ad",
        "--output-dir",
        str(out),
        "--folds",
        "k-fold",
    ]
    with pytest.raises(SystemExit):
        main(bad)


def test_protocol_refuses_tiles_it_cannot_score_yet(demo_repo, tmp_path):
    from cadmtl.anomaly.learner_protocol import run_protocol

    argv = [
        str(demo_repo),
        "--config",
        "exterior_ad",
        "--output-dir",
        str(tmp_path),
        *TINY,
        "--tile-size",
        "64",
    ]
    with pytest.raises(ValueError, match=r"cannot take --tile-size yet.*cadmtl anomaly evaluate"):
        run_protocol(argv)
    assert not (tmp_path / "seed-0").exists()  # refused before any training
