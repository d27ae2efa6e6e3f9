"""Evaluate a CadMtl model on dataset configs, or compare evaluation runs.

    # a model folder or Hub id, a dataset folder or Hub id; every config the model has heads for by default
    cadmtl evaluate outputs/cadmtl-demo/model data/cad100k-mini --split test --output-dir eval/
    # several GPUs: the same command under `accelerate launch -m cadmtl.evaluation.command ...` (this module is `cadmtl evaluate`)
    # single-task vs. base vs. adaptive table from result files (several files per method = seeds)
    cadmtl evaluate --compare "DINOv3-S+:Single=a.json" "DINOv3-S+:Adaptive=b.json" ...

Writes `<output-dir>/eval_results.json` (metrics and per-class reports) and `eval_results.md` (tables shaped like
the paper's: per-domain detection AP / AP50 / AP75 / AR, classification Acc@1 / Acc@5, segmentation mIoU /
mFscore / mPrec / mRecall), plus the OK / NG verdict over the configs' images (`is_normal`) at the model's stored
threshold: image AUROC, F1-max, precision, recall and false-positive rate (`--no-verdict` skips it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cadmtl.evaluation.model_evaluation import evaluate_model
from cadmtl.model_kinds import ModelLoadError
from cadmtl.precision import MIXED_PRECISIONS
from dataset_scripts.options import (
    add_batch_size_option,
    add_device_option,
    add_output_dir_option,
    exit_status,
)
from dataset_scripts.schema import TASKS

logger = logging.getLogger("cadmtl.evaluation.command")


def parse_compare_spec(spec: str) -> tuple[str, str, str]:
    """'MODEL:METHOD=path.json' -> (model, method, path)."""
    label, sep, path = spec.partition("=")
    model, colon, method = label.partition(":")
    if not sep or not colon or not model or not method or not path:
        raise ValueError(f"--compare expects MODEL:METHOD=RESULTS.json, got {spec!r}.")
    return model, method, path


def compare(specs: list[str], split: str | None = "test") -> str:
    """The comparison table of the given result files, grouped by (model, method): one file per seed."""
    from cadmtl.evaluation.reporting import comparison_table, load_results, task_summary

    grouped: dict[tuple[str, str], list[dict[str, float]]] = {}
    for spec in specs:
        model, method, path = parse_compare_spec(spec)
        grouped.setdefault((model, method), []).append(task_summary(load_results(path), split))
    return comparison_table([(model, method, summaries) for (model, method), summaries in grouped.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="CadMtl model folder or Hub id.")
    parser.add_argument("dataset", nargs="?", help="Dataset repo folder or Hub id.")
    parser.add_argument(
        "--configs", nargs="+", help="Dataset configs (default: every config of a trained task)."
    )
    parser.add_argument("--split", default="test")
    add_batch_size_option(parser, 16)
    parser.add_argument(
        "--image-size", nargs="+", default=[], metavar="TASK=PX", help="e.g. det=512 (default: the model's)."
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, help="Cap the batches per config (smoke runs)."
    )
    parser.add_argument("--num-workers", type=int, default=0)
    add_device_option(parser, help="cpu forces the CPU (default: CUDA when there is one, through accelerate)")
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=MIXED_PRECISIONS,
        help="auto (default, as train_accelerate.py): bf16 where the CPU / GPU computes it natively, else float32",
    )
    parser.add_argument(
        "--no-domain-conditioning",
        action="store_true",
        help="Score classification among all the head's classes, not each config's (domain's) own.",
    )
    parser.add_argument(
        "--no-verdict",
        action="store_true",
        help="Skip the OK / NG verdict metrics (image AUROC, F1-max, precision / recall / FPR at the stored "
        "threshold).",
    )
    parser.add_argument("--name", default=None, help="Row name in the tables (default: the model path).")
    add_output_dir_option(
        parser,
        "folder for eval_results.json / .md (comparison.md with --compare)",
        required=False,
        default="eval",
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="MODEL:METHOD=RESULTS.json", help="Build the STL/Base/Adaptive table."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.compare:
        table = compare(args.compare, args.split)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "comparison.md").write_text(table)
        print(table)
        return 0
    if not args.model or not args.dataset:
        parser.error("give a MODEL and a DATASET (or --compare)")
    image_sizes = {}
    for item in args.image_size:
        task, _, size = item.partition("=")
        if task not in TASKS or not size.isdigit():
            parser.error(f"--image-size expects TASK=PX with TASK in cls/det/seg, got {item!r}")
        image_sizes[task] = int(size)

    def run() -> None:
        evaluation = evaluate_model(
            args.model,
            args.dataset,
            configs=args.configs,
            split=args.split,
            batch_size=args.batch_size,
            image_sizes=image_sizes,
            max_batches=args.max_batches,
            num_workers=args.num_workers,
            device=args.device,
            mixed_precision=args.mixed_precision,
            domain_conditioning=not args.no_domain_conditioning,
            verdict=not args.no_verdict,
        )
        write_evaluation(evaluation, args.output_dir, args.split, args.name or args.model)

    # a missing model or another kind of model: one line, no traceback
    return exit_status(run, (ModelLoadError,))


def write_evaluation(evaluation: dict, output_dir: Path, split: str, name: str) -> None:
    """eval_results.json / .md in `output_dir` (main process only), the tables printed."""
    from accelerate import PartialState

    from cadmtl.evaluation.reporting import domain_tables

    if not PartialState().is_main_process:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_results.json").write_text(json.dumps(evaluation, indent=2))
    tables = domain_tables({name: evaluation["results"]})
    report = (evaluation.get("verdict") or {}).get("report")
    if report is not None:
        from cadmtl.evaluation.verdict import verdict_table

        tables += "\n\n**OK / NG verdict**\n\n" + verdict_table({split: report}) + "\n"
    (output_dir / "eval_results.md").write_text(tables)
    print(tables)


if __name__ == "__main__":
    sys.exit(main())
