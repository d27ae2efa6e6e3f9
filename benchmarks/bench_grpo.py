"""Seconds per GRPO step of the vision-language localisation path (``cadmtl.reference.grpo.train_grpo``).

One step = generate ``num_generations`` completions for one pair (reference + query image), score them with the
format + DCLR rewards, one policy update. Synthetic 4-pair data (64 x 48 reference, 80 x 60 query); the first step
(warm-up) is reported apart from the median of the others. ``--model tiny-random`` (default) is the ~115k
parameter Qwen2.5-VL built in memory, so the numbers are the overhead of TRL's loop, not a 7B model's cost.

    OMP_NUM_THREADS=2 python benchmarks/bench_grpo.py --generations 2 4 --lengths 8 32 --lora both
    python benchmarks/bench_grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --generations 8 --lengths 256 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadmtl.reference import grpo
from cadmtl.testing import TINY_RANDOM


def synthetic_pairs(count: int = 4):
    import datasets

    rng = np.random.default_rng(0)
    rows = {"pair_id": [], "reference": [], "query": [], "box": []}
    for i in range(count):
        rows["pair_id"].append(f"pair-{i}")
        rows["reference"].append(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        rows["query"].append(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
        rows["box"].append([10.0, 12.0, 40.0, 30.0] if i % 2 == 0 else [0.0] * 4)
    features = datasets.Features(
        {
            "pair_id": datasets.Value("string"),
            "reference": datasets.Image(),
            "query": datasets.Image(),
            "box": datasets.List(datasets.Value("float32"), length=4),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def step_times(model_name: str, generations: int, length: int, lora: bool, steps: int) -> list[float]:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *args, **kwargs) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter() - self.started)

    model, processor = grpo.load_vlm(model_name)
    timer = Timer()
    with (
        tempfile.TemporaryDirectory() as output,
        contextlib.redirect_stdout(io.StringIO()),
    ):  # the trainer's logs
        grpo.train_grpo(
            model,
            processor,
            synthetic_pairs(max(4, steps)),
            output,
            steps,
            num_generations=generations,
            max_completion_length=length,
            lora=lora,
            lora_rank=8,
            lora_alpha=16,
            difficulty_aware=True,
            callbacks=[timer],
            disable_tqdm=True,
        )
    return timer.times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=TINY_RANDOM)
    parser.add_argument("--generations", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32], help="max completion tokens")
    parser.add_argument("--lora", choices=["off", "on", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    loras = {"off": [False], "on": [True], "both": [False, True]}[args.lora]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {device}, {args.steps} steps each\n")
    print("| LoRA | generations | max completion tokens | first step (s) | median step (s) |")
    print("|---|---|---|---|---|")
    for lora in loras:
        for generations in args.generations:
            for length in args.lengths:
                times = step_times(args.model, generations, length, lora, args.steps)
                median = statistics.median(times[1:]) if len(times) > 1 else float("nan")
                row = ["on" if lora else "off", generations, length, f"{times[0]:.2f}", f"{median:.2f}"]
                print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
