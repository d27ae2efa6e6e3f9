"""Per-task gradients of the shared parameters, and the small linear algebra the gradient-level methods share.

The training step of a gradient-level method (``needs_task_gradients``) does::

    grads = task_gradients(losses, shared)          # (K, P) float32, one autograd.grad per task
    grads = all_reduce_mean(grads)                  # one collective for all tasks
    write_gradient(shared, weighting.combine_gradients(grads, losses))

Every method here reduces to the ``K x K`` Gram matrix of the rows plus one weighted sum of the rows, so a
combination costs two passes over the ``(K, P)`` matrix whatever the method: :func:`gram_matrix` and
:func:`combine_rows` do both over column chunks (float32 arithmetic, float64 accumulation of the Gram blocks;
bf16/fp16 inputs upcast chunk by chunk, so the extra memory is bounded).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# Columns per float32 block of the Gram matrix (the block products are summed in float64), and per chunk of
# the passes (bf16/fp16 inputs are upcast one chunk at a time into a reused float32 buffer: 48 MiB for K=3).
GRAM_BLOCK_COLUMNS = 1 << 16
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


def _compute_dtype(gradients: torch.Tensor) -> torch.dtype:
    return torch.float64 if gradients.dtype == torch.float64 else torch.float32


def _blocks(gradients: torch.Tensor, chunk_columns: int):
    """``(start, block)`` over column chunks of ``gradients`` in the compute dtype: views when it already is,
    else copies into one reused buffer (bf16/fp16 are upcast chunk by chunk, never as a whole)."""
    dtype = _compute_dtype(gradients)
    buffer = None
    if gradients.dtype != dtype:
        width = min(chunk_columns, gradients.shape[1])
        buffer = torch.empty(gradients.shape[0], width, dtype=dtype, device=gradients.device)
    for start in range(0, gradients.shape[1], chunk_columns):
        block = gradients[:, start : start + chunk_columns]
        if buffer is not None:
            block = buffer[:, : block.shape[1]].copy_(block)
        yield start, block


def gram_matrix(gradients: torch.Tensor, block_columns: int | None = None) -> torch.Tensor:
    """``G G^T`` as a float64 ``K x K`` CPU tensor.

    Each block of ``block_columns`` columns is multiplied in float32 (BLAS speed, the input's precision) and the
    block products are summed in float64: one float32 matmul over 22M columns loses ~2e-3 relative accuracy,
    2**16-column blocks ~3e-7 (measured). The blocks of a chunk go through one ``bmm`` (one parallel region per
    chunk, not per block: thousands of small matmuls stall on busy CPUs).
    """
    block = GRAM_BLOCK_COLUMNS if block_columns is None else block_columns
    k = gradients.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=gradients.device)
    for _, chunk in _blocks(gradients, max(CHUNK_COLUMNS // block, 1) * block):
        n_blocks = chunk.shape[1] // block
        if n_blocks:
            stacked = chunk[:, : n_blocks * block].reshape(k, n_blocks, block).transpose(0, 1)
            gram += torch.bmm(stacked, stacked.transpose(1, 2)).sum(0, dtype=torch.float64)
        rest = chunk[:, n_blocks * block :]
        if rest.shape[1]:
            gram += (rest @ rest.T).to(torch.float64)
    return gram.cpu()


def check_finite_gram(gram: torch.Tensor, task_names: Sequence[str], owner: str) -> None:
    """ValueError naming the tasks whose gradient holds inf/NaN.

    A row with inf/NaN has an inf/NaN squared norm, so the Gram diagonal is the check, for free. (It also
    rejects a row whose float32 block sum of squares overflows, |g| > ~1e19 per entry: unusable anyway.)
    """
    finite = torch.isfinite(gram.diagonal()).tolist()
    bad = [name for name, ok in zip(task_names, finite) if not ok]
    if bad:
        raise ValueError(f"{owner}: non-finite (inf/NaN) gradient for task(s) {bad}")


def combine_rows(
    gradients: torch.Tensor, coefficients: torch.Tensor, chunk_columns: int | None = None
) -> torch.Tensor:
    """``sum_k coefficients[k] * gradients[k]`` as a float32 ``(P,)`` vector (a K-term sum per entry, so float32
    arithmetic loses nothing that matters; float64 input is combined in float64, then rounded)."""
    chunk = CHUNK_COLUMNS if chunk_columns is None else chunk_columns
    dtype = _compute_dtype(gradients)
    coef = coefficients.to(device=gradients.device, dtype=dtype).reshape(-1)
    out = torch.empty(gradients.shape[1], dtype=dtype, device=gradients.device)
    for start, block in _blocks(gradients, chunk):
        torch.mv(block.T, coef, out=out[start : start + block.shape[1]])
    return out.to(torch.float32)


def prepare_gram(gradients: torch.Tensor, task_names: Sequence[str], owner: str) -> torch.Tensor:
    """Shape and finiteness checks, then the float64 Gram matrix: the first step of every method here."""
    check_gradients(gradients, task_names, owner)
    gram = gram_matrix(gradients)
    check_finite_gram(gram, task_names, owner)
    return gram
