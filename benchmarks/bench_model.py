"""Train-step and inference throughput of CadMtl: the backbone alone, each head alone, all three heads.

Prints a Markdown table (images/s and, with --peak-tflops, MFU) for each backbone, resolution, task and mode.
Random weights shaped like the official DINOv3 checkpoints (4 register tokens), synthetic inputs and labels, bf16
autocast, fused AdamW on CUDA. FLOPs are counted with torch.utils.flop_counter on one forward pass (training =
3x forward).

Examples:
    # the GPU table of BENCHMARKS.md (one H100)
    python benchmarks/bench_model.py --device cuda --backbones vits16plus vitb16 --sizes 224 512 \
        --batch-sizes 128 32 --modes eager compile --peak-tflops 989
    # a quick CPU run
    python benchmarks/bench_model.py --device cpu --backbones vits16 --sizes 224 --batch-sizes 4 --steps 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DINOv3ViTBackbone

from cadmtl.presets import PRESETS, backbone_preset
from modeling_cadmtl import CadMtlConfig, CadMtlModel

NUM_CLASSES = {"cls": 50, "det": 10, "seg": 19}
TASKS = ("backbone", "cls", "det", "seg", "all")


def build_model(name: str, neck_channels: int) -> CadMtlModel:
    config = CadMtlConfig(
        backbone_config=backbone_preset(name),  # shaped like the official checkpoint, 4 register tokens
        cls_labels=[f"c{i}" for i in range(NUM_CLASSES["cls"])],
        det_labels=[f"d{i}" for i in range(NUM_CLASSES["det"])],
        seg_labels=["background"] + [f"s{i}" for i in range(NUM_CLASSES["seg"] - 1)],
        neck_channels=neck_channels,
        seg_channels=neck_channels,
    )
    return CadMtlModel(config)


def synthetic_labels(task: str, batch_size: int, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    cls = torch.randint(0, NUM_CLASSES["cls"], (batch_size,), generator=generator).to(device)
    det = []
    for _ in range(batch_size):
        count = 5
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        det.append(
            {
                "class_labels": torch.randint(0, NUM_CLASSES["det"], (count,), generator=generator).to(
                    device
                ),
                "boxes": torch.cat([centres, sizes], 1).to(device),
            }
        )
    seg = torch.randint(0, NUM_CLASSES["seg"], (batch_size, size, size), generator=generator).to(device)
    return {"cls": cls, "det": det, "seg": seg, "all": {"cls": cls, "det": det, "seg": seg}}[task]


def make_step(
    model: CadMtlModel, task: str, batch_size: int, size: int, train: bool, device: torch.device
) -> tuple[Callable[[], None], Callable[[], int]]:
    """A closure running one step, and one counting the FLOPs of one forward pass."""
    pixel_values = torch.randn(batch_size, 3, size, size, device=device)
    labels = synthetic_labels(task, batch_size, size, device) if task != "backbone" else None
    backbone: DINOv3ViTBackbone = model.backbone

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if task == "backbone":
                return sum(fmap.float().mean() for fmap in backbone(pixel_values).feature_maps)
            return model(pixel_values, task=None if task == "all" else task, labels=labels).loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        if train:
            loss = forward()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                forward()

    def count_flops() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward()
        return counter.get_total_flops()

    return step, count_flops


def measure(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def print_flops(backbones: list[str], sizes: list[int], neck_channels: int, device: torch.device) -> None:
    """Backbone GFLOP per image and backbone / step FLOP ratios: the throughput ratio of a compute-bound step."""
    print(
        "| backbone @ px | backbone GFLOP | cls | det | seg | all three | all three vs 3 single-task models |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in backbones:
        model = build_model(name, neck_channels).to(device).train()
        for size in sizes:
            flops = {task: make_step(model, task, 2, size, True, device)[1]() / 2 for task in TASKS}
            ratios = " | ".join(
                f"{flops['backbone'] / flops[task]:.3f}" for task in ("cls", "det", "seg", "all")
            )
            three = (flops["cls"] + flops["det"] + flops["seg"]) / flops["all"]
            print(f"| {name} @{size} | {flops['backbone'] / 1e9:.1f} | {ratios} | {three:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["vits16plus", "vitb16"],
        choices=[p for p in PRESETS if not p.startswith("convnext")],
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 32], help="one per size")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"])
    parser.add_argument("--neck-channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak, e.g. 989 for an H100 SXM"
    )
    parser.add_argument("--inference", action="store_true", help="also time inference (forward only)")
    parser.add_argument(
        "--flops-only", action="store_true", help="only count FLOPs (any device): the compute the heads add"
    )
    args = parser.parse_args()
    if len(args.batch_sizes) != len(args.sizes):
        parser.error("give one --batch-sizes value per --sizes value")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.flops_only:
        print_flops(args.backbones, args.sizes, args.neck_channels, device)
        return

    header = "| backbone | px | batch | mode | phase | task | img/s | vs backbone | TFLOP/img | MFU |"
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.backbones:
        for size, batch_size in zip(args.sizes, args.batch_sizes):
            for mode in args.modes:
                for phase in ["train", "inference"] if args.inference else ["train"]:
                    rates = {}
                    for task in args.tasks:
                        torch.manual_seed(0)
                        model = build_model(name, args.neck_channels).to(device).train(phase == "train")
                        if mode == "compile":
                            # One graph per input shape: dynamic shapes fail on DINOv3 (see shared/docs/anchors.md §6).
                            model.backbone = torch.compile(model.backbone, dynamic=False)
                        step, count_flops = make_step(model, task, batch_size, size, phase == "train", device)
                        flops = count_flops() / batch_size * (3 if phase == "train" else 1)
                        seconds = measure(step, args.steps, args.warmup, device)
                        rates[task] = batch_size / seconds
                        ratio = rates[task] / rates["backbone"] if "backbone" in rates else float("nan")
                        mfu = (
                            f"{100 * rates[task] * flops / (args.peak_tflops * 1e12):.1f}%"
                            if args.peak_tflops
                            else "-"
                        )
                        print(
                            f"| {name} | {size} | {batch_size} | {mode} | {phase} | {task} | {rates[task]:.1f} | "
                            f"{ratio:.2f}x | {flops / 1e12:.3f} | {mfu} |",
                            flush=True,
                        )
                        del model, step
                    if {"cls", "det", "seg", "all"} <= set(rates):
                        three_models = 1 / sum(1 / rates[t] for t in ("cls", "det", "seg"))
                        print(
                            f"| {name} | {size} | {batch_size} | {mode} | {phase} | all vs 3 single-task models | "
                            f"{rates['all']:.1f} vs {three_models:.1f} | {rates['all'] / three_models:.2f}x | | |"
                        )


if __name__ == "__main__":
    main()
