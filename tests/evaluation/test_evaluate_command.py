"""The evaluation command, the paper-shaped tables, the public-benchmark protocol and the example configs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cadmtl.data.sources import discover_sources, merged_labels
from cadmtl.evaluation.command import main as evaluate_main
from cadmtl.evaluation.reporting import comparison_table, domain_tables, mean_std, mean_std_cell, task_summary
from cadmtl.presets import backbone_preset
from cadmtl.testing import tiny_cadmtl_config
from cadmtl.training.arguments import parse_arguments
from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl import CadMtlConfig, CadMtlModel

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval") / "demo"
    build_demo_dataset(
        folder, train=8, validation=8, test=8, configs=["exterior_det", "exterior_seg", "chassis_cls"]
    )
    return folder


@pytest.fixture(scope="module")
def model_dir(dataset: Path, tmp_path_factory) -> Path:
    sources = discover_sources(
        str(dataset), {"cls": ["chassis_cls"], "det": ["exterior_det"], "seg": ["exterior_seg"]}, "test"
    )
    config = CadMtlConfig(
        backbone_config=backbone_preset("tiny"),
        cls_labels=merged_labels(sources["cls"]),
        det_labels=merged_labels(sources["det"]),
        seg_labels=merged_labels(sources["seg"]),
        neck_channels=16,
        seg_channels=16,
        image_sizes={"cls": 64, "det": 64, "seg": 64},
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    CadMtlModel(config).save_pretrained(folder)
    return folder


def test_evaluation_command_writes_results_and_paper_tables(
    model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "eval"
    assert evaluate_main([str(model_dir), str(dataset), "--output-dir", str(output), "--name", "tiny"]) == 0
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert evaluation["image_sizes"] == {"cls": 64, "det": 64, "seg": 64}  # the sizes the model records
    results = evaluation["results"]
    assert set(results) == {"chassis_cls", "exterior_det", "exterior_seg"}
    assert set(results["exterior_det"]["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100"}
    assert set(results["chassis_cls"]["metrics"]) == {"acc@1", "acc@5"}
    assert results["chassis_cls"]["report"]["counts"]["num_samples"] == 8  # every test image, once
    assert set(results["exterior_seg"]["metrics"]) == {"mIoU", "mFscore", "mPrecision", "mRecall", "aAcc"}
    tables = (output / "eval_results.md").read_text()
    assert "| Model | exterior AP | exterior AP50 | exterior AP75 | exterior AR |" in tables
    assert "| Model | chassis Acc@1 | chassis Acc@5 |" in tables
    assert "| Model | exterior mIoU | exterior mFscore | exterior mPrec | exterior mRecall |" in tables


def test_evaluation_refuses_a_label_set_mismatch(dataset: Path, tmp_path: Path) -> None:
    CadMtlModel(tiny_cadmtl_config()).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"has det labels \[.*\] that the model does not know"):
        evaluate_main(
            [
                str(tmp_path / "other"),
                str(dataset),
                "--configs",
                "exterior_det",
                "--output-dir",
                str(tmp_path),
            ]
        )


def test_evaluation_of_a_config_without_the_split_is_a_clear_error(
    model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ValueError,
        match=r"config '\w+' has no split 'holdout'; available splits: \['train', 'validation', 'test'\]",
    ):
        evaluate_main([str(model_dir), str(dataset), "--split", "holdout", "--output-dir", str(tmp_path)])


def result(task: str, metrics: dict[str, float], split: str = "test") -> dict:
    return {"task": task, "split": split, "metrics": metrics}


def test_tables_and_comparison_hand_computed(tmp_path: Path) -> None:
    seed0 = {
        "parts_cls": result("cls", {"acc@1": 0.98, "acc@5": 1.0}),
        "parts_det": result("det", {"AP": 0.5}),
    }
    seed1 = {
        "parts_cls": result("cls", {"acc@1": 0.96, "acc@5": 1.0}),
        "parts_det": result("det", {"AP": 0.6}),
    }
    assert task_summary(seed0) == {"cls": 0.98, "det": 0.5}
    table = comparison_table([("S+", "Adaptive", [task_summary(seed0), task_summary(seed1)])])
    # mean of 98 and 96 = 97.00, sample std = 1.41; AP 55.00 ± 7.07; no segmentation results -> "-"
    assert "| S+ | Adaptive | 2 | 97.00 ± 1.41 | 55.00 ± 7.07 | - |" in table
    tables = domain_tables({"a": seed0, "b": seed1})
    assert "| a | 50.00 | - | - | - |" in tables and "| b | 96.00 | 100.00 |" in tables

    for name, results in (("s0.json", seed0), ("s1.json", seed1)):
        (tmp_path / name).write_text(json.dumps({"results": results}))
    specs = [f"S+:Adaptive={tmp_path / 's0.json'}", f"S+:Adaptive={tmp_path / 's1.json'}"]
    assert evaluate_main(["--compare", *specs, "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "97.00 ± 1.41" in (tmp_path / "cmp" / "comparison.md").read_text()
    with pytest.raises(ValueError, match=r"expects MODEL:METHOD=RESULTS\.json"):
        evaluate_main(["--compare", "no-method.json"])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not present")
def test_public_protocol_smoke_setting_runs_end_to_end(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "cadmtl.protocol", "--setting", "smoke", "--data", str(SHARED_DATA),
        "--dataset-dir", str(tmp_path / "public"), "--output-dir", str(tmp_path / "protocol"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = (tmp_path / "protocol" / "comparison.md").read_text()
    rows = ("Single", "Base", "Adaptive", "PCGrad", "CAGrad", "Aligned-MTL", "FAMO")
    for method in rows:
        assert f"| tiny | {method} | 1 |" in table
    data = json.loads((tmp_path / "protocol" / "comparison.json").read_text())
    assert set(data["per_seed"]) == set(rows)
    for summaries in data["per_seed"].values():
        assert set(summaries[0]) == {"cls", "det", "seg"}
    # Same budget per task: 4 steps for each single-task model and each all-tasks-per-step weighting method, 12 for
    # base and adaptive, which sample one task per step.
    methods = (
        "single-cls",
        "single-det",
        "single-seg",
        "base",
        "adaptive",
        "pcgrad",
        "cagrad",
        "aligned_mtl",
        "famo",
    )
    steps = {
        method: json.loads((tmp_path / "protocol" / method / "seed0" / "eval_results.json").read_text())[
            "steps"
        ]
        for method in methods
    }
    assert steps == {method: 12 if method in ("base", "adaptive") else 4 for method in methods}
    assert data["steps"] == steps


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_training_configs_parse(config: Path) -> None:
    _, data_args, train_args = parse_arguments(["--config", str(config)])
    assert data_args.cls_configs and data_args.det_configs and data_args.seg_configs
    assert train_args.paradigm in ("single", "base", "adaptive")


@pytest.mark.parametrize(
    "config", sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_load(config: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.mixed_precision == "bf16"
    assert loaded.num_processes == yaml.safe_load(config.read_text())["num_processes"]


def test_configs_dir_is_not_empty() -> None:
    assert shutil.which("accelerate") or Path(sys.executable).with_name("accelerate").exists()
    assert len(list((REPO_ROOT / "configs").glob("*.yaml"))) >= 6


def test_mean_std_cells_over_seeds() -> None:
    assert mean_std([0.98, 0.96]) == pytest.approx((0.97, 0.0141421356))
    assert mean_std_cell([0.98, 0.96], scale=100) == "97.00 ± 1.41"
    assert mean_std_cell([0.5], scale=100, digits=1) == "50.0"  # one seed: no spread to report
    assert mean_std_cell([]) == "-"
    assert mean_std_cell([0.5, math.nan]) == "-"  # a failed seed is not averaged away
