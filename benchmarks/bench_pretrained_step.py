"""Cost of one fine-tuning step of the multi-task model on the ImageNet EfficientNet-Lite0 backbone (the `pretrained`
extra), on CPU: fp32 against channels-last, channels-last + bf16 autocast, and the `cpu-pretrained` protocol's
recipe (channels-last fp32 + the stem and first two stages frozen for the whole run + BatchNorm statistics kept).

One step = forward of one head with its real loss (synthetic labels), backward, AdamW, as the training loop runs it
per task. Recipes are timed in alternation, repeat after repeat, so the load of a shared machine hits all alike; the
table shows the median seconds per step (best in brackets) and images/s.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_pretrained_step.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cadmtl.presets import backbone_preset
from cadmtl.pretrained import load_pretrained_backbone
from cadmtl.training.optim import (
    early_backbone_parameters,
    freeze_batch_norm_statistics,
    freeze_for_whole_run,
)
from modeling_cadmtl import CadMtlConfig, CadMtlModel

RECIPES = (
    "fp32",
    "channels_last",
    "channels_last+bf16",
    "protocol (channels_last, frozen 2 stages, BN kept)",
)


def labels_for(task: str, batch: int, size: int, generator: torch.Generator) -> object:
    if task == "cls":
        return torch.randint(0, 50, (batch,), generator=generator)
    if task == "det":
        return [
            {
                "class_labels": torch.randint(0, 18, (4,), generator=generator),
                "boxes": torch.rand(4, 4) * 0.4 + 0.3,
            }
            for _ in range(batch)
        ]
    return torch.randint(0, 19, (batch, size, size), generator=generator)


def build(recipe: str) -> tuple[CadMtlModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = CadMtlConfig(
        backbone_config=backbone_preset("efficientnet-lite0"),
        cls_labels=[f"part_{i}" for i in range(50)],
        det_labels=[f"part_{i}" for i in range(18)],
        seg_labels=["background", *(f"part_{i}" for i in range(18))],
        neck_channels=64,
        seg_channels=64,
    )
    model = CadMtlModel(config)
    load_pretrained_backbone(model.backbone, "efficientnet-lite0")
    if recipe.startswith("protocol"):
        freeze_for_whole_run(early_backbone_parameters(model, 2))
        freeze_batch_norm_statistics(model.backbone)
    if recipe != "fp32":
        model.to(memory_format=torch.channels_last)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step_function(recipe: str, task: str, batch: int, size: int) -> Callable[[], None]:
    model, optimizer = build(recipe)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    if recipe != "fp32":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    labels = labels_for(task, batch, size, generator)
    bf16 = "bf16" in recipe

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixels, task=task, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["cls:32:160", "det:8:224", "seg:8:224"],
        help="task:batch:size (the cpu-pretrained protocol's)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} repeats", flush=True
    )
    print("| task | batch | size | recipe | s / step (best) | images/s | vs fp32 |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for spec in args.tasks:
        task, batch, size = spec.split(":")
        batch, size = int(batch), int(size)
        steps = {recipe: step_function(recipe, task, batch, size) for recipe in RECIPES}
        for step in steps.values():  # warm-up (allocations, oneDNN kernels)
            step()
        times: dict[str, list[float]] = {recipe: [] for recipe in RECIPES}
        for _ in range(args.repeats):
            for recipe, step in steps.items():
                start = time.perf_counter()
                step()
                times[recipe].append(time.perf_counter() - start)
        base = statistics.median(times["fp32"])
        for recipe in RECIPES:
            median = statistics.median(times[recipe])
            print(
                f"| {task} | {batch} | {size} | {recipe} | {median:.2f} ({min(times[recipe]):.2f}) "
                f"| {batch / median:.1f} | {base / median:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
