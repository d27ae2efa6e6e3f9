"""Throughput of the full adaptive training loop against the backbone-alone train step.

The adaptive loop is `train_accelerate.py` itself (streamed JPEG data, augmentation, CoBa held-out evaluations
every `--coba-every` steps, task sampling, the AdamW step), run for `--steps` steps; its images/s come from the
throughput it logs per window (the first window, with start-up and compilation, is dropped), together with the
fraction of time spent in CoBa updates. The backbone-alone step is `bench_model.py`'s: synthetic tensors through
the DINOv3 backbone, a mean loss, backward, AdamW. MFU counts the FLOPs of the step that ran (FlopCounterMode).

    # the GPU table of BENCHMARKS.md (one H100): ViT-B/16 at 224 and 512 px
    python benchmarks/bench_train.py --device cuda --backbone vitb16 --sizes 224 512 --batch-sizes 128 32 \
        --num-workers 8 --steps 300 --peak-tflops 989 [--compile]
    # a CPU smoke run
    python benchmarks/bench_train.py --device cpu --backbone tiny --sizes 96 --batch-sizes 8 --steps 40
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from cadmtl.training.launch import reset_accelerate_state

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def backbone_alone(
    backbone: str, size: int, batch_size: int, device: torch.device, steps: int, compile_: bool
):
    """(images/s, TFLOP per image) of the backbone-alone train step."""
    bench_model = _load("bench_model", HERE / "bench_model.py")
    from cadmtl.presets import backbone_preset
    from modeling_cadmtl import CadMtlConfig, CadMtlModel

    torch.manual_seed(0)
    model = CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(backbone))).to(device).train()
    if compile_:
        model.backbone.compile(dynamic=False)
    step, count_flops = bench_model.make_step(model, "backbone", batch_size, size, True, device)
    seconds = bench_model.measure(step, steps, warmup=max(3, steps // 5), device=device)
    return batch_size / seconds, 3 * count_flops() / batch_size / 1e12


def adaptive_loop(
    dataset: Path, backbone: str, size: int, batch_size: int, args: argparse.Namespace, output: Path
) -> tuple[float, float]:
    """(images/s, fraction of time in CoBa updates) of train_accelerate.py's adaptive loop, after warm-up."""
    train = _load("train_accelerate", REPO_ROOT / "train_accelerate.py")
    logging_steps = max(5, args.steps // 6)
    argv = [
        "--dataset", str(dataset), "--output_dir", str(output), "--backbone", backbone,
        "--cls_configs", "bench_cls", "--det_configs", "bench_det", "--seg_configs", "bench_seg",
        "--cls_image_size", str(size), "--det_image_size", str(size), "--seg_image_size", str(size),
        "--batch_size", str(batch_size), "--eval_batch_size", str(batch_size), "--num_workers", str(args.num_workers),
        "--coba_val_batch_size", str(max(1, batch_size // 4)), "--coba_every", str(args.coba_every),
        "--coba_warmup_steps", "3", "--coba_history_length", "6", "--max_steps", str(args.steps),
        "--logging_steps", str(logging_steps), "--max_eval_batches", "1", "--test_split", "None",
        "--paradigm", "adaptive", "--report_to", "jsonl", "--learning_rate", "1e-4",
        "--eval_split", "train",  # a throughput run: CoBa's held-out batches may come from the train split
    ]  # fmt: skip
    if args.compile:
        argv.append("--torch_compile")
    train.main(argv)
    reset_accelerate_state()
    records = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "throughput/images_per_second" in r][1:]  # drop the warm-up window
    if not windows:
        raise SystemExit("too few steps for a measurement after warm-up: raise --steps")
    rate = statistics.median(r["throughput/images_per_second"] for r in windows)
    coba = statistics.median(r["throughput/weighting_fraction"] for r in windows)
    return rate, coba


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vitb16")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 32])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--coba-every", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--bench-images", type=int, default=256, help="512 px JPEG sources in the bench dataset"
    )
    args = parser.parse_args()
    if len(args.sizes) != len(args.batch_sizes):
        parser.error("give one --batch-sizes value per --sizes value")
    device = torch.device(args.device)
    bench_data = _load("bench_data", HERE / "bench_data.py")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # bench_cls / bench_det / bench_seg train splits from 512 px JPEGs (the builder benchmark's repo).
        dataset = bench_data.build_repo(scratch, args.data, args.bench_images, 1)[0]
        mode = "compile" if args.compile else "eager"
        print(
            f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
        )
        print(
            "| backbone | px | batch | mode | backbone alone img/s | adaptive loop img/s | ratio | CoBa time | MFU backbone | MFU loop |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for size, batch_size in zip(args.sizes, args.batch_sizes):
            alone, tflops = backbone_alone(
                args.backbone, size, batch_size, device, max(10, args.steps // 10), args.compile
            )
            loop, coba = adaptive_loop(dataset, args.backbone, size, batch_size, args, scratch / f"run{size}")
            mfu = (
                (
                    f"{100 * alone * tflops / args.peak_tflops:.1f}%",
                    f"{100 * loop * tflops / args.peak_tflops:.1f}%",
                )
                if args.peak_tflops
                else ("-", "-")
            )
            print(
                f"| {args.backbone} | {size} | {batch_size} | {mode} | {alone:.1f} | {loop:.1f} | {loop / alone:.2f}x "
                f"| {100 * coba:.1f}% | {mfu[0]} | {mfu[1]} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
