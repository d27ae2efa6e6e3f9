"""`cadmtl predict` (COCO results, OK / NG verdicts, overlays) and `cadmtl charts` (evaluation charts).

    cadmtl predict outputs/cadmtl-demo/model photos/ "line/*.jpg" belt.mp4 --output-dir predict/ --video-fps 1
    cadmtl charts outputs/cadmtl-demo/eval_results.json --output-dir charts/

`predict` runs the model (a saved folder or a Hub repo id) on image files, folders, globs and videos and writes
`detections.json` (COCO results), `images.json` (COCO images + categories), `summary.csv` (verdict, anomaly_score,
top class, number of defects, error per image; an unreadable input's verdict is `error`) and one overlay PNG per image; `charts` draws the per-class bars and
confusion matrices of an `eval_results.json`, and for detection configs the precision-recall, F1 / precision /
recall-confidence curves and the detection confusion matrix (see `cadmtl.pictures.charts.plot_evaluation` for the
file names). The work is done by
`cadmtl.pictures.predict` and `cadmtl.pictures.charts`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from cadmtl.pictures.charts import plot_evaluation
from cadmtl.pictures.predict import TASKS, default_device, predict_files
from dataset_scripts.options import (
    add_batch_size_option,
    add_device_option,
    add_output_dir_option,
    add_threshold_option,
    add_tile_options,
    exit_status,
)

PREDICT_EXAMPLE = (
    "examples:\n"
    "  cadmtl predict outputs/cadmtl-demo/model photos/ --output-dir predict/ --threshold 0.3\n"
    '  cadmtl predict outputs/cadmtl-demo/model "line/**/*.jpg" belt.mp4 --output-dir predict/ --video-fps 2 --crops\n'
    "\n"
    "writes OUT/detections.json (COCO results; category_id = detection label index + 1), OUT/images.json\n"
    "(COCO images + categories: COCO('images.json').loadRes('detections.json') loads them), OUT/summary.csv\n"
    "(file_name, verdict, anomaly_score, top_class, top_class_score, num_defects, error; an input that cannot\n"
    "be read gets verdict `error` and its message in `error`) and the overlays.\n"
    "\n"
    "exit status: 0 every input was scored; 1 some could not be read (rows with their error in summary.csv,\n"
    "the rest scored and written); 2 none could be read, or bad arguments / model."
)
CHARTS_EXAMPLE = "example:\n  cadmtl charts outputs/cadmtl-demo/eval_results.json --output-dir charts/"


def _add_predict_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument("model", help="saved model folder or Hub repo id")
    predict.add_argument(
        "images",
        nargs="+",
        metavar="INPUTS",
        help="image files, folders (walked recursively), glob patterns (quoted) and video files",
    )
    add_output_dir_option(predict, "folder for the JSON / CSV results and the overlays")
    add_threshold_option(predict, 0.3, "minimum detection score to report, count and draw (default 0.3)")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed in the banner")
    predict.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which predictions to draw"
    )
    add_device_option(predict, "CUDA, else MPS, else CPU")
    add_batch_size_option(predict, 8)
    predict.add_argument(
        "--video-fps", type=float, default=1.0, help="frames taken per second of video (0: every frame)"
    )
    add_tile_options(
        predict,
        "the detection and segmentation heads see the tiles, merged back (boxes by NMS, masks stitched); default: "
        "the model's preprocessor_config.json (none: whole images)",
    )
    predict.add_argument("--crops", action="store_true", help="also write one PNG per detection under crops/")
    predict.add_argument("--no-overlays", action="store_true", help="write the JSON / CSV results only")


def _add_charts_arguments(charts: argparse.ArgumentParser) -> None:
    charts.add_argument("eval_results", help="eval_results.json written by training or evaluation")
    add_output_dir_option(charts, "folder for the PNG charts")


def _parser(prog: str, description: str, example: str, add: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add(parser)  # type: ignore[operator]
    return parser


def run_predict(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    run = predict_files(
        args.model,
        args.images,
        args.output_dir,
        det_threshold=args.threshold,
        top_k_classes=args.top_k,
        tasks=args.tasks,
        device=device,
        batch_size=args.batch_size,
        video_fps=args.video_fps,
        overlays=not args.no_overlays,
        crops=args.crops,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
    )
    verdicts = [row["verdict"] for row in run.rows if not row["error"]]
    failed = len(run.errors)
    info = json.loads((Path(args.output_dir) / "images.json").read_text())["info"]
    if info.get("verdict_status") == "uninformative":
        counts = f"no OK / NG (the model's verdict is uninformative: {info.get('verdict_reason')})"
    else:
        counts = f"{verdicts.count('NG')} NG, {verdicts.count('OK')} OK"
        if info.get("verdict_status") not in (None, "calibrated"):
            counts += f" (verdict threshold {info['verdict_status']}, not calibrated on labelled images)"
    print(
        f"scored {run.num_scored} images on {device}: {counts}, "
        f"{run.num_detections} detections"
        + (f"; {failed} unreadable inputs (errors in summary.csv)" if failed else "")
        + f"; wrote detections.json, images.json, summary.csv and {len(run.overlays)} overlays"
        + (f" and {len(run.crops)} crops" if args.crops else "")
        + f" to {args.output_dir}"
    )
    return 1 if failed else 0  # none scored: predict_files raised, exit 2


def run_charts(args: argparse.Namespace) -> int:
    written = plot_evaluation(args.eval_results, args.output_dir)
    print(f"wrote {len(written)} charts to {args.output_dir}")
    return 0


def _run(runner: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_status(lambda: runner(args), (FileNotFoundError, ImportError, ValueError))


def predict_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "cadmtl predict",
        "Run a CadMtl model on images and videos: COCO detections, OK / NG verdicts, overlays.",
        PREDICT_EXAMPLE,
        _add_predict_arguments,
    )
    return _run(run_predict, parser.parse_args(argv))


def charts_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "cadmtl charts",
        "Per-class bar charts and confusion matrices of eval results. For detection configs also\n"
        "<config>_pr_curve.png (precision-recall, mAP@0.5), _f1_curve.png / _p_curve.png / _r_curve.png\n"
        "(against confidence) and _confusion_matrix.png / _confusion_matrix_counts.png (with background).",
        CHARTS_EXAMPLE,
        _add_charts_arguments,
    )
    return _run(run_charts, parser.parse_args(argv))
