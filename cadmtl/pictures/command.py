"""`cadmtl predict` (prediction overlays) and `cadmtl charts` (evaluation charts).

    cadmtl predict outputs/cadmtl-demo/model photos/ --output-dir overlays/ [--threshold 0.3]
    cadmtl charts outputs/cadmtl-demo/eval_results.json --output-dir charts/

`predict` runs the model (a saved folder or a Hub repo id) on image files and folders and writes one overlay PNG
per image; `charts` draws the per-class bars and confusion matrices of an `eval_results.json`, and for detection
configs the precision-recall, F1 / precision / recall-confidence curves and the detection confusion matrix (see
`cadmtl.pictures.charts.plot_evaluation` for the file names). The work is done by
`cadmtl.pictures.predict` and `cadmtl.pictures.charts`. `python -m cadmtl.pictures.command {predict,charts} ...` is an alias.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cadmtl.pictures.charts import plot_evaluation
from cadmtl.pictures.predict import TASKS, collect_images, render_predictions

PREDICT_EXAMPLE = (
    "example:\n  cadmtl predict outputs/cadmtl-demo/model photos/ --output-dir overlays/ --threshold 0.3"
)
CHARTS_EXAMPLE = "example:\n  cadmtl charts outputs/cadmtl-demo/eval_results.json --output-dir charts/"


def _add_predict_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument("model", help="saved model folder or Hub repo id")
    predict.add_argument("images", nargs="+", help="image files and/or folders (walked recursively)")
    predict.add_argument("--output-dir", required=True, help="folder for the overlays (mirrors input names)")
    predict.add_argument("--threshold", type=float, default=0.3, help="minimum detection score to draw")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed in the banner")
    predict.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which predictions to draw"
    )
    predict.add_argument("--device", default="cpu", help='where the model runs: "cpu", "cuda", "cuda:1", ...')
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass")


def _add_charts_arguments(charts: argparse.ArgumentParser) -> None:
    charts.add_argument("eval_results", help="eval_results.json written by training or evaluation")
    charts.add_argument("--output-dir", required=True, help="folder for the PNG charts")


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
    found = len(collect_images(args.images, exclude=args.output_dir))
    written = render_predictions(
        args.model,
        args.images,
        args.output_dir,
        det_threshold=args.threshold,
        top_k_classes=args.top_k,
        tasks=args.tasks,
        device=args.device,
        batch_size=args.batch_size,
    )
    skipped = found - len(written)
    print(
        f"wrote {len(written)} overlays to {args.output_dir}"
        + (f" ({skipped} unreadable files skipped, listed above)" if skipped else "")
    )
    return 0


def run_charts(args: argparse.Namespace) -> int:
    written = plot_evaluation(args.eval_results, args.output_dir)
    print(f"wrote {len(written)} charts to {args.output_dir}")
    return 0


def _run(runner: object, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return runner(args)  # type: ignore[operator]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def predict_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "cadmtl predict",
        "Draw CadMtl predictions (masks, boxes, classes) on images.",
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cadmtl.pictures.command {predict,charts} ...` (the two commands under one alias)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"predict": predict_main, "charts": charts_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m cadmtl.pictures.command {predict,charts} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
