"""Per-task gradients of the shared parameters, and the small linear algebra the gradient-level methods share.

The training step of a gradient-level method (``needs_task_gradients``) does::

    grads = task_gradients(losses, shared)          # (K, P) float32, one autograd.grad per task
    grads = all_reduce_mean(grads)                  # one collective for all tasks
    write_gradient(shared, weighting.combine_gradients(grads, losses))

Every method here reduces to the ``K x K`` Gram matrix of the rows plus one weighted sum of the rows, so a
combination costs two passes over the ``(K, P)`` matrix whatever the method: :func:`gram_matrix` and
:func:`combine_rows` do both in float64 over column chunks (bf16/fp16/fp32 inputs, bounded extra memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# Columns per chunk when upcasting to float64: 2**22 columns x K rows x 8 bytes = 32 MiB per task row.
CHUNK_COLUMNS = 1 << 22


def task_gradients(
    losses: Sequence[torch.Tensor], shared: Sequence[torch.nn.Parameter], retain_graph_last: bool = False
) -> torch.Tensor:
    """The gradient of each loss with respect to the shared parameters, flattened: ``(K, P)`` float32.

    Row ``k`` is ``d losses[k] / d shared`` (parameters in the order given, each flattened row-major); a
    parameter a task does not use contributes zeros. The graph is kept between tasks and freed after the last
    one unless ``retain_graph_last`` (the heads' own backward still needs it). ``.grad`` is not touched.
    """
    params = list(shared)
    if not params:
        raise ValueError("task_gradients needs at least one shared parameter, got none")
    if not losses:
        raise ValueError("task_gradients needs at least one loss, got none")
    for k, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss {k} must be a scalar tensor, got {shape}")
    sizes = [p.numel() for p in params]
    out = torch.zeros(len(losses), sum(sizes), dtype=torch.float32, device=params[0].device)
    last = len(losses) - 1
    for k, loss in enumerate(losses):
        if not loss.requires_grad:  # no path to any parameter (e.g. an empty-target loss): a zero row
            continue
        grads = torch.autograd.grad(
            loss.reshape(()), params, retain_graph=k < last or retain_graph_last, allow_unused=True
        )
        for chunk, grad in zip(out[k].split(sizes), grads):
            if grad is not None:
                chunk.copy_(grad.reshape(-1))
    return out


def write_gradient(shared: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Add the flat vector ``flat`` (``P`` = total size of ``shared``) into the parameters' ``.grad``.

    Existing gradients are added to (the heads' or an earlier micro-batch's), missing ones are created; each
    piece is cast to its parameter's dtype and device.
    """
    params = list(shared)
    sizes = [p.numel() for p in params]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(
            f"flat gradient must be a vector of {sum(sizes)} values (the shared parameters' total size), "
            f"got shape {tuple(flat.shape)}"
        )
    for param, chunk in zip(params, flat.split(sizes)):
        piece = chunk.view_as(param).to(device=param.device, dtype=param.dtype)
        if param.grad is None:
            param.grad = piece.clone()
        else:
            param.grad.add_(piece)


def all_reduce_mean(gradients: torch.Tensor) -> torch.Tensor:
    """The ``(K, P)`` gradients averaged over the ranks: one all-reduce for all tasks, in place.

    Identity (no copy) when torch.distributed is not initialised. SUM then divide, so gloo works too.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return gradients
    dist.all_reduce(gradients, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    if world > 1:
        gradients.div_(world)
    return gradients


def check_gradients(gradients: torch.Tensor, task_names: Sequence[str], owner: str) -> None:
    """ValueError unless ``gradients`` is a floating ``(K, P)`` tensor with one row per task."""
    if not isinstance(gradients, torch.Tensor):
        raise ValueError(f"{owner}: gradients must be a torch.Tensor, got {type(gradients).__name__}")
    if gradients.dim() != 2:
        raise ValueError(
            f"{owner}: gradients must be (K, P) = ({len(task_names)}, num_shared_params), "
            f"got shape {tuple(gradients.shape)}"
        )
    if gradients.shape[0] != len(task_names):
        raise ValueError(
            f"{owner}: gradients have {gradients.shape[0]} rows but there are {len(task_names)} tasks "
            f"{list(task_names)} (one row per task, in task_names order)"
        )
    if not gradients.is_floating_point():
        raise ValueError(f"{owner}: gradients must be floating point, got {gradients.dtype}")


def gram_matrix(gradients: torch.Tensor, chunk_columns: int = CHUNK_COLUMNS) -> torch.Tensor:
    """``G G^T`` in float64 (``K x K``, on the CPU), accumulated over column chunks upcast to float64."""
    k = gradients.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=gradients.device)
    for start in range(0, gradients.shape[1], chunk_columns):
        block = gradients[:, start : start + chunk_columns].to(torch.float64)
        gram.addmm_(block, block.T)
    return gram.cpu()


def check_finite_gram(gram: torch.Tensor, task_names: Sequence[str], owner: str) -> None:
    """ValueError naming the tasks whose gradient holds inf/NaN.

    For float32 or narrower inputs the float64 squared norm is finite exactly when the row is (|x| < 3.4e38,
    so x**2 summed over < 1e200 entries cannot overflow float64), so the diagonal is the check, for free.
    """
    finite = torch.isfinite(gram.diagonal()).tolist()
    bad = [name for name, ok in zip(task_names, finite) if not ok]
    if bad:
        raise ValueError(f"{owner}: non-finite (inf/NaN) gradient for task(s) {bad}")


def combine_rows(
    gradients: torch.Tensor, coefficients: torch.Tensor, chunk_columns: int = CHUNK_COLUMNS
) -> torch.Tensor:
    """``sum_k coefficients[k] * gradients[k]`` as a float32 ``(P,)`` vector, accumulated in float64 chunks."""
    coef = coefficients.to(device=gradients.device, dtype=torch.float64).reshape(1, -1)
    out = torch.empty(gradients.shape[1], dtype=torch.float32, device=gradients.device)
    for start in range(0, gradients.shape[1], chunk_columns):
        block = gradients[:, start : start + chunk_columns].to(torch.float64)
        out[start : start + chunk_columns].copy_((coef @ block).reshape(-1))
    return out


def prepare_gram(gradients: torch.Tensor, task_names: Sequence[str], owner: str) -> torch.Tensor:
    """Shape and finiteness checks, then the float64 Gram matrix: the first step of every method here."""
    check_gradients(gradients, task_names, owner)
    gram = gram_matrix(gradients)
    check_finite_gram(gram, task_names, owner)
    return gram
