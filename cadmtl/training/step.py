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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from cadmtl.data.sources import TaskSource, move_to
from cadmtl.tasks import TASKS, get_cadmtl_task
from cadmtl.training.optim import drop_gradients, head_parameters, unused_parameters, zero_touch
from cadmtl.training.weighting import all_reduce_mean, task_gradients, write_gradient
from modeling_cadmtl import CadMtlModel

if TYPE_CHECKING:
    from cadmtl.training.balancer import TaskBalancer

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
    conditioned = get_cadmtl_task(task).class_candidates and source.config in candidates
    extra = {"cls_candidates": candidates[source.config]} if conditioned else {}
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
    """What the step does besides forward / backward (how tasks are weighted is the balancer's business).

    Attributes:
        accumulation_steps: micro-batches per optimizer step (Accelerate's gradient accumulation).
        max_grad_norm: clip the global gradient norm to this.
        zero_touch: add ``0 * sum(unused head parameters)`` so DDP without ``find_unused_parameters`` works.
    """

    accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    zero_touch: bool = False


@dataclass
class StepOutcome:
    """What happened: whether the optimizer stepped, each task's detached losses, images seen on this rank."""

    stepped: bool
    task_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    images: int = 0


def shared_and_head_parameters(
    model: CadMtlModel,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(parameters several tasks use: backbone and neck; the task heads' own parameters)."""
    heads = head_parameters(model)
    own = {id(p) for task in TASKS for p in heads[task]}
    shared = [p for p in model.parameters() if id(p) not in own and p.requires_grad]
    return shared, [p for task in TASKS for p in heads[task] if p.requires_grad]


def training_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    next_batch: BatchProvider,
    step_tasks: Sequence[str],
    balancer: TaskBalancer,
    settings: StepSettings,
    *,
    frozen: Sequence[torch.nn.Parameter] = (),
    candidates: Mapping[str, torch.Tensor] | None = None,
) -> StepOutcome:
    """Accumulate the losses of ``step_tasks`` over ``settings.accumulation_steps`` micro-batches, then take one
    optimizer step unless a loss or the gradient norm is not finite on any rank.

    With a loss-level weighting, ``balancer.scale_loss`` weighs each task's loss (``K * w`` when the recipe scales
    losses) and one backward of the sum fills the gradients. A gradient-level weighting
    (``balancer.needs_task_gradients``) gets one gradient of the shared parameters (backbone, neck) per task,
    averaged over micro-batches and ranks (one all-reduce), and ``balancer.combine_gradients`` of them becomes
    their gradient; each head keeps its own task's gradient. ``frozen`` are parameters whose gradients are
    dropped this step (early backbone blocks during warm-up); the gradients of heads no task of the step used are
    always dropped. Gradients are zeroed at the end either way, so a skipped step leaves no trace.
    """
    unwrapped: CadMtlModel = accelerator.unwrap_model(model)
    candidates = candidates or {}
    outcome = StepOutcome(stepped=False)
    nonfinite = torch.zeros((), device=accelerator.device)
    per_task = balancer.needs_task_gradients
    if per_task and accelerator.mixed_precision == "fp16":
        raise ValueError(
            f"{balancer.name} combines raw per-task gradients: use bf16 or no mixed precision, not fp16"
        )
    shared, heads = shared_and_head_parameters(unwrapped) if per_task else ([], [])
    task_grads: torch.Tensor | None = None
    for _ in range(settings.accumulation_steps):
        # Per-task gradients are reduced by hand (one collective for all tasks): DDP must not sync by itself.
        context = accelerator.no_sync(model) if per_task else accelerator.accumulate(model)
        with context:
            losses = []
            for task in step_tasks:
                source, batch = next_batch(task)
                outcome.images += len(batch["pixel_values"])
                task_loss = task_forward(model, task, source, batch, accelerator.device, candidates).loss
                outcome.task_losses.setdefault(task, []).append(task_loss.detach().float())
                losses.append(balancer.scale_loss(task, task_loss))
            loss = torch.stack(losses).sum()
            if settings.zero_touch and not per_task:
                loss = loss + zero_touch(unwrapped, set(step_tasks))
            nonfinite += (~torch.isfinite(loss)).float()
            if per_task:
                grads = task_gradients(losses, shared, retain_graph_last=True) / settings.accumulation_steps
                task_grads = grads if task_grads is None else task_grads + grads
                torch.autograd.backward(loss / settings.accumulation_steps, inputs=heads)
            else:
                accelerator.backward(loss)
    if per_task and task_grads is not None:
        task_grads = all_reduce_mean(task_grads)
        _all_reduce_mean_grads(heads)
        if bool(torch.isfinite(task_grads).all()):
            latest = {task: values[-1].item() for task, values in outcome.task_losses.items()}
            write_gradient(shared, balancer.combine_gradients(task_grads, latest))
        else:
            nonfinite += 1
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


def _all_reduce_mean_grads(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks in one collective (no-op on one process)."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in with_grad])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, chunk in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(chunk.view_as(p.grad))


def reduced_task_losses(accelerator: Accelerator, outcome: StepOutcome) -> dict[str, float]:
    """Each task's mean training loss of the step, averaged over ranks (what FAMO observes)."""
    tasks = list(outcome.task_losses)
    means = torch.stack([torch.stack(outcome.task_losses[task]).mean() for task in tasks])
    reduced = accelerator.reduce(means.to(accelerator.device), reduction="mean")
    return {task: float(value) for task, value in zip(tasks, reduced.tolist())}


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
