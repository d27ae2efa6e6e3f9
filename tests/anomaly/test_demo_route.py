"""`benchmarks/demo_route.py`: the app's Anomaly tab on a split's normal photos and on the same photos with one
painted defect, on a small generated `_ad` repo with a tiny random scorer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cadmtl.anomaly.data import load_anomaly_split
from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model
from cadmtl.cli import main as cadmtl_main
from dataset_scripts.make_demo import build_demo_dataset
from dataset_scripts.make_public import CARS_AD_ANOMALIES
from dataset_scripts.synthesize import defect_specs
from dataset_scripts.taxonomy import load_taxonomy

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_route = _load("demo_route", REPO_ROOT / "benchmarks" / "demo_route.py")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("route") / "mini"
    build_demo_dataset(folder, train=10, validation=6, test=10, configs=["chassis_cls"])
    return folder


@pytest.fixture(scope="module")
def fitted(repo: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("route-fit")
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(output)]
    assert cadmtl_main([*argv, "--backbone", "tiny", "--image-size", "64", "--coreset-fraction", "0.5"]) == 0
    return output / "model"


def test_the_route_counts_normals_and_painted_photos_with_the_right_denominators(
    repo: Path, fitted: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "route.json"
    argv = [str(fitted), str(repo), "--config", "exterior_ad", "--split", "test"]
    assert demo_route.main([*argv, "--data", str(tmp_path / "no-data"), "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    normals = [s for s in load_anomaly_split(str(repo), "exterior_ad", "test") if s.is_normal]
    rows = summary["rows"]
    assert summary["photos"] == len(rows) == len(normals) == 5  # half of the 10 test rows are normal
    assert [row["image_id"] for row in rows] == [sample.image_id for sample in normals]
    painted = [row for row in rows if row["painted"]]
    assert summary["painted"] == len(painted) and summary["defect_not_placed"] == len(rows) - len(painted)
    assert len(painted) == 5 and not any(row["centred_on_car"] for row in rows)  # no polygons: anywhere
    # defect types cycle over the photos, in cars_ad's order
    assert [row["defect_type"] for row in rows] == list(CARS_AD_ANOMALIES[:5])

    ok = sum(row["normal_verdict"] == "OK" for row in rows)
    ng = sum(row["painted_verdict"] == "NG" for row in painted)
    on_defect = sum(row["painted_verdict"] == "NG" and row["peak_on_defect"] for row in painted)
    assert summary["ok_on_normals"] == ok and summary["ok_on_normals_percent"] == pytest.approx(100 * ok / 5)
    assert summary["ng_on_painted"] == ng and summary["ng_on_painted_percent"] == pytest.approx(100 * ng / 5)
    assert summary["ng_with_peak_on_defect"] == on_defect <= ng
    assert summary["ng_with_peak_on_defect_percent"] == pytest.approx(100 * on_defect / 5)
    per_type = summary["per_defect_type"]
    assert list(per_type) == list(CARS_AD_ANOMALIES[:5])
    assert all(rates["painted"] == 1 for rates in per_type.values())
    assert sum(rates["ng_on_painted"] for rates in per_type.values()) == ng
    for name, rates in per_type.items():
        (row,) = [row for row in painted if row["defect_type"] == name]
        assert rates["ng_on_painted_percent"] == (100.0 if row["painted_verdict"] == "NG" else 0.0)
    assert summary["seconds_per_photo"] > 0 and summary["tile_size"] is None

    table = capsys.readouterr().out
    assert (
        f"| 5 | {100 * ok / 5:.1f} | {100 * ng / 5:.1f} | {100 * on_defect / 5:.1f} | "
        f"{summary['seconds_per_photo']:.3f} |"
    ) in table
    assert f"| scratch | 1 | {per_type['scratch']['ng_on_painted_percent']:.1f} |" in table


def test_the_route_scores_exactly_what_the_app_s_anomaly_tab_answers(
    repo: Path, fitted: Path, tmp_path
) -> None:
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    app = _load("cadmtl_demo_app_route", REPO_ROOT / "app.py")
    summary = demo_route.measure(str(fitted), str(repo), config="exterior_ad", limit=2, show_progress=False)
    assert summary["photos"] == 2
    scorer = load_anomaly_model(fitted)
    processor = anomaly_processor(scorer)
    normals = [s for s in load_anomaly_split(str(repo), "exterior_ad", "test") if s.is_normal]
    for row, sample in zip(summary["rows"], normals, strict=False):
        sample.image.save(tmp_path / "photo.png")
        _, score, verdict = app.inspect_anomaly(scorer, str(tmp_path / "photo.png"), processor)
        assert (score, verdict) == (pytest.approx(row["normal_score"], rel=1e-5), row["normal_verdict"])


def test_one_painted_defect_is_seeded_and_its_mask_covers_the_change() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(90, 160, (120, 160, 3), dtype=np.uint8))
    spec = defect_specs({"scratch": 1}, "exterior_ad", load_taxonomy())["scratch"]
    region = np.zeros((120, 160), bool)
    region[50:70, 70:90] = True
    painted, mask = demo_route.paint_one_defect(photo, spec, 0, "photo-1", region)
    again, same_mask = demo_route.paint_one_defect(photo, spec, 0, "photo-1", region)
    assert np.array_equal(np.asarray(painted), np.asarray(again)) and np.array_equal(mask, same_mask)
    changed = np.any(np.asarray(painted) != np.asarray(photo), axis=-1)
    assert mask.any() and changed[mask].all() and changed[region].any()
    # the painter's soft edge reaches a few pixels past its mask (why the peak check allows 2 % of the side)
    assert ndimage.distance_transform_edt(~mask)[changed].max() <= 0.06 * 120


def test_the_peak_counts_on_the_defect_within_two_percent_of_the_shorter_side() -> None:
    mask = np.zeros((100, 200), bool)
    mask[40:50, 40:50] = True
    anomaly_map = np.zeros((100, 200), np.float32)
    anomaly_map[45, 45] = 1.0
    assert demo_route.peak_on_defect(anomaly_map, mask)
    anomaly_map[45, 45], anomaly_map[45, 51] = 0.0, 1.0  # 2 px right of the mask: within 2 % of 100 px
    assert demo_route.peak_on_defect(anomaly_map, mask)
    anomaly_map[45, 51], anomaly_map[45, 52] = 0.0, 1.0  # 3 px away: outside
    assert not demo_route.peak_on_defect(anomaly_map, mask)


def test_anomaly_fit_records_the_generated_repo_it_was_fitted_on(repo: Path, fitted: Path) -> None:
    config = json.loads((fitted / "config.json").read_text())
    assert config["training_data"] == {"repo": str(repo), "configs": ["exterior_ad"], "generated": True}
    assert load_anomaly_model(fitted).config.training_data["generated"] is True


def test_the_car_region_is_drawn_in_the_annotated_frame_then_fitted_to_the_stored_photo() -> None:
    polygon = SimpleNamespace(polygons=[[20, 20, 60, 20, 60, 60, 20, 60]])  # x, y pairs of a 40 px square
    source = SimpleNamespace(annotations=[polygon], expected_size=(100, 80))  # (width, height) annotated
    same = demo_route.region_of(source, 80, 100)
    assert same.shape == (80, 100) and same[20:60, 20:60].all() and same.sum() == pytest.approx(1600, rel=0.1)
    halved = demo_route.region_of(source, 40, 50)  # the converter stored it at half size
    assert (
        halved.shape == (40, 50)
        and halved[10:30, 10:30].all()
        and halved.sum() == pytest.approx(400, rel=0.1)
    )
    assert demo_route.region_of(SimpleNamespace(annotations=[], expected_size=None), 40, 50) is None


def test_an_uncalibrated_model_is_refused_in_one_line(
    repo: Path, fitted: Path, tmp_path: Path, capsys
) -> None:
    uncalibrated = load_anomaly_model(fitted)
    uncalibrated.image_threshold = uncalibrated.pixel_threshold = None
    uncalibrated.save_pretrained(tmp_path / "model")
    argv = [
        str(tmp_path / "model"),
        str(repo),
        "--config",
        "exterior_ad",
        "--output",
        str(tmp_path / "r.json"),
    ]
    assert demo_route.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert error == (
        f"error: {tmp_path / 'model'}: the model has no image threshold (fitted without calibration images), so "
        "the app gives no OK / NG; fit it with a validation split or held-out normal images"
    )
    assert not (tmp_path / "r.json").exists()
