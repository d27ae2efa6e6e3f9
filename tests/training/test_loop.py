"""The training loop in the package: the task balancer's fixed points, `--weighting`'s registered choices, and
`cadmtl train` giving the same run as `accelerate launch train_accelerate.py`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadmtl.training.arguments import parse_arguments
from cadmtl.training.balancer import TaskBalancer
from cadmtl.training.step import StepOutcome
from cadmtl.training.weighting import WEIGHTINGS, EqualWeighting, TaskWeighting, build_weighting

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ["cls", "det", "seg"]


# ------------------------------------------------------------------------------------------ --weighting choices
def test_weighting_help_lists_every_registered_method(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert {"equal", "coba", "pcgrad", "cagrad", "aligned_mtl", "famo"} <= set(WEIGHTINGS)
    assert "--weighting {" + ",".join(sorted(WEIGHTINGS)) + "}" in text
    assert "Task-weighting method, one of " + ", ".join(sorted(WEIGHTINGS)) + ";" in text
    assert "The gradient-level ones (aligned_mtl, cagrad, pcgrad) need --all_tasks_per_step" in text


def test_an_unregistered_weighting_is_refused_with_the_list(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--weighting", "gradnorm"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --weighting: invalid choice: 'gradnorm' (choose from " in error
    assert all(f"{name}" in error.split("choose from ")[1] for name in WEIGHTINGS)
    # A YAML config skips argparse's choices: the same list comes from the argument check.
    config = tmp_path / "run.yaml"
    config.write_text("weighting: gradnorm\n")
    with pytest.raises(
        ValueError,
        match=r"^weighting must be one of \('aligned_mtl', 'cagrad', 'coba', 'equal', 'famo', 'pcgrad'\), "
        r"got 'gradnorm'\.$",
    ):
        parse_arguments(["--config", str(config)])
    assert parse_arguments(["--weighting", "famo"])[2].weighting == "famo"


# ---------------------------------------------------------------------------------------- the task balancer
class HeldOutRecorder(EqualWeighting):
    """Learns from held-out losses (like CoBa): records each update and puts the weight on the lowest loss."""

    name = "held-out-recorder"
    needs_held_out_losses = True

    def __init__(self, task_names) -> None:
        super().__init__(task_names)
        self.updates: list[tuple[int, dict[str, float]]] = []
        self._weights = dict.fromkeys(self.task_names, 1 / len(self.task_names))

    @property
    def weights(self) -> dict[str, float]:
        return self._weights

    def update(self, step: int, held_out_losses: Mapping[str, float] | None = None) -> dict[str, float]:
        self.updates.append((step, dict(held_out_losses or {})))
        lowest = min(held_out_losses, key=held_out_losses.get)
        self._weights = {task: 0.8 if task == lowest else 0.1 for task in self.task_names}
        return self._weights


class TrainLossRecorder(EqualWeighting):
    """Learns from training losses (like FAMO)."""

    name = "train-loss-recorder"
    needs_train_losses = True

    def __init__(self, task_names) -> None:
        super().__init__(task_names)
        self.observed: list[tuple[int, dict[str, float]]] = []

    def observe_train_losses(self, step: int, losses: Mapping[str, float]) -> None:
        self.observed.append((step, dict(losses)))


def test_held_out_updates_come_every_update_every_steps_and_steer_the_scheduler(monkeypatch) -> None:
    losses = {"cls": 2.0, "det": 0.5, "seg": 1.0}
    calls = []

    def fake_held_out_losses(model, held_out, accelerator, candidates):
        calls.append(sorted(held_out))
        return losses

    monkeypatch.setattr("cadmtl.training.balancer.held_out_losses", fake_held_out_losses)
    weighting = HeldOutRecorder(TASKS)
    balancer = TaskBalancer(weighting, sampler="adaptive", temperature=0.05, seed=3, update_every=4)
    assert balancer.before_step(0, None, None, {}) == 0.0  # no held-out batches loaded: nothing to update
    balancer.held_out = {task: [] for task in TASKS}
    for step in range(9):
        balancer.before_step(step, None, None, {})
    assert [step for step, _ in weighting.updates] == [0, 4, 8] and calls == [TASKS] * 3
    assert weighting.updates[0][1] == losses
    assert balancer.scheduler.weights == {"cls": 0.1, "det": 0.8, "seg": 0.1}
    assert balancer.probabilities["det"] > 0.99  # softmax(w / 0.05)
    assert [balancer.tasks_for(step) for step in range(20)].count(["det"]) >= 18


def test_methods_without_held_out_losses_load_no_held_out_batches() -> None:
    balancer = TaskBalancer(EqualWeighting(TASKS))
    balancer.load_held_out({}, None, num_batches=1, batch_size=1)  # would fail if it read any data
    assert balancer.held_out == {}


def test_the_sampler_picks_the_step_tasks() -> None:
    every = TaskBalancer(EqualWeighting(TASKS))
    assert every.tasks_for(5) == TASKS and every.scheduler.mode == "round_robin"
    round_robin = TaskBalancer(EqualWeighting(TASKS), sampler="round_robin")
    assert [round_robin.tasks_for(step) for step in range(4)] == [["cls"], ["det"], ["seg"], ["cls"]]
    single = TaskBalancer(EqualWeighting(["seg"]), sampler="single")
    assert single.tasks_for(7) == ["seg"]


class FixedWeights(TaskWeighting):
    name = "fixed-for-test"

    @property
    def weights(self) -> dict[str, float]:
        return {"cls": 0.5, "det": 0.25, "seg": 0.25}


def test_scaled_losses_are_k_times_w_times_the_loss_and_gradient_methods_get_raw_losses() -> None:
    loss = torch.tensor(2.0)
    assert TaskBalancer(FixedWeights(TASKS)).scale_loss("cls", loss) is loss  # the recipe does not scale
    scaled = TaskBalancer(FixedWeights(TASKS), scale_losses=True)
    assert scaled.scale_loss("cls", loss).item() == 3 * 0.5 * 2.0
    assert scaled.scale_loss("det", loss).item() == 3 * 0.25 * 2.0
    pcgrad = TaskBalancer(build_weighting("pcgrad", TASKS), scale_losses=True)
    assert pcgrad.needs_task_gradients and pcgrad.scale_loss("cls", loss) is loss


def test_training_losses_are_observed_after_stepped_steps_only() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    weighting = TrainLossRecorder(["cls", "det"])
    balancer = TaskBalancer(weighting)
    outcome = StepOutcome(
        stepped=True,
        task_losses={"cls": [torch.tensor(1.0), torch.tensor(3.0)], "det": [torch.tensor(0.5)]},
    )
    balancer.after_step(6, outcome, accelerator)
    balancer.after_step(7, StepOutcome(stepped=False, task_losses=outcome.task_losses), accelerator)
    assert weighting.observed == [(6, {"cls": 2.0, "det": 0.5})]  # the mean of the micro-batches


def test_checkpoints_keep_the_names_of_the_weighting_and_scheduler_state() -> None:
    balancer = TaskBalancer(build_weighting("coba", TASKS), sampler="adaptive")
    objects = balancer.checkpoint_objects()
    assert list(objects) == ["weighting", "task_scheduler"]  # the order and names older checkpoints hold
    assert objects["weighting"] is balancer.weighting and objects["task_scheduler"] is balancer.scheduler
    assert balancer.summary() == {"name": "coba", "weights": dict.fromkeys(TASKS, 1 / 3)}


# ------------------------------------------------------------------------------- cadmtl train == the script
FAST = [
    "--cls_image_size", "64", "--det_image_size", "64", "--seg_image_size", "64",
    "--batch_size", "4", "--cls_batch_size", "4", "--eval_batch_size", "8", "--coba_val_batch_size", "4",
    "--coba_every", "2", "--coba_warmup_steps", "3", "--coba_history_length", "4",
    "--warmup_steps", "2", "--freeze_steps", "2", "--logging_steps", "2", "--shuffle_buffer", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    from dataset_scripts.make_demo import build_demo_dataset

    folder = tmp_path_factory.mktemp("data") / "cad100k-mini"
    build_demo_dataset(folder, train=16, validation=8, test=8)
    return folder


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_cadmtl_train_and_accelerate_launch_train_accelerate_py_give_the_same_run(
    small_demo: Path, tmp_path: Path
) -> None:
    """The adaptive paradigm (CoBa updates, sampled tasks), evaluations every 2 steps: same losses, same weights."""
    args = [
        "--dataset", str(small_demo), "--max_steps", "4", "--eval_every", "2", "--max_eval_batches", "1",
        "--test_split", "None", "--mixed_precision", "no", *FAST,
    ]  # fmt: skip
    launch = [
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    commands = {
        "script": [accelerate, "launch", *launch, str(REPO_ROOT / "train_accelerate.py"), *args],
        "command": [sys.executable, "-m", "cadmtl", "train", "--launch-args", " ".join(launch), *args],
    }
    for name, command in commands.items():
        completed = subprocess.run(
            [*command, "--output_dir", str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        assert completed.returncode == 0, f"{name}:\n{completed.stderr[-4000:]}"
    script, command = tmp_path / "script", tmp_path / "command"
    rows = read_rows(script / "results.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    assert {"train/cls_loss", "train/det_loss", "train/seg_loss", "fitness"} <= set(rows[0])
    assert read_rows(command / "results.csv") == rows
    tasks = (script / "logs" / "tasks_rank0.txt").read_text()
    assert (command / "logs" / "tasks_rank0.txt").read_text() == tasks and len(set(tasks.split()[1::2])) >= 2
    expected, actual = (
        load_file(script / "model" / "model.safetensors"),
        load_file(command / "model" / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
