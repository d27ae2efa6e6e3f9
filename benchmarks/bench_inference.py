"""Inference latency of a CadMtl model (all three heads): PyTorch eager against onnxruntime, side by side.

For each backbone preset and input size the model (random weights shaped like the official DINOv3 checkpoint, 4
register tokens) is saved, exported with `cadmtl.export.onnx.export_onnx` (fixed input size, dynamic batch) and run
by PyTorch eager (float32, `inference_mode`) and by an onnxruntime session (graph optimisation level `--ort-level`,
the same number of threads). The two are timed in alternation, repeat after repeat, so the load of a shared
machine hits both alike; the table shows the median time per batch, the best time, and the largest difference
between their outputs. Pre- and post-processing are not timed (they are the same code for both).

`--model scorer` times the patch-memory anomaly scorer instead (`PatchMemoryScorer` on the preset, fitted on
`--bank-images` random images with a 10 % coreset, exported with the memory bank inside the graph; outputs
`anomaly_maps`, `image_scores`), served by `cadmtl.export.anomaly.AnomalyOnnxPredictor`.

Examples:
    # the CPU table of BENCHMARKS.md
    nice -n 10 python benchmarks/bench_inference.py --presets tiny vits16 --sizes 224 512 --batch-sizes 1 8 \
        --repeats 5 --threads 2
    # the exported anomaly scorer, batch 1, tiny preset, 224 px
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_inference.py --model scorer --presets tiny \
        --sizes 224 --batch-sizes 1 --repeats 20 --threads 1
    # the pretrained scorer fitted by `cadmtl anomaly fit` (EfficientNet-Lite0, its real memory bank)
    nice -n 10 env OMP_NUM_THREADS=2 python benchmarks/bench_inference.py --scorer-dir OUT/model --batch-sizes 1 8 \
        --repeats 10 --threads 2
    # a GPU (CUDAExecutionProvider if onnxruntime-gpu is installed)
    python benchmarks/bench_inference.py --device cuda --presets vits16 vitb16 --sizes 224 512 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cadmtl.anomaly import PatchMemoryScorer
from cadmtl.export.anomaly import ANOMALY_OUTPUTS, AnomalyOnnxPredictor
from cadmtl.export.onnx import OnnxPredictor, export_onnx, session_options
from cadmtl.features import backbone_from_preset
from cadmtl.presets import PRESETS, backbone_preset
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel

NUM_CLASSES = {"cls": 50, "det": 10, "seg": 19}
FIELDS = ("cls_logits", "det_logits", "det_centerness_logits", "pred_boxes", "seg_logits")


def build_model(name: str, neck_channels: int) -> CadMtlModel:
    config = CadMtlConfig(
        backbone_config=backbone_preset(name),
        cls_labels=[f"c{i}" for i in range(NUM_CLASSES["cls"])],
        det_labels=[f"d{i}" for i in range(NUM_CLASSES["det"])],
        seg_labels=["background"] + [f"s{i}" for i in range(NUM_CLASSES["seg"] - 1)],
        neck_channels=neck_channels,
        seg_channels=neck_channels,
    )
    torch.manual_seed(0)
    return CadMtlModel(config).eval()


def save_scorer(name: str, size: int, bank_images: int, folder: Path) -> PatchMemoryScorer:
    """A scorer on the preset (random weights) fitted on random images, 10 % coreset, saved to `folder`."""
    torch.manual_seed(0)
    scorer = PatchMemoryScorer.from_backbone(backbone_from_preset(name), image_size=(size, size))
    scorer.fit(torch.randn(bank_images, 3, size, size, generator=torch.Generator().manual_seed(1)))
    scorer.save_pretrained(folder)
    return scorer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def providers(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("--device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def measure(
    args: argparse.Namespace, preset: str, size: int, batch_sizes: list[int], folder: Path
) -> list[dict]:
    device = torch.device(args.device)
    model_dir, onnx_dir = folder / f"{preset}-{size}", folder / f"{preset}-{size}-onnx"
    # A scorer fitted by `cadmtl anomaly fit` brings its own backbone, bank and size.
    if args.scorer_dir is not None:
        model_dir = args.scorer_dir
        model, fields, predictor_class = (
            PatchMemoryScorer.from_pretrained(model_dir).eval(),
            ANOMALY_OUTPUTS,
            AnomalyOnnxPredictor,
        )
    elif args.model == "scorer":
        model, fields, predictor_class = (
            save_scorer(preset, size, args.bank_images, model_dir),
            ANOMALY_OUTPUTS,
            AnomalyOnnxPredictor,
        )
    else:
        model, fields, predictor_class = build_model(preset, args.neck_channels), FIELDS, OnnxPredictor
        model.save_pretrained(
            model_dir, image_processor=CadMtlImageProcessor(size={"height": size, "width": size})
        )
    started = time.perf_counter()
    export_onnx(model_dir, onnx_dir)
    export_seconds = time.perf_counter() - started
    predictor = predictor_class(
        onnx_dir,
        providers=providers(device),
        options=session_options(intra_op_num_threads=args.threads, optimization=args.ort_level),
    )
    model = model.to(device)
    rows = []
    for batch_size in batch_sizes:
        if batch_size * size * size > args.max_batch_pixels:
            rows.append({"preset": preset, "size": size, "batch": batch_size, "skipped": True})
            continue
        pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        inputs = pixel_values.numpy()
        on_device = pixel_values.to(device)

        def run_torch(on_device=on_device):
            with torch.inference_mode():
                outputs = model(on_device)
            sync(device)
            return outputs

        def run_ort(inputs=inputs):
            return predictor.run(inputs)

        for _ in range(args.warmup):
            run_torch(), run_ort()
        times = {"torch": [], "ort": []}
        for _ in range(args.repeats):  # alternate, so a burst of load on a shared machine hits both
            for name, function in (("torch", run_torch), ("ort", run_ort)):
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
        reference, outputs = run_torch(), run_ort()
        difference = max(
            float((outputs[field].float() - getattr(reference, field).float().cpu()).abs().max())
            for field in fields
        )
        rows.append(
            {
                "preset": preset,
                "size": size,
                "batch": batch_size,
                "torch": statistics.median(times["torch"]),
                "ort": statistics.median(times["ort"]),
                "torch_best": min(times["torch"]),
                "ort_best": min(times["ort"]),
                "difference": difference,
                "export": export_seconds,
            }
        )
        print(f"  {preset} {size}px batch {batch_size}: done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| backbone | size | batch | PyTorch eager ms/batch (best) | onnxruntime ms/batch (best) | speed-up (median) "
        "| onnxruntime img/s | max output diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['preset']} | {row['size']} | {row['batch']} |"
        if row.get("skipped"):
            lines.append(f"{head} skipped (--max-batch-pixels) | | | | |")
            continue
        lines.append(
            f"{head} {row['torch'] * 1e3:.1f} ({row['torch_best'] * 1e3:.1f}) | {row['ort'] * 1e3:.1f} "
            f"({row['ort_best'] * 1e3:.1f}) | {row['torch'] / row['ort']:.2f}x | {row['batch'] / row['ort']:.1f} | "
            f"{row['difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="cadmtl",
        choices=["cadmtl", "scorer"],
        help="CadMtl (3 heads) or the anomaly scorer",
    )
    parser.add_argument(
        "--bank-images", type=int, default=50, help="scorer: random images fitted (10 %% coreset)"
    )
    parser.add_argument(
        "--scorer-dir",
        type=Path,
        default=None,
        help="time this fitted scorer (`cadmtl anomaly fit` output's model/) at its own size instead of a preset",
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "vits16"], choices=PRESETS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda" ("cuda:1", ...)')
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each engine (alternating)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of both engines (default: torch's own count)"
    )
    parser.add_argument(
        "--ort-level",
        default="all",
        choices=["disable", "basic", "extended", "all"],
        help="graph optimisations",
    )
    parser.add_argument("--neck-channels", type=int, default=128)
    parser.add_argument(
        "--max-batch-pixels",
        type=int,
        default=4 * 512 * 512,
        help="skip batch x height x width above this (default: 512 px at batch 8 is skipped, minutes on a CPU)",
    )
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    args.threads = threads
    import onnxruntime as ort

    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, device {args.device}, level {args.ort_level}, {args.repeats} repeats, "
        f"model {args.model}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.scorer_dir is not None:
            config = PatchMemoryScorer.config_class.from_pretrained(args.scorer_dir)
            name = getattr(config.backbone_config, "backbone", config.backbone_config.model_type)
            rows += measure(args, f"{name} (fitted)", config.image_size[0], args.batch_sizes, Path(folder))
        for preset in args.presets if args.scorer_dir is None else []:
            for size in args.sizes:
                rows += measure(args, preset, size, args.batch_sizes, Path(folder))
    print(table(rows))
    exports = {(r["preset"], r["size"]): r["export"] for r in rows if not r.get("skipped")}
    print("\nexport time: " + ", ".join(f"{p} {s}px {t:.0f} s" for (p, s), t in exports.items()))


if __name__ == "__main__":
    main()
