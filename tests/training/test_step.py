"""The training step in-process: what it updates, what it skips, accumulation, loss scaling, gradient methods."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from cadmtl.data.sources import TaskSource
from cadmtl.testing import detection_target, tiny_cadmtl_config
from cadmtl.training.balancer import TaskBalancer
from cadmtl.training.checkpoint import LoopState
from cadmtl.training.launch import reset_accelerate_state
from cadmtl.training.step import (
    NonFiniteStop,
    StepSettings,
    count_nonfinite,
    shared_and_head_parameters,
    training_step,
)
from cadmtl.training.weighting import EqualWeighting, TaskWeighting, build_weighting
from modeling_cadmtl import CadMtlModel

SIZE = 64


def make_batch(task: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    if task == "cls":
        labels = torch.tensor([0, 2])
    elif task == "det":
        labels = [
            detection_target([[0.5, 0.5, 0.4, 0.3]], [1]),
            detection_target([[0.3, 0.6, 0.2, 0.2]], [0]),
        ]
    else:
        labels = torch.randint(0, 3, (2, SIZE, SIZE), generator=generator)
    return {"pixel_values": pixel_values, "labels": labels}


class Batches:
    """A next_batch provider that counts calls and gives each task a fixed sequence of batches."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, task: str) -> tuple[TaskSource, dict]:
        number = self.calls.get(task, 0)
        self.calls[task] = number + 1
        return TaskSource(task, f"x_{task}", []), make_batch(task, seed=100 * len(task) + number)


@pytest.fixture
def setup(fresh_accelerate_state):
    def build(optimizer: str = "sgd", accumulation_steps: int = 1):
        torch.manual_seed(0)
        model = CadMtlModel(tiny_cadmtl_config()).train()
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        accelerator = Accelerator(
            cpu=True, mixed_precision="no", gradient_accumulation_steps=accumulation_steps
        )
        model, opt = accelerator.prepare(model, opt)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return accelerator, model, opt, scheduler

    return build


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str) -> bool:
    return any(
        not torch.equal(before[name], p) for name, p in module.named_parameters() if name.startswith(prefix)
    )


def test_a_step_updates_the_backbone_and_the_used_head_only(setup) -> None:
    accelerator, model, optimizer, scheduler = setup()
    before = snapshot(model)
    batches = Batches()
    outcome = training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        batches,
        ["det"],
        TaskBalancer(EqualWeighting(["cls", "det", "seg"])),
        StepSettings(),
    )
    assert outcome.stepped and outcome.images == 2
    assert list(outcome.task_losses) == ["det"] and outcome.task_losses["det"][0] > 0
    assert changed(before, model, "backbone.") and changed(before, model, "det_head.")
    assert not changed(before, model, "cls_head.") and not changed(before, model, "seg_decoder.")
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    assert batches.calls == {"det": 1}


def test_a_nan_loss_skips_the_step_and_leaves_no_gradient(setup, monkeypatch) -> None:
    accelerator, model, optimizer, scheduler = setup()
    original = CadMtlModel.forward

    def nan_forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(CadMtlModel, "forward", nan_forward)
    before = snapshot(model)
    outcome = training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        Batches(),
        ["cls"],
        TaskBalancer(EqualWeighting(["cls"])),
        StepSettings(),
    )
    assert not outcome.stepped
    assert not changed(before, model, "")
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_do_not_move(setup) -> None:
    accelerator, model, optimizer, scheduler = setup()
    frozen = list(model.backbone.embeddings.parameters())
    before = snapshot(model)
    training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        Batches(),
        ["cls"],
        TaskBalancer(EqualWeighting(["cls"])),
        StepSettings(),
        frozen=frozen,
    )
    assert not changed(before, model, "backbone.embeddings.")
    assert changed(before, model, "backbone.model.layer.") and changed(before, model, "cls_head.")


def test_accumulation_draws_one_batch_per_micro_step_and_steps_once(setup) -> None:
    accelerator, model, optimizer, scheduler = setup(accumulation_steps=3)
    batches = Batches()
    outcome = training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        batches,
        ["cls", "seg"],
        TaskBalancer(EqualWeighting(["cls", "seg"])),
        StepSettings(accumulation_steps=3),
    )
    assert outcome.stepped and batches.calls == {"cls": 3, "seg": 3} and outcome.images == 12
    assert len(outcome.task_losses["cls"]) == 3
    assert scheduler.last_epoch == 1  # the scheduler stepped once


class FixedWeights(TaskWeighting):
    name = "fixed-for-test"

    def __init__(self, task_names, weights) -> None:
        super().__init__(task_names)
        self._weights = weights

    @property
    def weights(self) -> dict[str, float]:
        return self._weights


def test_scaled_losses_weigh_each_task_by_k_times_w(setup) -> None:
    accelerator, model, optimizer, scheduler = setup()
    before = snapshot(model)
    weighting = FixedWeights(["cls", "seg"], {"cls": 0.0, "seg": 1.0})
    training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        Batches(),
        ["cls", "seg"],
        TaskBalancer(weighting, scale_losses=True),
        StepSettings(),
    )
    assert not changed(before, model, "cls_head.")  # weight 0: no gradient reaches the classifier (plain SGD)
    assert changed(before, model, "seg_decoder.")


class SumOfRows(TaskWeighting):
    """A gradient-level method that returns the plain sum: must equal the loss-level sum of the losses."""

    name = "sum-of-rows-for-test"
    needs_task_gradients = True

    def combine_gradients(self, gradients, losses):
        self.seen = gradients.shape
        return gradients.sum(0)


def test_gradient_level_path_equals_the_loss_level_sum(setup, fresh_accelerate_state) -> None:
    tasks = ["cls", "det", "seg"]
    results = []
    for weighting in (EqualWeighting(tasks), SumOfRows(tasks)):
        accelerator, model, optimizer, scheduler = setup(accumulation_steps=2)
        outcome = training_step(
            accelerator,
            model,
            optimizer,
            scheduler,
            Batches(),
            tasks,
            TaskBalancer(weighting, scale_losses=True),
            StepSettings(max_grad_norm=1e9, accumulation_steps=2),
        )
        assert outcome.stepped
        results.append(snapshot(model))
        reset_accelerate_state()
    shared, _ = shared_and_head_parameters(CadMtlModel(tiny_cadmtl_config()))
    assert weighting.seen == (3, sum(p.numel() for p in shared))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_pcgrad_runs_in_the_step_and_fp16_is_refused(setup, monkeypatch) -> None:
    accelerator, model, optimizer, scheduler = setup()
    before = snapshot(model)
    pcgrad = build_weighting("pcgrad", ["cls", "seg"])
    outcome = training_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        Batches(),
        ["cls", "seg"],
        TaskBalancer(pcgrad),
        StepSettings(),
    )
    assert outcome.stepped and changed(before, model, "backbone.")
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))  # fp16 needs a GPU
    with pytest.raises(ValueError, match="pcgrad combines raw per-task gradients: use bf16"):
        training_step(
            accelerator,
            model,
            optimizer,
            scheduler,
            Batches(),
            ["cls", "seg"],
            TaskBalancer(pcgrad),
            StepSettings(),
        )


def test_nonfinite_counter_stops_after_the_limit() -> None:
    state = LoopState()
    assert count_nonfinite(state, False, 3, ["cls"], limit=2, checkpoints="out/checkpoints")
    assert state.nonfinite_steps == 1 and state.consecutive_nonfinite == 1
    assert not count_nonfinite(state, True, 4, ["cls"], limit=2, checkpoints="out/checkpoints")
    assert state.consecutive_nonfinite == 0
    count_nonfinite(state, False, 5, ["det"], limit=2, checkpoints="out/checkpoints")
    with pytest.raises(NonFiniteStop, match=r"2 optimizer steps in a row .* step 6, tasks \['seg'\]"):
        count_nonfinite(state, False, 6, ["seg"], limit=2, checkpoints="out/checkpoints")
    assert state.nonfinite_steps == 3
