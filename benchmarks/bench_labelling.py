"""8-connected component labelling: the two hand-written labellers the package had against `scipy.ndimage.label`.

The anomaly wing's AUPRO labels ground-truth defect masks (a few filled regions per image), the reference wing's
localiser labels a thresholded anomaly map (irregular regions, more of them) and `build-pairs` labels pair masks.
Both used to carry their own labeller; this benchmark decided which one to keep (BENCHMARKS.md). The two
hand-written ones are copied here verbatim, as they were before the switch, so the comparison can be rerun:

* `union_find_runs`: `cadmtl.anomaly.metrics.connected_components` (numpy, union-find over horizontal runs);
* `pointer_jumping`: `cadmtl.reference.localizer.connected_components` (torch, 3 x 3 max-pool propagation with
  pointer jumping, on CPU here).

Every implementation's labels are checked to give the same partition as scipy's before anything is timed.
Prints a Markdown table: the median of `--repeats` calls, in milliseconds (pointer jumping: one call, it takes
seconds).

Example:
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_labelling.py
    PYTHONPATH=. python benchmarks/bench_labelling.py --sizes 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def union_find_runs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The anomaly wing's labeller (cadmtl/anomaly/metrics.py before the switch)."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)
    num_runs = run_rows.size
    parent = list(range(num_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_rows, np.arange(height + 1))
    for row in range(1, height):
        previous = range(row_first[row - 1], row_first[row])
        j = previous.start
        for i in range(row_first[row], row_first[row + 1]):
            while j < previous.stop and run_ends[j] < run_starts[i]:
                j += 1
            k = j
            while k < previous.stop and run_starts[k] <= run_ends[i]:
                root_i, root_k = find(i), find(k)
                if root_i != root_k:
                    parent[max(root_i, root_k)] = min(root_i, root_k)
                k += 1
    roots = np.array([find(i) for i in range(num_runs)], dtype=np.int64)
    unique_roots, component = np.unique(roots, return_inverse=True)
    labels = np.zeros((height, width), dtype=np.int32)
    for run in range(num_runs):
        labels[run_rows[run], run_starts[run] : run_ends[run]] = component[run] + 1
    return labels, int(unique_roots.size)


def pointer_jumping(mask: torch.Tensor) -> torch.Tensor:
    """The reference wing's labeller (cadmtl/reference/localizer.py before the switch)."""
    height, width = mask.shape
    labels = torch.arange(1, height * width + 1, dtype=torch.float64, device=mask.device).view(
        1, 1, height, width
    )
    foreground = mask.view(1, 1, height, width).to(torch.float64)
    labels = labels * foreground
    while True:
        spread = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * foreground
        flat = spread.view(-1)
        spread = flat[(flat.long() - 1).clamp(min=0)].view_as(spread) * foreground
        if torch.equal(spread, labels):
            break
        labels = spread
    _, consecutive = torch.unique(labels.view(height, width), return_inverse=True)
    return consecutive + 1 if bool(mask.all()) else consecutive


def scipy_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labels, int(count)


def defect_mask(size: int, blobs: int, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth-like: `blobs` filled ellipses (radii 2-8 % of the side), some touching."""
    ys, xs = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(blobs):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.02, 0.08, 2) * size
        mask |= ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
    return mask


def thresholded_map(size: int, rng: np.random.Generator, quantile: float = 0.97) -> np.ndarray:
    """Localiser-like: smoothed noise above its `quantile` (irregular regions, a few percent of the pixels)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 64)
    return noise > np.quantile(noise, quantile)


def same_partition(labels: np.ndarray, expected: np.ndarray) -> bool:
    """Whether two labellings split the foreground into the same regions (numbering may differ)."""
    if not np.array_equal(labels > 0, expected > 0):
        return False
    pairs = np.unique(np.stack([labels[expected > 0], expected[expected > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--blobs", type=int, nargs="+", default=[1, 5, 25], help="ellipses per defect mask")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print(
        f"torch threads: {torch.get_num_threads()}; median of {args.repeats} calls (pointer jumping: 1), ms\n"
    )
    print(
        "| mask | size | regions | foreground | union-find runs (anomaly) | pointer jumping (reference) | scipy.ndimage.label |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        masks = [(f"defect mask, {n} ellipses", defect_mask(size, n, rng)) for n in args.blobs]
        masks.append(("thresholded map (top 3 %)", thresholded_map(size, rng)))
        for name, mask in masks:
            expected, count = scipy_label(mask)
            tensor = torch.from_numpy(mask)
            assert same_partition(union_find_runs(mask)[0], expected), name
            # pointer jumping takes seconds per call: its one checked call is its timing
            start = time.perf_counter()
            assert same_partition(pointer_jumping(tensor).numpy(), expected), name
            pointer_ms = 1000 * (time.perf_counter() - start)
            cells = [
                median_ms(lambda mask=mask: union_find_runs(mask), args.repeats),
                pointer_ms,
                median_ms(lambda mask=mask: scipy_label(mask), args.repeats),
            ]
            print(
                f"| {name} | {size} | {count} | {mask.mean():.1%} | "
                + " | ".join(f"{value:.2f}" for value in cells)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
