"""`cadmtl anomaly fit / evaluate / predict` on a small generated `_ad` repo with the tiny random backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cadmtl.anomaly.command import dense_memory_bytes, fit_parser, scorer_settings
from cadmtl.anomaly.data import AnomalySample, load_anomaly_split, normal_only
from cadmtl.anomaly.defect_head import HIDDEN_UNITS
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.cli import main
from cadmtl.features import load_backbone
from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import tile_boxes


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ad") / "mini"
    build_demo_dataset(folder, train=12, validation=6, test=8)
    return folder


@pytest.fixture(scope="module")
def fitted(repo: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fit")
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(output)]
    assert main([*argv, "--backbone", "tiny", "--image-size", "64", "--coreset-fraction", "0.5"]) == 0
    return output


def test_fit_saves_a_calibrated_scorer(fitted: Path) -> None:
    summary = json.loads((fitted / "fit_results.json").read_text())
    assert summary["normal_images_in_bank"] == 12 and summary["memory_bank_patches"] == 12 * 16 // 2
    assert summary["calibration"]["method"] == "f1_max"  # the validation split holds defects
    config = json.loads((fitted / "model" / "config.json").read_text())
    assert config["image_threshold"] == summary["calibration"]["image_threshold"] is not None
    assert config["pixel_threshold"] is not None and config["image_size"] == [64, 64]


def test_evaluate_writes_metrics_scores_and_maps_at_the_original_size(
    repo: Path, fitted: Path, tmp_path
) -> None:
    out = tmp_path / "eval"
    argv = [
        "anomaly",
        "evaluate",
        str(fitted / "model"),
        str(repo),
        "--config",
        "exterior_ad",
        "--split",
        "test",
    ]
    assert main([*argv, "--output-dir", str(out), "--save-maps", "--save-pictures"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "pixel_ap"}
    assert all(0 <= value <= 100 for value in metrics.values())
    assert results["per_defect_type"] and results["images"] == 8
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert list(rows[0]) == ["image_id", "is_normal", "anomaly_score", "verdict", "error"]
    assert all(row["error"] == "" for row in rows)
    samples = load_anomaly_split(str(repo), "exterior_ad", "test")
    assert [row["image_id"] for row in rows] == [sample.image_id for sample in samples]
    threshold = results["thresholds"]["image"]
    for row, sample in zip(rows, samples):
        assert row["is_normal"] == str(int(sample.is_normal))
        assert row["verdict"] == ("NG" if float(row["anomaly_score"]) >= threshold else "OK")
        anomaly_map = np.load(out / "maps" / f"{sample.image_id}.npy")
        assert anomaly_map.dtype == np.float32 and anomaly_map.shape == sample.size
        assert (out / "pictures" / f"{sample.image_id}.png").exists()
    assert "| **all images** |" in (out / "eval_results.md").read_text()


def test_predict_scores_files_and_reports_unreadable_ones(fitted: Path, tmp_path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(inputs / "part.png")
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(inputs / "gray.png")
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "predict"
    assert main(["anomaly", "predict", str(fitted / "model"), str(inputs), "--output-dir", str(out)]) == 0
    rows = {Path(row["file_name"]).name: row for row in csv.DictReader((out / "scores.csv").open())}
    assert list(rows["part.png"]) == ["file_name", "anomaly_score", "verdict", "error"]
    assert rows["broken.jpg"]["verdict"] == "error" and rows["broken.jpg"]["anomaly_score"] == ""
    assert rows["broken.jpg"]["error"].startswith("UnidentifiedImageError: ")
    assert rows["part.png"]["verdict"] in ("OK", "NG") and float(rows["part.png"]["anomaly_score"]) >= 0
    assert Image.open(out / "part.png").size == (50, 40) and Image.open(out / "gray.png").size == (30, 30)


def test_a_training_split_with_anomalous_images_is_refused() -> None:
    good = AnomalySample("a", Image.new("RGB", (4, 4)), np.zeros((4, 4), np.uint8), True, "good")
    bad = AnomalySample("b", Image.new("RGB", (4, 4)), np.ones((4, 4), np.uint8), False, "dent")
    assert normal_only([good], "x_ad/train") == [good]
    with pytest.raises(
        ValueError, match=r"x_ad/train must hold normal images only, but 1 are anomalous \(first: b\)"
    ):
        normal_only([good, bad], "x_ad/train")


def test_a_config_that_is_not_ad_is_a_clear_error(repo: Path, capsys) -> None:
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_seg", "--output-dir", "unused"]
    assert main(argv) == 2
    assert "'exterior_seg' is not an anomaly-detection config" in capsys.readouterr().err


def test_evaluate_and_predict_also_take_a_saved_learner(repo: Path, tmp_path) -> None:
    from cadmtl.anomaly.data import load_anomaly_split, to_pixel_values
    from cadmtl.anomaly.learner import AnomalyLearner, AnomalyLearnerConfig

    learner = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=64)).eval()
    normals = [sample.image for sample in load_anomaly_split(str(repo), "exterior_ad", "train", limit=4)]
    learner.fit_normal_statistics([to_pixel_values(normals, 64)])
    learner.config.image_threshold = 0.5
    learner.save_pretrained(tmp_path / "learner")
    out = tmp_path / "eval"
    argv = ["anomaly", "evaluate", str(tmp_path / "learner"), str(repo), "--config", "exterior_ad"]
    assert main([*argv, "--split", "test", "--output-dir", str(out), "--save-maps"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["thresholds"]["image"] == 0.5 and 0 <= results["metrics"]["image_auroc"] <= 100
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert all(row["verdict"] == ("NG" if float(row["anomaly_score"]) >= 0.5 else "OK") for row in rows)


def tiny_fit_argv(repo: Path) -> list[str]:
    """`cadmtl anomaly fit` of the generated repo's exterior_ad on the tiny random backbone at 64 px."""
    return [
        "anomaly",
        "fit",
        str(repo),
        "--config",
        "exterior_ad",
        "--backbone",
        "tiny",
        "--image-size",
        "64",
    ]


def test_fit_saves_the_approximate_search_options_and_refuses_bad_ones(repo: Path, tmp_path, capsys) -> None:
    argv = tiny_fit_argv(repo)
    assert main([*argv, "--output-dir", str(tmp_path), "--search-lists", "8", "--search-probes", "3"]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["search_num_lists"], config["search_num_probes"]) == (8, 3)
    assert (
        main([*argv, "--output-dir", str(tmp_path / "bad"), "--search-lists", "2", "--search-probes", "3"])
        == 2
    )
    assert "num_probes must be between 1 and num_lists (2); got 3" in capsys.readouterr().err
    # the inverted file searches a coreset bank, never a dense memory: refused, not ignored
    dense = ["--neighbour-images", "2", "--search-lists", "8"]
    assert main([*argv, "--output-dir", str(tmp_path / "dense"), *dense]) == 2
    assert "search_num_lists / search_dtype search a coreset bank" in capsys.readouterr().err
    projected = ["--search-projection-dim", "16", "--search-candidates", "4", "--query-stride", "2"]
    assert main([*argv, "--output-dir", str(tmp_path / "projected"), *projected]) == 0
    config = json.loads((tmp_path / "projected" / "model" / "config.json").read_text())
    assert (config["search_projection_dim"], config["num_candidates"], config["query_stride"]) == (16, 4, 2)
    assert config["map_flips"] == []  # the default: the upright view only
    assert main([*argv, "--output-dir", str(tmp_path / "flips"), "--map-flips", "h", "v"]) == 0
    assert json.loads((tmp_path / "flips" / "model" / "config.json").read_text())["map_flips"] == ["h", "v"]
    with pytest.raises(SystemExit):
        main([*argv, "--output-dir", str(tmp_path / "bad"), "--map-flips", "x"])
    assert "invalid choice: 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--output-dir", str(tmp_path / "bad"), "--query-stride", "0"])
    assert "--query-stride: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--output-dir", str(tmp_path / "bad"), "--search-projection-dim", "-1"])
    assert "--search-projection-dim: must be >= 0, got -1" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(tmp_path / "exact")]) == 0
    assert (
        json.loads((tmp_path / "exact" / "model" / "config.json").read_text())["search_projection_dim"]
        is None
    )


def test_dense_memory_bytes_counts_every_patch_of_every_tile() -> None:
    scorer = PatchMemoryScorer.from_backbone(
        load_backbone("tiny")[0], image_size=(96, 96), neighbour_images=3
    )
    channels = scorer.extractor.num_channels
    sizes = [(96, 96), (300, 500)]
    assert dense_memory_bytes(scorer, sizes, None, 0) == (2 * 36, 2 * 36 * channels * 2)  # a 6 x 6 grid each
    tiles = 1 + len(tile_boxes(300, 500, 128, 32))
    assert tiles > 2 and dense_memory_bytes(scorer, sizes[1:], 128, 32)[0] == (tiles - 1) * 36
    assert dense_memory_bytes(scorer, sizes, 128, 32) == (tiles * 36, tiles * 36 * channels * 2)


def test_fit_with_neighbour_images_keeps_every_patch_and_a_border_profile(
    repo: Path, tmp_path, capsys
) -> None:
    output = tmp_path / "dense"
    argv = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(output)]
    assert main([*argv, "--backbone", "tiny", "--image-size", "96", "--neighbour-images", "3"]) == 0
    summary = json.loads((output / "fit_results.json").read_text())
    # every patch of the 12 normal train images (a 6 x 6 grid at 96 px), float16, no coreset
    assert summary["memory_bank_patches"] == 12 * 36 and summary["settings"]["neighbour_images"] == 3
    assert summary["settings"]["coreset_fraction"] == 1.0  # the record says no coreset was drawn
    bank = load_file(output / "model" / "model.safetensors")["memory_bank"]
    assert bank.dtype == torch.float16 and bank.shape[0] == 12 * 36
    assert summary["memory_bank_mb"] == pytest.approx(bank.numel() * 2 / 2**20)
    config = json.loads((output / "model" / "config.json").read_text())
    assert (
        config["neighbour_images"] == 3
        and config["memory_images"] == 12
        and config["coreset_fraction"] == 1.0
    )
    # fitted on the validation split's normal images: rings 0 and 1 of the 6 x 6 grid, then the interior
    assert summary["border_profile"] == config["border_profile"] and len(config["border_profile"]) == 3
    assert config["border_profile"][-1] == 1.0 and config["image_threshold"] is not None
    out = tmp_path / "eval"
    evaluate = ["anomaly", "evaluate", str(output / "model"), str(repo), "--config", "exterior_ad"]
    assert main([*evaluate, "--output-dir", str(out)]) == 0
    assert json.loads((out / "eval_results.json").read_text())["images"] == 8
    # a dense memory over --max-memory-gb is refused before any feature is computed, its size named
    limit = bank.numel() * 2 / 2**30 / 2
    refused = tmp_path / "refused"
    tiny = ["--backbone", "tiny", "--image-size", "96", "--neighbour-images", "3"]
    assert main([*argv[:-1], str(refused), *tiny, "--max-memory-gb", str(limit)]) == 2
    error = capsys.readouterr().err
    size_kb = bank.numel() * 2 / 1024
    assert (
        f"the dense memory of 12 exterior_ad/train images (432 patches, float16) would take {size_kb:.1f} kB"
        in error
    )
    assert "fit a coreset with --neighbour-images 0, use fewer images (--max-train)" in error
    assert not refused.exists()


def test_pretrained_defaults_use_the_dense_memory_except_by_tiles() -> None:
    base = ["repo", "--config", "tile_ad", "--output-dir", "out"]
    assert scorer_settings("efficientnet-lite2", fit_parser().parse_args(base))["neighbour_images"] == 20
    tiled = fit_parser().parse_args([*base, "--tile-size", "256"])
    assert scorer_settings("efficientnet-lite2", tiled)["neighbour_images"] is None
    asked = fit_parser().parse_args([*base, "--tile-size", "256", "--neighbour-images", "5"])
    assert scorer_settings("efficientnet-lite2", asked)["neighbour_images"] == 5
    coreset = fit_parser().parse_args([*base, "--neighbour-images", "0"])
    assert scorer_settings("efficientnet-lite2", coreset)["neighbour_images"] is None
    assert scorer_settings("tiny", fit_parser().parse_args(base))["neighbour_images"] is None
    both = fit_parser().parse_args([*base, "--coreset-fraction", "0.05"])  # refused, never silently dropped
    with pytest.raises(
        ValueError, match=r"--coreset-fraction reduces a coreset bank.*--neighbour-images 20\)"
    ):
        scorer_settings("efficientnet-lite2", both)
    assert (
        scorer_settings(
            "efficientnet-lite2",
            fit_parser().parse_args([*base, "--coreset-fraction", "0.05", "--neighbour-images", "0"]),
        )["coreset_fraction"]
        == 0.05
    )


def test_fit_with_a_defect_head_saves_it_and_evaluates(repo: Path, tmp_path, capsys) -> None:
    output = tmp_path / "head"
    argv = tiny_fit_argv(repo)
    assert main([*argv, "--output-dir", str(output), "--defect-head", "--defect-head-weight", "0.5"]) == 0
    summary = json.loads((output / "fit_results.json").read_text())
    head = summary["defect_head"]
    assert head["synthesis"] == "texture" and 0 < head["anomalous_cells"] < head["cells"]
    config = json.loads((output / "model" / "config.json").read_text())
    assert config["defect_head_hidden"] == HIDDEN_UNITS and config["defect_head_weight"] == 0.5
    assert config["defect_head_statistics"] == head["statistics"] and config["image_threshold"] is not None
    assert "defect_head.hidden.weight" in load_file(output / "model" / "model.safetensors")
    evaluation = tmp_path / "eval"
    evaluate = ["anomaly", "evaluate", str(output / "model"), str(repo), "--config", "exterior_ad"]
    assert main([*evaluate, "--output-dir", str(evaluation)]) == 0
    assert json.loads((evaluation / "eval_results.json").read_text())["images"] == 8

    refused = tmp_path / "refused"
    assert main([*argv, "--output-dir", str(refused), "--defect-head", "--defect-head-weight", "1.5"]) == 2
    assert "--defect-head-weight must lie in [0, 1]; got 1.5" in capsys.readouterr().err
    assert not refused.exists()
