"""Cost of one ``combine_gradients`` call of each gradient-level task weighting, at backbone sizes.

Random ``(K, P)`` gradients (float32 or bf16) stand in for the all-reduced per-task gradients of the shared
parameters: P = 22M is ViT-S/16, 86M ViT-B/16. Every method here costs two float64 passes over the matrix (the
``K x K`` Gram matrix, then one weighted sum of the rows) plus a tiny ``K x K`` solve, so the time is dominated by
memory traffic; the table also times those two passes alone ("gram+sum") and a plain ``grads.sum(0)`` (what
equal weighting's single backward effectively gives for free) for reference. Not included: the K backward passes
(``task_gradients``) and the all-reduce, which a gradient-level step adds on top.

    OMP_NUM_THREADS=2 python benchmarks/bench_weighting.py --tasks 3 --params 22M 86M --repeats 3
    python benchmarks/bench_weighting.py --device cuda --params 86M 300M --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadmtl.training.weighting import build_weighting
from cadmtl.training.weighting.gradients import combine_rows, gram_matrix

METHODS = ("pcgrad", "cagrad", "aligned_mtl")


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--params", nargs="+", default=["22M", "86M"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    names = [f"task{k}" for k in range(args.tasks)]
    print(f"device={device} threads={torch.get_num_threads()} K={args.tasks} dtype={args.dtype} (median ms)")
    header = ["P", "grads.sum(0)", "gram+sum", *METHODS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for text in args.params:
        p = parse_count(text)
        grads = torch.randn(args.tasks, p, device=device, dtype=getattr(torch, args.dtype))
        row = [text]
        row.append(timed(lambda g=grads: g.float().sum(0), args.repeats, device))
        coef = torch.ones(args.tasks, dtype=torch.float64)
        row.append(timed(lambda g=grads, c=coef: (gram_matrix(g), combine_rows(g, c)), args.repeats, device))
        for name in METHODS:
            method = build_weighting(name, names)
            row.append(timed(lambda g=grads, m=method: m.combine_gradients(g, {}), args.repeats, device))
        print("| " + " | ".join([row[0], *(f"{v:.0f}" for v in row[1:])]) + " |")
        del grads


if __name__ == "__main__":
    main()
