"""Keeping what is best: the selection metric, the tracker and patience, results.csv, the EMA, best/ (fast)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from cadmtl.testing import tiny_cadmtl_config
from cadmtl.training.best import (
    BestTracker,
    ResultsCsv,
    build_ema,
    check_metric_for_best_model,
    default_greater_is_better,
    load_best_weights,
    results_row,
    save_best,
    selection_value,
)
from cadmtl.training.checkpoint import check_same_objects
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

RESULTS = {
    "chassis_cls": {"task": "cls", "split": "validation", "metrics": {"acc@1": 0.5, "acc@5": 0.9}},
    "exterior_det": {"task": "det", "split": "validation", "metrics": {"AP": 0.2, "AP50": 0.4}},
    "exterior_seg": {"task": "seg", "split": "validation", "metrics": {"mIoU": 0.3, "aAcc": 0.8}},
}


# ----------------------------------------------------------------------------------------- selection metric
def test_default_metric_is_the_mean_of_each_configs_primary_metric() -> None:
    assert selection_value(RESULTS) == pytest.approx((0.5 + 0.2 + 0.3) / 3)
    with_nan = {**RESULTS, "interior_det": {"task": "det", "metrics": {"AP": math.nan}}}
    assert selection_value(with_nan) == pytest.approx((0.5 + 0.2 + 0.3) / 3)  # undefined values are skipped
    assert math.isnan(selection_value({"a_det": {"task": "det", "metrics": {"AP": math.nan}}}))


def test_explicit_metric_key_and_its_errors() -> None:
    assert selection_value(RESULTS, "exterior_det/AP50") == 0.4
    with pytest.raises(KeyError, match=r"config 'exterior_det' has no metric 'mAP'; it has \['AP', 'AP50'\]"):
        selection_value(RESULTS, "exterior_det/mAP")
    check_metric_for_best_model("exterior_det/AP50", ["chassis_cls", "exterior_det"])
    with pytest.raises(ValueError, match=r"names config 'interior_det', which this run does not evaluate"):
        check_metric_for_best_model("interior_det/AP", ["chassis_cls", "exterior_det"])
    with pytest.raises(ValueError, match=r"must be 'mean_primary' or 'CONFIG/METRIC'"):
        check_metric_for_best_model("AP", ["exterior_det"])
    assert default_greater_is_better("mean_primary") and default_greater_is_better("exterior_det/AP")
    assert not default_greater_is_better("eval_loss")


# ------------------------------------------------------------------------------------------------- tracker
def test_tracker_improvement_ties_and_patience() -> None:
    tracker = BestTracker(patience=2)
    assert tracker.update(10, 0.3) and tracker.best_step == 10  # the first value is the best
    assert tracker.update(20, 0.4) and (tracker.best_value, tracker.best_step) == (0.4, 20)
    assert not tracker.update(30, 0.4)  # a tie keeps the earlier best
    assert tracker.evaluations_since_best == 1 and not tracker.should_stop
    assert not tracker.update(40, math.nan)  # NaN never improves
    assert tracker.should_stop and tracker.best_step == 20 and tracker.evaluations == 4
    assert (
        "did not improve for 2 evaluations in a row (patience 2; best 0.4 at step 20)"
        in tracker.stop_reason()
    )
    assert tracker.update(50, 0.41) and tracker.evaluations_since_best == 0 and not tracker.should_stop


def test_tracker_lower_is_better_and_no_patience() -> None:
    tracker = BestTracker("exterior_det/loss", greater_is_better=False)
    assert tracker.update(1, 2.0) and tracker.update(2, 1.5)
    assert not tracker.update(3, 1.7)
    for step in range(4, 100):
        tracker.update(step, 9.0)
    assert tracker.best_value == 1.5 and not tracker.should_stop  # patience 0: never stops
    with pytest.raises(ValueError, match="patience must be >= 0"):
        BestTracker(patience=-1)


def test_tracker_state_dict_round_trip() -> None:
    tracker = BestTracker("chassis_cls/acc@1", patience=3)
    for step, value in [(5, 0.1), (10, 0.3), (15, 0.2)]:
        tracker.update(step, value)
    resumed = BestTracker("chassis_cls/acc@1", patience=3)
    resumed.load_state_dict(torch.load(_saved(tracker.state_dict()), weights_only=False))
    assert vars(resumed) == vars(tracker)
    resumed.update(20, 0.25)
    resumed.update(25, 0.25)
    assert resumed.should_stop and resumed.best_step == 10  # the count went on from the checkpoint's
    with pytest.raises(ValueError, match=r"metric='chassis_cls/acc@1', this run by 'mean_primary'"):
        BestTracker().load_state_dict(tracker.state_dict())


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------------------------- results.csv
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_rows_header_once_and_resume_without_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    log = ResultsCsv(path)
    log.open(None)
    losses = {"cls": 2.5, "det": 1.25}
    for step, is_best in [(2, True), (4, False), (6, True)]:
        log.append(results_row(step, 1.5 * step, losses, RESULTS, 0.1 * step, is_best))
    text = path.read_text()
    assert text.count("step,") == 1  # one header
    rows = read_csv(path)
    assert [r["step"] for r in rows] == ["2", "4", "6"] and [r["is_best"] for r in rows] == ["1", "0", "1"]
    assert list(rows[0])[:4] == ["step", "time", "train/cls_loss", "train/det_loss"]
    assert rows[1]["metrics/exterior_det/AP50"] == "0.4" and rows[1]["metrics/chassis_cls/acc@1"] == "0.5"
    assert float(rows[2]["fitness"]) == pytest.approx(0.6) and rows[2]["time"] == "9.0"
    assert list(rows[0])[-2:] == ["fitness", "is_best"]

    # Resumed from the checkpoint of step 4: the row of step 6 is evaluated again, not kept twice.
    resumed = ResultsCsv(path)
    resumed.load_state_dict({"elapsed": 100.0})
    resumed.open(4)
    assert resumed.elapsed() >= 100.0  # the clock goes on from the checkpoint's
    resumed.append(results_row(6, resumed.elapsed(), {"cls": 2.0, "seg": 0.5}, RESULTS, 0.6, True))
    rows = read_csv(path)
    assert [r["step"] for r in rows] == ["2", "4", "6"] and path.read_text().count("step,") == 1
    assert (
        rows[2]["train/seg_loss"] == "0.5" and rows[0]["train/seg_loss"] == ""
    )  # a new column widens the file

    ResultsCsv(path).open(None)  # a fresh run in the same folder starts a new file
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------- EMA
def test_ema_matches_a_hand_computed_decay() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.register_buffer("running", torch.zeros(2))
    decay = 0.9
    ema = build_ema(model, decay)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    snapshots = []
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
            model.running.fill_(float(step))
        snapshots.append((model.weight.detach().clone(), model.running.clone()))
        ema.update_parameters(model)
    # The first update copies the weights; each later one is decay * ema + (1 - decay) * weights.
    expected_weight, expected_running = snapshots[0]
    for weight, running in snapshots[1:]:
        expected_weight = decay * expected_weight + (1 - decay) * weight
        expected_running = decay * expected_running + (1 - decay) * running
    torch.testing.assert_close(ema.module.weight, expected_weight)
    torch.testing.assert_close(ema.module.running, expected_running)  # buffers are averaged too
    assert int(ema.n_averaged) == 4
    assert not torch.equal(ema.module.weight, model.weight)
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\)"):
        build_ema(model, 1.0)


def test_ema_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ema = build_ema(model, 0.5)
    ema.update_parameters(model)
    resumed = build_ema(torch.nn.Linear(4, 4), 0.5)
    resumed.load_state_dict(torch.load(_saved(ema.state_dict()), weights_only=False))
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update_parameters(model)
    resumed.update_parameters(model)
    torch.testing.assert_close(resumed.module.weight, ema.module.weight, rtol=0, atol=0)


def test_ema_shares_the_models_config() -> None:
    model = CadMtlModel(tiny_cadmtl_config())
    ema = build_ema(model, 0.99)
    assert ema.module.config is model.config


# ---------------------------------------------------------------------------------------------------- best/
def test_save_best_is_atomic_and_loads(tmp_path: Path, monkeypatch) -> None:
    accelerator = Accelerator(cpu=True)
    model = CadMtlModel(tiny_cadmtl_config())
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64})
    save_best(
        accelerator, model, tmp_path, processor, {}, {"step": 4, "metric_for_best_model": "m", "value": 0.5}
    )
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    loaded = CadMtlModel.from_pretrained(tmp_path / "best")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert CadMtlImageProcessor.from_pretrained(tmp_path / "best").size == {"height": 64, "width": 64}

    # A save that dies half way leaves the previous best/ whole.
    def broken_save(self, folder, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(CadMtlModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_best(accelerator, model, tmp_path, processor, {}, {"step": 8})
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    monkeypatch.undo()

    other = CadMtlModel(tiny_cadmtl_config())
    info = load_best_weights(other, tmp_path)
    assert info["step"] == 4
    torch.testing.assert_close(other.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert load_best_weights(other, tmp_path / "nothing") is None


def test_checkpoint_with_other_objects_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_objects.json").write_text(
        json.dumps({"loop": "custom_checkpoint_0.pkl", "ema": "custom_checkpoint_1.pkl"})
    )
    check_same_objects(tmp_path, {"loop": "custom_checkpoint_0.pkl", "ema": "custom_checkpoint_1.pkl"})
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['ema'\]; only in this run: \[\]"):
        check_same_objects(tmp_path, {"loop": "custom_checkpoint_0.pkl"})


def test_arguments_of_best_tracking_are_checked() -> None:
    from cadmtl.training.arguments import parse_arguments

    train_args = parse_arguments(["--eval_every", "5", "--patience", "3", "--greater_is_better", "false"])[2]
    assert (train_args.patience, train_args.greater_is_better, train_args.metric_for_best_model) == (
        3,
        False,
        "mean_primary",
    )
    assert parse_arguments([])[2].greater_is_better is None  # decided by the metric's name
    with pytest.raises(ValueError, match="patience needs evaluations during training: set eval_every > 0"):
        parse_arguments(["--patience", "3"])
    with pytest.raises(ValueError, match="load_best_model_at_end needs evaluations during training"):
        parse_arguments(["--load_best_model_at_end"])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\) \(0: off\), got 1.0"):
        parse_arguments(["--ema_decay", "1"])
