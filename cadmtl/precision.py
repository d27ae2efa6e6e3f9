"""Which mixed precision a run computes in.

`auto` (the default of `train_accelerate.py`, `cadmtl anomaly train` and `cadmtl evaluate`) means bf16 where the
hardware computes it natively, else float32. On a CPU without bf16 instructions, autocast still runs but every
bf16 matmul and convolution is emulated: on a 2-core AMD EPYC without AMX / AVX512-BF16 the README's main job took
4-6 s per step in bf16 against 0.45 s in float32, and the anomaly learner 60-90 s against 1.5-2.8 s
(BENCHMARKS.md, "Mixed precision on CPUs without bf16"). An explicit `bf16` is kept, with a warning there.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")

# torch's CPU feature probes (private, present since torch 2.1; a missing one counts as "no such instructions").
_CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def native_bf16(device_type: str | None = None) -> bool:
    """True where bf16 matmuls / convolutions run in hardware on `device_type` ("cuda" / "cpu"; None: CUDA when
    there is a GPU, else the CPU): a CUDA GPU that supports bf16, or a CPU with AMX or AVX512-BF16 instructions."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False  # e.g. MPS: no claim made, float32 is the safe choice
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in _CPU_BF16_PROBES)


def resolve_mixed_precision(requested: str, device_type: str | None = None) -> str:
    """`requested` ("auto", "bf16", "fp16" or "no") as Accelerate takes it: "auto" becomes "bf16" where
    `native_bf16(device_type)`, else "no"; the others are returned as given (bf16 on hardware that emulates it is
    logged as a warning, since it is many times slower than float32 there)."""
    if requested not in MIXED_PRECISIONS:
        raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}; got {requested!r}")
    if requested == "auto":
        return "bf16" if native_bf16(device_type) else "no"
    if requested == "bf16" and not native_bf16(device_type):
        logger.warning(
            "bf16 was requested but this %s has no bf16 instructions: it is emulated, several times slower than "
            "float32 (--mixed-precision auto picks float32 here)",
            device_type or ("GPU" if torch.cuda.is_available() else "CPU"),
        )
    return requested


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved mixed precision ("bf16" / "fp16" / "no"); None: float32, no autocast."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mixed_precision]
