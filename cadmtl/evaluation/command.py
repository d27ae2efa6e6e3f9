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
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dataset_scripts.schema import TASKS

logger = logging.getLogger("cadmtl.evaluation.command")


def evaluate_model(
    model_name_or_path: str,
    dataset: str,
    *,
    configs: list[str] | None = None,
    split: str = "test",
    batch_size: int = 16,
    image_sizes: dict[str, int] | None = None,
    max_batches: int | None = None,
    num_workers: int = 0,
    device: str | None = None,
    mixed_precision: str = "bf16",
    domain_conditioning: bool = True,
    verdict: bool = True,
) -> dict[str, Any]:
    """Metrics of `model_name_or_path` on `split` of each dataset config: the content of eval_results.json.

    With `verdict`, also the OK / NG verdict on those configs' images pooled (every CAD config has `is_normal`),
    at the model's stored `verdict_source` / `verdict_threshold`: image AUROC and F1-max per source, precision /
    recall / false-positive rate at the threshold."""
    from accelerate import PartialState

    from cadmtl.data.sources import LoaderSettings, attach_label_maps, available_configs, discover_sources
    from cadmtl.evaluation.loop import evaluate_sources
    from dataset_scripts.schema import task_of_config
    from modeling_cadmtl import CadMtlModel

    state = PartialState(cpu=device == "cpu")
    model = CadMtlModel.from_pretrained(model_name_or_path).to(state.device).eval()
    tasks_with_heads = TASKS
    configs = configs or [c for c in available_configs(dataset) if task_of_config(c) in tasks_with_heads]
    by_task: dict[str, list[str]] = defaultdict(list)
    for config in configs:
        by_task[task_of_config(config)].append(config)
    sources = discover_sources(dataset, dict(by_task), split)
    for task, task_sources in sources.items():
        attach_label_maps(task_sources, model.config.labels_for(task))
    sizes = {"cls": 224, "det": 512, "seg": 512, **(model.config.image_sizes or {}), **(image_sizes or {})}
    settings = LoaderSettings(
        dataset=dataset,
        split=split,
        image_sizes=sizes,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=0,
        seed=0,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    # bf16 by default, as train_accelerate.py evaluates, so both report the same numbers for the same model.
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mixed_precision]
    labels = {task: model.config.labels_for(task) for task in sources}
    results = evaluate_sources(
        model,
        sources,
        settings,
        labels,
        batch_size=batch_size,
        device=state.device,
        autocast_dtype=autocast,
        max_batches=max_batches,
        show_progress=state.is_local_main_process,
        domain_conditioning=domain_conditioning,
    )
    evaluation = {
        "model": str(model_name_or_path),
        "dataset": dataset,
        "split": split,
        "image_sizes": {task: sizes[task] for task in sources},
        "mixed_precision": mixed_precision,
        "domain_conditioning": domain_conditioning,
        "results": results,
    }
    if verdict:
        evaluation["verdict"] = evaluate_verdict(
            model, dataset, configs, split, sizes, state, batch_size, num_workers, autocast, max_batches
        )
    return evaluation


def evaluate_verdict(
    model: Any,
    dataset: str,
    configs: list[str],
    split: str,
    sizes: dict[str, int],
    state: Any,
    batch_size: int,
    num_workers: int,
    autocast: torch.dtype | None,
    max_batches: int | None,
) -> dict[str, Any]:
    """The OK / NG verdict metrics of the model on the images of `configs`' `split` (pooled), at the source and
    threshold stored in its config: `{"source", "threshold", "calibration", "report"}` (`report` is None with
    the reason when the model's heads give no anomaly score)."""
    from cadmtl.evaluation.verdict import score_verdict_split, verdict_report

    config = model.config
    result: dict[str, Any] = {
        "source": config.verdict_source,
        "threshold": config.verdict_threshold,
        "calibration": config.verdict_calibration,
        "report": None,
    }
    if not config.verdict_heads:
        result["reason"] = "no trained head gives an anomaly score"
        return result
    scores = score_verdict_split(
        model,
        dataset,
        configs,
        split,
        image_sizes=sizes,
        heads=config.verdict_heads,
        normal_class_id=config.normal_class_id,
        device=state.device,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=state.process_index,
        world_size=state.num_processes,
        autocast_dtype=autocast,
        max_batches=max_batches,
        show_progress=state.is_local_main_process,
    )
    result["report"] = verdict_report(scores, config.verdict_source, config.verdict_threshold, split)
    return result


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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--image-size", nargs="+", default=[], metavar="TASK=PX", help="e.g. det=512 (default: the model's)."
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, help="Cap the batches per config (smoke runs)."
    )
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu to force the CPU.")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"])
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
    parser.add_argument("--output-dir", type=Path, default=Path("eval"))
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
    from accelerate import PartialState

    from cadmtl.evaluation.reporting import domain_tables

    if PartialState().is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "eval_results.json").write_text(json.dumps(evaluation, indent=2))
        tables = domain_tables({args.name or args.model: evaluation["results"]})
        report = (evaluation.get("verdict") or {}).get("report")
        if report is not None:
            from cadmtl.evaluation.verdict import verdict_table

            tables += "\n\n**OK / NG verdict**\n\n" + verdict_table({args.split: report}) + "\n"
        (args.output_dir / "eval_results.md").write_text(tables)
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
