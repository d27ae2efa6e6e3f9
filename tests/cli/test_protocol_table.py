"""The protocol's comparison table from finished runs' eval_results.json files (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

from cadmtl.protocol import compare_runs


def _results(path: Path, metrics: dict[str, tuple[str, str, float]]) -> Path:
    """An eval_results.json with one test config per (config -> task, metric, value)."""
    results = {
        f"{config}@test": {"task": task, "split": "test", "metrics": {metric: value}}
        for config, (task, metric, value) in metrics.items()
    }
    path.write_text(json.dumps({"results": results}))
    return path


def test_a_subset_of_methods_still_gives_its_rows(tmp_path: Path) -> None:
    """`cadmtl protocol --methods single-det` once wrote `per_seed: {}`: the single-task row needs only the
    single-task runs that were asked for, the others' cells stay empty."""
    runs = {
        seed: {"single-det": _results(tmp_path / f"det{seed}.json", {"parts_det": ("det", "AP", value)})}
        for seed, value in ((0, 0.0318), (1, 0.0282))
    }
    table, data = compare_runs(runs, "tiny")
    assert data["per_seed"] == {"Single": [{"det": 0.0318}, {"det": 0.0282}]}
    row = next(line for line in table.splitlines() if "| Single |" in line)
    assert row == "| tiny | Single | 2 | - | 3.00 ± 0.25 | - |"


def test_every_method_row_needs_every_seed(tmp_path: Path) -> None:
    full = {
        "parts_cls": ("cls", "acc@1", 0.5),
        "parts_det": ("det", "AP", 0.1),
        "parts_seg": ("seg", "mIoU", 0.2),
    }
    runs = {
        0: {"base": _results(tmp_path / "b0.json", full), "adaptive": _results(tmp_path / "a0.json", full)},
        1: {"base": _results(tmp_path / "b1.json", full)},  # adaptive did not run for seed 1
    }
    table, data = compare_runs(runs, "tiny")
    assert set(data["per_seed"]) == {"Base"}
    assert "| tiny | Base | 2 | 50.00 ± 0.00 | 10.00 ± 0.00 | 20.00 ± 0.00 |" in table


def test_the_pretrained_cpu_setting_runs_the_papers_three_rows_on_the_wheel_backbone() -> None:
    import yaml

    from cadmtl.protocol import METHODS, REPO_ROOT, SETTINGS

    setting = SETTINGS["cpu-pretrained"]
    assert setting.methods == ("single-cls", "single-det", "single-seg", "base", "adaptive")
    assert set(setting.methods) <= set(METHODS) and setting.seeds == [0, 1, 2] and setting.limit is None
    config = yaml.safe_load((REPO_ROOT / setting.config).read_text())
    assert config["backbone"] == "efficientnet-lite0"
    assert config["freeze_steps"] >= 3 * setting.steps_per_task  # frozen stages stay frozen the whole run
    assert config["channels_last"] and config["freeze_batch_norm"] is not False
