"""Checkpoint objects read by name, the log window's record, and the run's card data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cadmtl.training.arguments import DataArguments, ModelArguments, TrainingArguments
from cadmtl.training.checkpoint import (
    OBJECTS_INDEX,
    LoopState,
    find_checkpoint,
    register_stateful,
    registered_state,
)
from cadmtl.training.finish import FinishSettings, dataset_identity, model_card_data
from cadmtl.training.log_window import LogWindow
from cadmtl.training.weighting import CoBaWeighting, EqualWeighting


def test_registered_state_reads_by_name_not_by_order(tmp_path: Path) -> None:
    torch.save({"step": 7}, tmp_path / "custom_checkpoint_3.pkl")
    torch.save({"weights": [0.5, 0.5]}, tmp_path / "custom_checkpoint_0.pkl")
    (tmp_path / OBJECTS_INDEX).write_text(
        json.dumps({"weighting": "custom_checkpoint_0.pkl", "loop": "custom_checkpoint_3.pkl"})
    )
    assert registered_state(tmp_path, "loop") == {"step": 7}
    assert registered_state(tmp_path, "weighting") == {"weights": [0.5, 0.5]}
    with pytest.raises(KeyError, match=r"holds no object named 'streams'; it holds \['loop', 'weighting'\]"):
        registered_state(tmp_path, "streams")
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint_objects\.json"):
        registered_state(tmp_path / "missing", "loop")


class _Pickled:
    """Anything that is not a tensor or a plain value: unpickling it could run code."""


def test_checkpoint_objects_round_trip_as_tensors_and_refuse_pickled_objects(tmp_path: Path) -> None:
    loop, weighting = LoopState(), CoBaWeighting(["cls", "det"])
    loop.step, loop.nonfinite_steps = 12, 1
    objects = register_stateful({"loop": loop, "weighting": weighting, "tensor": torch.nn.Linear(2, 2)})
    assert dict(objects) == {
        "loop": "state_loop.pt",
        "weighting": "state_weighting.pt",
        "tensor": "state_tensor.pt",
    }
    objects.save(tmp_path)
    (tmp_path / OBJECTS_INDEX).write_text(json.dumps(dict(objects)))
    restored = register_stateful(
        {"loop": LoopState(), "weighting": CoBaWeighting(["cls", "det"]), "tensor": torch.nn.Linear(2, 2)}
    )
    restored.load(tmp_path)
    assert restored.objects["loop"].state_dict() == {
        "step": 12,
        "nonfinite_steps": 1,
        "consecutive_nonfinite": 0,
    }
    assert restored.objects["weighting"].state_dict() == weighting.state_dict()
    torch.testing.assert_close(restored.objects["tensor"].weight, objects.objects["tensor"].weight)

    torch.save({"step": _Pickled()}, tmp_path / "state_loop.pt")  # a checkpoint from elsewhere
    with pytest.raises(ValueError, match=r"state_loop\.pt holds more than tensors and plain values"):
        restored.load(tmp_path)
    with pytest.raises(ValueError, match=r"not loaded \(weights_only=True\)"):
        registered_state(tmp_path, "loop")


def test_the_product_never_unpickles_with_weights_only_false(repo_root: Path) -> None:
    offenders = [
        f"{path.relative_to(repo_root)}:{number}"
        for folder in ("cadmtl", "dataset_scripts", "modeling_cadmtl", "modeling_cadmtl_anomaly")
        for path in sorted((repo_root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "weights_only=False" in line.replace(" ", "")
    ]
    offenders += [
        f"{name}"
        for name in ("train_accelerate.py", "app.py")
        if "weights_only=False" in (repo_root / name).read_text()
    ]
    assert not offenders


def test_find_checkpoint_takes_the_newest_step(tmp_path: Path) -> None:
    for step in (4, 12, 8):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
    assert find_checkpoint("latest", tmp_path) == tmp_path / "checkpoints" / "step_12"
    assert find_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="Checkpoint folder nope does not exist"):
        find_checkpoint("nope", tmp_path)


def test_log_window_averages_losses_and_resets() -> None:
    window = LogWindow(num_processes=2)
    window.add_step({"cls": [torch.tensor(1.0), torch.tensor(3.0)]}, images=4)
    window.add_step({"det": [torch.tensor(5.0)]}, images=2)
    record = window.record(
        lr=0.1,
        nonfinite_steps=1,
        weighting=EqualWeighting(["cls", "det"]),
        probabilities={"cls": 0.5, "det": 0.5},
    )
    assert record["loss/cls"] == 2.0 and record["loss/det"] == 5.0
    assert record["equal/weight/cls"] == 0.5 and record["scheduler/prob/det"] == 0.5
    assert record["lr"] == 0.1 and record["nonfinite_steps"] == 1
    assert record["throughput/images_per_second"] > 0  # 12 images over all ranks
    assert window.images == 0 and window.task_losses == {}


def test_a_local_dataset_is_named_by_its_folder_and_claims_no_hub_dataset(tmp_path: Path) -> None:
    local = tmp_path / "my-line-data"
    local.mkdir()
    assert dataset_identity(str(local)) == ("my-line-data", [])
    assert dataset_identity("cad-mtl/cad100k") == ("cad-mtl/cad100k", ["cad-mtl/cad100k"])
    settings = FinishSettings.from_arguments(
        ModelArguments(),
        DataArguments(dataset=str(local)),
        TrainingArguments(),
        {"seg": ["exterior_seg"]},
        weighting=CoBaWeighting(["seg"], warmup_steps=3, history_length=3).name,
        scheduler_temperature=1.0,
    )
    data = model_card_data(
        settings, {"exterior_seg": {"task": "seg", "split": "test", "metrics": {"mIoU": 0.5}}}, steps=10
    )
    assert data["datasets"] == [] and data["dataset_id"] == "my-line-data"
    assert data["training_data"] == "my-line-data: exterior_seg"
    assert data["training"]["weighting"] == "coba" and data["training"]["coba"]["history_length"] == 30

    from cadmtl.testing import tiny_cadmtl_config
    from modeling_cadmtl.model_card_cadmtl import render_model_card

    metadata = yaml.safe_load(render_model_card(tiny_cadmtl_config(), data).split("---\n")[1])
    assert "datasets" not in metadata
    (result,) = metadata["model-index"][0]["results"]
    assert result["dataset"] == {
        "name": "my-line-data",
        "type": "my-line-data",
        "config": "exterior_seg",
        "split": "test",
    }
