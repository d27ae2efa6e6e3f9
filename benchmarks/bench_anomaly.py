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
    # the inverted file against faiss-cpu (pip install faiss-cpu) on real patch features
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_anomaly.py --parts ivf-backends --threads 1 \
        --bank-sizes 24304 --batch-sizes 8 --real-features /work/shared/data/magnetic_tile/MT_Free
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


SEARCH_MODES = {  # name: NearestNeighborIndex options; "num_lists": "sqrt" -> round(sqrt(bank size))
    "exact float32": {},
    "bf16, re-rank 16 (approx.)": {"compute_dtype": torch.bfloat16, "num_candidates": 16},
    "bf16, projection 128, re-rank 32 (approx.)": {
        "compute_dtype": torch.bfloat16,
        "projection_dim": 128,
        "num_candidates": 32,
    },
    "IVF sqrt(M) lists, 4 probes (approx.)": {"num_lists": "sqrt", "num_probes": 4},
    "IVF sqrt(M) lists, 8 probes (approx.)": {"num_lists": "sqrt", "num_probes": 8},
    "IVF sqrt(M) lists, 16 probes (approx.)": {"num_lists": "sqrt", "num_probes": 16},
}


def _index_options(options: dict, bank_size: int) -> dict:
    if options.get("num_lists") == "sqrt":
        options = {**options, "num_lists": round(bank_size**0.5)}
    return options


@torch.inference_mode()
def real_patch_features(folder: str, count: int, size: int, cache: str | None) -> torch.Tensor:
    """(count, grid, 768) patch features (layers 6 and 9, the scorer's default for ViT-S) of the first `count`
    *.jpg images under `folder` (sorted paths) with the random-init `vits16` preset, seed 0; the 384-dim rows
    of the tables use layer 9 alone (the last 384 channels). Cached in `cache` (a .pt file, resumable)."""
    from pathlib import Path

    from PIL import Image

    from cadmtl.anomaly.data import to_pixel_values
    from cadmtl.features import load_backbone

    files = sorted(f for f in Path(folder).rglob("*.jpg"))[:count]
    features = []
    if cache and Path(cache).is_file():  # resumes a partial extraction
        features = [torch.load(cache)]
    done = sum(f.shape[0] for f in features)
    if done < len(files):
        backbone = load_backbone("vits16", 0)[0]
        scorer = PatchMemoryScorer.from_backbone(backbone, layers=(6, 9), image_size=(size, size))
    for start in range(done, len(files), 8):
        images = [Image.open(f).convert("RGB") for f in files[start : start + 8]]
        maps = scorer.patch_features(to_pixel_values(images, size))
        features.append(maps.flatten(2).transpose(1, 2))
        print(f"  features: {start + len(images)} / {len(files)} images", end="\r", flush=True)
        if cache and (start // 8) % 8 == 7:
            torch.save(torch.cat(features), cache)
    features = torch.cat(features)[:count]
    if cache:
        torch.save(features, cache)
    return features


@torch.inference_mode()
def bench_search(args: argparse.Namespace) -> None:
    """Per batch: the backbone forward, then each search mode over `batch * grid` queries. The index (bank
    cast / projection / k-means of the inverted file) is built once outside the timing, as `PatchMemoryScorer`
    does. Recall = share of queries whose distance equals the exact one; random Gaussian data is the worst case
    for the approximate modes. With `--real-features FOLDER` the bank is the patches of the first images of the
    folder and the queries those of the next `batch` images (random-init vits16 features, see
    `real_patch_features`)."""
    backbone = vit_s16()
    size = args.image_size
    grid = (size // 16) ** 2
    modes = {name: SEARCH_MODES[name] for name in args.search_modes}
    data = (
        "random Gaussian features"
        if args.real_features is None
        else f"patch features of {args.real_features}"
    )
    print(
        f"\n### Nearest-neighbour search vs the ViT-S/16 forward ({size} px, {grid} patches / image), {data}\n"
    )
    print("| batch | bank | dim | search | forward (ms) | NN (ms) | NN / forward | recall |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    real = None
    if args.real_features is not None:
        bank_images = -(-max(args.bank_sizes) // grid)
        real = real_patch_features(
            args.real_features, bank_images + max(args.batch_sizes), size, args.features_cache
        )
    for batch in args.batch_sizes:
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        measure(lambda pixels=pixels: backbone(pixels), 1)  # warm-up
        for bank_size, dim in itertools.product(args.bank_sizes, args.dims):
            if real is None:
                bank = torch.randn(bank_size, dim, generator=generator)
                queries = torch.randn(batch * grid, dim, generator=generator)
            else:
                channels = slice(0, 768) if dim == 768 else slice(768 - dim, 768)
                bank = real[:bank_images, :, channels].reshape(-1, dim)[:bank_size]
                queries = real[bank_images : bank_images + batch, :, channels].reshape(-1, dim)
            exact = None
            for name, options in modes.items():
                index = NearestNeighborIndex(bank, **_index_options(options, bank_size))
                distances = index.search(queries)  # also the warm-up
                exact = NearestNeighborIndex(bank).search(queries) if exact is None else exact
                recall = float((distances - exact).abs().le(1e-5).float().mean())
                # forward and search timed in the same run, interleaved, so that both see the same load
                forward = seconds = 0.0
                for _ in range(args.repeats):
                    forward += measure(lambda pixels=pixels: backbone(pixels))[0] / args.repeats
                    seconds += measure(lambda index=index, q=queries: index.search(q))[0] / args.repeats
                print(
                    f"| {batch} | {bank_size} | {dim} | {name} | {1e3 * forward:.0f} | {1e3 * seconds:.0f} "
                    f"| {seconds / forward:.2f} | {recall:.3f} |",
                    flush=True,
                )


@torch.inference_mode()
def bench_ivf_backends(args: argparse.Namespace) -> None:
    """The hand-written inverted file (`NearestNeighborIndex(num_lists=..., num_probes=...)`) against faiss-cpu's
    `IndexIVFFlat` with the same number of lists, over a range of probes, so the two can be compared at equal
    recall. Both build their k-means outside the timing (build time reported apart) and run on the same
    `--threads`; recall = share of queries whose nearest distance equals the exact one (faiss's neighbour
    distance is recomputed exactly, as the hand-written index re-ranks). Queries: `max(--batch-sizes)` images."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    size = args.image_size
    grid = (size // 16) ** 2
    batch = max(args.batch_sizes)
    generator = torch.Generator().manual_seed(0)
    real = None
    if args.real_features is not None:
        bank_images = -(-max(args.bank_sizes) // grid)
        real = real_patch_features(args.real_features, bank_images + batch, size, args.features_cache)
    data = "random Gaussian features" if real is None else f"patch features of {args.real_features}"
    print(f"\n### Inverted file: hand-written vs faiss IndexIVFFlat (faiss {faiss.__version__}), {data}\n")
    print("| bank | dim | lists | probes | backend | build (s) | search (ms) | recall |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for bank_size, dim in itertools.product(args.bank_sizes, args.dims):
        if real is None:
            bank = torch.randn(bank_size, dim, generator=generator)
            queries = torch.randn(batch * grid, dim, generator=generator)
        else:
            channels = slice(0, 768) if dim == 768 else slice(768 - dim, 768)
            bank = real[:bank_images, :, channels].reshape(-1, dim)[:bank_size].contiguous()
            queries = real[bank_images : bank_images + batch, :, channels].reshape(-1, dim).contiguous()
        exact = NearestNeighborIndex(bank).search(queries)
        num_lists = round(bank.shape[0] ** 0.5)
        start = time.perf_counter()
        ours = NearestNeighborIndex(bank, num_lists=num_lists, num_probes=1)
        ours_build = time.perf_counter() - start
        start = time.perf_counter()
        quantizer = faiss.IndexFlatL2(dim)
        theirs = faiss.IndexIVFFlat(quantizer, dim, num_lists)
        theirs.train(bank.numpy())
        theirs.add(bank.numpy())
        faiss_build = time.perf_counter() - start
        for probes in args.probes:
            ours.num_probes = min(probes, ours.num_lists)
            theirs.nprobe = probes

            def faiss_search(theirs=theirs, queries=queries, bank=bank) -> torch.Tensor:
                _, found = theirs.search(queries.numpy(), 1)
                found = torch.from_numpy(found[:, 0]).clamp(min=0)
                return (queries - bank[found]).norm(dim=1)

            for name, build, search in (
                ("hand-written", ours_build, lambda ours=ours, q=queries: ours.search(q)),
                ("faiss", faiss_build, faiss_search),
            ):
                distances = search()  # warm-up, and the recall
                recall = float((distances - exact).abs().le(1e-5).float().mean())
                seconds = min(measure(search)[0] for _ in range(args.repeats))
                print(
                    f"| {bank.shape[0]} | {dim} | {num_lists} | {probes} | {name} | {build:.1f} | "
                    f"{1e3 * seconds:.1f} | {recall:.3f} |",
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
    parser.add_argument("--coreset-dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[100_000, 10_000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--search-modes", nargs="+", default=list(SEARCH_MODES), choices=list(SEARCH_MODES), metavar="MODE"
    )
    parser.add_argument(
        "--real-features",
        default=None,
        help="image folder: search real patch features instead of random ones",
    )
    parser.add_argument(
        "--features-cache", default=None, help=".pt file caching the --real-features features"
    )
    parser.add_argument("--fit-images", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["coreset", "search", "fit"],
        choices=["coreset", "search", "fit", "ivf-backends"],
        help="ivf-backends (not in the default): the inverted file against faiss-cpu's IndexIVFFlat",
    )
    parser.add_argument(
        "--probes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="ivf-backends: probes per query"
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
        if "ivf-backends" in args.parts:
            bench_ivf_backends(args)


if __name__ == "__main__":
    main()
