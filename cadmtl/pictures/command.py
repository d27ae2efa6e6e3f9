"""Command line for prediction overlays and evaluation charts.

    python -m cadmtl.pictures.command predict MODEL_DIR IMAGES... --output-dir DIR [--threshold 0.3]
    python -m cadmtl.pictures.command charts EVAL_RESULTS_JSON --output-dir DIR

`predict` runs the model (a saved folder or a Hub repo id) on image files and folders and writes one overlay PNG
per image; `charts` draws the per-class bars and confusion matrices of an `eval_results.json`. The work is done by
`cadmtl.pictures.overlays`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cadmtl.pictures.overlays import TASKS, collect_images, plot_evaluation, render_predictions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cadmtl.pictures.command",
        description="Draw CadMtl predictions on images, or chart an evaluation run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="write prediction overlays (masks, boxes, classes) as PNG")
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

    charts = commands.add_parser("charts", help="per-class bar charts and confusion matrices of eval results")
    charts.add_argument("eval_results", help="eval_results.json written by training or evaluation")
    charts.add_argument("--output-dir", required=True, help="folder for the PNG charts")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "predict":
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
        else:
            written = plot_evaluation(args.eval_results, args.output_dir)
            print(f"wrote {len(written)} charts to {args.output_dir}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
