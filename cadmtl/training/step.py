"""One optimizer step of multi-task training, and the forward passes it is built from.

:func:`training_step` is the body of the loop: for each micro-batch of gradient accumulation, every task of the
step runs on its next batch and the (weighted) losses are back-propagated; then, unless any rank saw a NaN or
infinite loss (all ranks skip together so the replicas stay identical), the gradients of heads the step did not
use and of frozen early layers are dropped, the gradient norm is clipped and the optimizer and learning-rate
scheduler step. It has no other side effects, so it is unit-tested in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from cadmtl.data.sources import TaskSource, move_to
from cadmtl.training.optim import drop_gradients, unused_parameters, zero_touch
from modeling_cadmtl import CadMtlModel

BatchProvider = Callable[[str], tuple[TaskSource, dict[str, Any]]]


def task_forward(
    model: torch.nn.Module,
    task: str,
    source: TaskSource,
    batch: dict[str, Any],
    device: torch.device,
    candidates: Mapping[str, torch.Tensor],
) -> Any:
    """The model on one task's batch (with its config's class candidates for classification, if any)."""
    pixel_values, labels = move_to(batch, device)
    extra = (
        {"cls_candidates": candidates[source.config]} if task == "cls" and source.config in candidates else {}
    )
    return model(pixel_values, task=task, labels=labels, **extra)


@torch.no_grad()
def held_out_losses(
    model: torch.nn.Module,
    held_out: Mapping[str, list[tuple[TaskSource, dict[str, Any]]]],
    accelerator: Accelerator,
    candidates: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Each task's mean loss on its fixed held-out batches, averaged over ranks (CoBa's validation losses)."""
    model.eval()
    totals = []
    for task, task_batches in held_out.items():
        total = torch.zeros(2, device=accelerator.device)
        for source, batch in task_batches:
            with accelerator.autocast():
                outputs = task_forward(model, task, source, batch, accelerator.device, candidates)
            total[0] += outputs.loss.float()
            total[1] += 1
        totals.append(total)
    model.train()
    reduced = accelerator.reduce(torch.stack(totals), reduction="sum")
    return {task: (reduced[i, 0] / reduced[i, 1]).item() for i, task in enumerate(held_out)}


@dataclass(frozen=True)
class StepSettings:
    """What the step does besides forward / backward.

    Attributes:
        accumulation_steps: micro-batches per optimizer step (Accelerate's gradient accumulation).
        max_grad_norm: clip the global gradient norm to this.
        scale_losses: multiply each task's loss by ``K * w_task`` (every-task steps, or re-weighted sampling).
        num_tasks: K, the number of tasks of the run (not of the step).
        zero_touch: add ``0 * sum(unused head parameters)`` so DDP without ``find_unused_parameters`` works.
    """

    accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    scale_losses: bool = False
    num_tasks: int = 1
    zero_touch: bool = False


@dataclass
class StepOutcome:
    """What happened: whether the optimizer stepped, each task's detached losses, images seen on this rank."""

    stepped: bool
    task_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    images: int = 0


def training_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    next_batch: BatchProvider,
    step_tasks: Sequence[str],
    weights: Mapping[str, float],
    settings: StepSettings,
    *,
    frozen: Sequence[torch.nn.Parameter] = (),
    candidates: Mapping[str, torch.Tensor] | None = None,
) -> StepOutcome:
    """Accumulate the losses of ``step_tasks`` over ``settings.accumulation_steps`` micro-batches, then take one
    optimizer step unless a loss or the gradient norm is not finite on any rank.

    ``frozen`` are parameters whose gradients are dropped this step (early backbone blocks during warm-up);
    the gradients of heads no task of the step used are always dropped. Gradients are zeroed at the end either
    way, so a skipped step leaves no trace.
    """
    unwrapped: CadMtlModel = accelerator.unwrap_model(model)
    candidates = candidates or {}
    outcome = StepOutcome(stepped=False)
    nonfinite = torch.zeros((), device=accelerator.device)
    for _ in range(settings.accumulation_steps):
        with accelerator.accumulate(model):
            loss = torch.zeros((), device=accelerator.device)
            for task in step_tasks:
                source, batch = next_batch(task)
                outcome.images += len(batch["pixel_values"])
                task_loss = task_forward(model, task, source, batch, accelerator.device, candidates).loss
                outcome.task_losses.setdefault(task, []).append(task_loss.detach().float())
                if settings.scale_losses:
                    task_loss = task_loss * settings.num_tasks * weights[task]
                loss = loss + task_loss
            if settings.zero_touch:
                loss = loss + zero_touch(unwrapped, set(step_tasks))
            nonfinite += (~torch.isfinite(loss)).float()
            accelerator.backward(loss)
    # Every rank skips together when any rank saw a NaN / inf, so the replicas stay identical.
    if accelerator.reduce(nonfinite, reduction="sum").item() == 0:
        drop_gradients(unused_parameters(unwrapped, set(step_tasks)))
        drop_gradients(list(frozen))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        if torch.isfinite(grad_norm):  # the norm of all-reduced gradients: the same on every rank
            optimizer.step()
            lr_scheduler.step()
            outcome.stepped = True
    optimizer.zero_grad(set_to_none=True)
    return outcome


class NonFiniteStop(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""


def count_nonfinite(
    state: Any, stepped: bool, step: int, step_tasks: Sequence[str], limit: int, checkpoints: Any
) -> bool:
    """Update the loop counters after a step; True if the step was skipped. Raises :class:`NonFiniteStop` after
    ``limit`` skipped steps in a row."""
    if stepped:
        state.consecutive_nonfinite = 0
        return False
    state.nonfinite_steps += 1
    state.consecutive_nonfinite += 1
    if state.consecutive_nonfinite >= limit:
        raise NonFiniteStop(
            f"Stopping: {state.consecutive_nonfinite} optimizer steps in a row had a NaN or infinite loss or "
            f"gradient (last at step {step}, tasks {list(step_tasks)}). Lower the learning rate, check the data, "
            f"or resume from the last checkpoint in {checkpoints}."
        )
    return True
