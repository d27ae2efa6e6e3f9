"""Cost of normal-only anomaly detection (cadmtl.anomaly): coreset selection, nearest-neighbour search against
the backbone forward, and fitting a PatchMemoryScorer.

Prints Markdown tables. Random weights shaped like DINOv3 ViT-S/16 (4 register tokens), synthetic inputs and
features, so only the cost is measured. Peak memory is the peak increase of the process RSS during the call
(sampled every 2 ms), which covers torch's CPU allocations that tracemalloc does not see.

Examples:
    # the numbers in the report (2-core CPU)
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_anomaly.py
    # quicker
    PYTHONPATH=. python benchmarks/bench_anomaly.py --num-patches 20000 --fit-images 4 16 --coreset-dtypes float16
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Callable

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from cadmtl.anomaly import PatchMemoryScorer, greedy_coreset
from cadmtl.anomaly.memory_bank import NearestNeighborIndex

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def vit_s16() -> DINOv3ViTModel:
    config = DINOv3ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        num_register_tokens=4,
    )
    return DINOv3ViTModel(config).eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object], repeats: int = 1, warmup: bool = False) -> tuple[float, float]:
    """(mean seconds per call, peak RSS increase in MiB) of `fn`, optionally after one warm-up call."""
    if warmup:
        fn()
    start_rss, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    elapsed = (time.perf_counter() - start) / repeats
    stop.set()
    sampler.join()
    return elapsed, max(0, max(peak[0], _rss_bytes()) - start_rss) / 2**20


def bench_coreset(args: argparse.Namespace) -> None:
    print(
        f"\n### Greedy coreset: {args.num_patches} patches -> {args.fraction:.0%}, projection {args.projection_dim}\n"
    )
    print("| dim | dtype | selected | time (s) | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for dim in args.dims:
        features = torch.randn(args.num_patches, dim, generator=generator)
        for dtype_name in args.coreset_dtypes:
            indices = []

            def run(features=features, dtype_name=dtype_name, indices=indices) -> None:
                indices.append(
                    greedy_coreset(features, args.fraction, 0, args.projection_dim, DTYPES[dtype_name])
                )

            seconds, peak = measure(run)
            print(f"| {dim} | {dtype_name} | {indices[0].numel()} | {seconds:.1f} | {peak:.0f} |", flush=True)


SEARCH_MODES = {  # name: NearestNeighborIndex options
    "exact float32": {},
    "bf16, re-rank 16 (approx.)": {"compute_dtype": torch.bfloat16, "num_candidates": 16},
    "bf16, projection 128, re-rank 32 (approx.)": {
        "compute_dtype": torch.bfloat16,
        "projection_dim": 128,
        "num_candidates": 32,
    },
}


@torch.inference_mode()
def bench_search(args: argparse.Namespace) -> None:
    """Per batch: the backbone forward, then each search mode over `batch * grid` queries. The index (bank
    cast / projection) is built once outside the timing, as `PatchMemoryScorer` does. Recall = share of queries
    whose distance equals the exact one; random Gaussian data is the worst case for the projection."""
    backbone = vit_s16()
    size = args.image_size
    grid = (size // 16) ** 2
    print(f"\n### Nearest-neighbour search vs the ViT-S/16 forward ({size} px, {grid} patches / image)\n")
    print("| batch | bank | dim | search | forward (ms) | NN (ms) | NN / forward | recall |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        forward, _ = measure(lambda pixels=pixels: backbone(pixels), args.repeats, warmup=True)
        for bank_size, dim in itertools.product(args.bank_sizes, args.dims):
            bank = torch.randn(bank_size, dim, generator=generator)
            queries = torch.randn(batch * grid, dim, generator=generator)
            exact = None
            for name, options in SEARCH_MODES.items():
                index = NearestNeighborIndex(bank, **options)
                distances = index.search(queries)  # also the warm-up
                exact = distances if exact is None else exact
                recall = float((distances - exact).abs().le(1e-5).float().mean())
                seconds, _ = measure(lambda index=index, q=queries: index.search(q), args.repeats)
                print(
                    f"| {batch} | {bank_size} | {dim} | {name} | {1e3 * forward:.0f} | {1e3 * seconds:.0f} "
                    f"| {seconds / forward:.2f} | {recall:.3f} |",
                    flush=True,
                )


def bench_fit(args: argparse.Namespace) -> None:
    backbone = vit_s16()
    size = args.image_size
    print(
        f"\n### PatchMemoryScorer.fit: ViT-S/16, layers (6, 9) -> 768 dims, {size} px, coreset {args.fraction:.0%}\n"
    )
    print("| images | patches | bank | time (s) | s / image | peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for count in args.fit_images:
        images = torch.randn(count, 3, size, size, generator=generator)
        scorer = PatchMemoryScorer.from_backbone(
            backbone, layers=(6, 9), coreset_fraction=args.fraction, image_size=(size, size)
        )
        seconds, peak = measure(lambda scorer=scorer, images=images: scorer.fit(images, batch_size=8))
        patches = count * (size // 16) ** 2
        bank = scorer.memory_bank.shape[0]
        print(
            f"| {count} | {patches} | {bank} | {seconds:.1f} | {seconds / count:.3f} | {peak:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-patches", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--coreset-dtypes", nargs="+", default=["float16", "float32"], choices=sorted(DTYPES))
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[100_000, 10_000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-images", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--parts", nargs="+", default=["coreset", "search", "fit"], choices=["coreset", "search", "fit"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        if "coreset" in args.parts:
            bench_coreset(args)
        if "search" in args.parts:
            bench_search(args)
        if "fit" in args.parts:
            bench_fit(args)


if __name__ == "__main__":
    main()
