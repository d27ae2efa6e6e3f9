"""Cost of a whole training step with each task-weighting method, as a ratio to the equal-weight all-tasks step.

The step is the trainer's own `cadmtl.training.step.training_step` with every task each step
(`--all_tasks_per_step`): the same model, the same synthetic batches, the same AdamW, one weighting at a time, in
one process and one run (methods interleaved round by round, so drifting machine load hits them alike). Equal
weighting and FAMO do one backward of the weighted sum; PCGrad, CAGrad and Aligned-MTL take one
`autograd.grad` of the shared parameters per task, combine the (K, P) matrix and write it back.

    OMP_NUM_THREADS=2 python benchmarks/bench_weighting_step.py --backbone tiny --size 128 --batch-size 4 --steps 12
    python benchmarks/bench_weighting_step.py --device cuda --backbone vitb16 --size 224 --batch-size 32 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator

from cadmtl.data.sources import TaskSource
from cadmtl.presets import backbone_preset
from cadmtl.training.balancer import TaskBalancer
from cadmtl.training.step import StepSettings, training_step
from cadmtl.training.weighting import build_weighting
from modeling_cadmtl import CadMtlConfig, CadMtlModel

TASKS = ("cls", "det", "seg")
METHODS = ("equal", "famo", "pcgrad", "cagrad", "aligned_mtl")


def batches(batch_size: int, size: int, device: torch.device) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    boxes = {
        "class_labels": torch.tensor([0], device=device),
        "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]], device=device),
    }
    return {
        "cls": {"pixel_values": pixels, "labels": torch.zeros(batch_size, dtype=torch.long, device=device)},
        "det": {"pixel_values": pixels, "labels": [boxes] * batch_size},
        "seg": {
            "pixel_values": pixels,
            "labels": torch.randint(0, 2, (batch_size, size, size), generator=generator).to(device),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=12, help="timed steps per method (after 2 warm-up steps)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    config = CadMtlConfig(
        backbone_config=backbone_preset(args.backbone),
        cls_labels=["normal", "dent"],
        det_labels=["dent"],
        seg_labels=["background", "dent"],
    )
    model = CadMtlModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    data = batches(args.batch_size, args.size, accelerator.device)

    def next_batch(task: str) -> tuple[TaskSource, dict]:
        return TaskSource(task, f"bench_{task}", []), data[task]

    settings = StepSettings()
    balancers = {name: TaskBalancer(build_weighting(name, TASKS), scale_losses=True) for name in args.methods}
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    for round_ in range(args.steps + 2):
        for name, balancer in balancers.items():
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            outcome = training_step(
                accelerator, model, optimizer, scheduler, next_batch, TASKS, balancer, settings
            )
            balancer.after_step(round_, outcome, accelerator)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("backbone.", "neck.")))
    print(
        f"device {accelerator.device}, backbone {args.backbone} ({shared / 1e6:.1f}M shared parameters), "
        f"{args.size} px, batch {args.batch_size} per task, {args.steps} steps, torch {torch.__version__}"
    )
    reference = statistics.median(times["equal"]) if "equal" in times else None
    print("| weighting | ms / step (median) | ratio to equal |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / reference:.2f}x" if reference else "-"
        print(f"| {name} | {1000 * median:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
