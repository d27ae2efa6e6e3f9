"""`cadmtl export`: export a saved model for serving.

    cadmtl export onnx outputs/cadmtl-demo/model onnx/ [--task det] [--image-size 512] [--opset 18]
    cadmtl export onnx outputs/ad-demo/model onnx-ad/              # a scorer / learner of `cadmtl anomaly`
    cadmtl export onnx outputs/reference-tiny/localizer.json onnx-ref/  # the reference localiser

Writes `onnx/model.onnx` (dynamic batch, input `pixel_values`, outputs named like the model's fields), the
processor (`preprocessor_config.json`) and the config (`config.json`, label names); `cadmtl.export.onnx.OnnxPredictor`
serves the folder with onnxruntime. The work is done by `cadmtl.export.onnx.export_onnx`. An anomaly model gives
`anomaly_maps` and `image_scores` (`cadmtl.export.anomaly.AnomalyOnnxPredictor`), the reference localiser
`difference_maps` and `patch_distances` of (reference, query) pairs (`LocalizerOnnxPredictor`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dataset_scripts.options import exit_status
from modeling_cadmtl.configuration_cadmtl import TASKS

EXAMPLE = """examples:
  cadmtl export onnx outputs/cadmtl-demo/model onnx/
  cadmtl export onnx outputs/cadmtl-demo/model onnx-det/ --task det --image-size 512
  cadmtl export onnx outputs/ad-demo/model onnx-ad/
  cadmtl export onnx outputs/reference-tiny/localizer.json onnx-ref/

then, in Python:
  from cadmtl.export.onnx import OnnxPredictor
  OnnxPredictor("onnx/").predict(images)  # {"classification", "detection", "segmentation", "verdict"}
  from cadmtl.export.anomaly import AnomalyOnnxPredictor, LocalizerOnnxPredictor
  AnomalyOnnxPredictor("onnx-ad/").predict(images)  # [{"anomaly_map", "score", "verdict", "mask"}, ...]
  LocalizerOnnxPredictor("onnx-ref/").predict(references, queries)  # [{"boxes", "scores", "map", ...}, ...]"""


def onnx_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl export onnx",
        description="Export MODEL to OUTPUT_DIR/model.onnx (torch.onnx dynamo exporter, dynamic batch, no NMS in the "
        "graph) with its preprocessor_config.json and config.json. MODEL is a CadMtl model, an anomaly model "
        "(DIR/model of `cadmtl anomaly fit / train`) or a reference localiser (localizer.json).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="saved model folder (with model.safetensors: CadMtl, or an anomaly scorer / learner), Hub repo id, "
        "or a reference localiser's localizer.json (or its folder)",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUTPUT_DIR",
        help="folder for model.onnx, preprocessor_config.json and config.json (localizer.json)",
    )
    parser.add_argument(
        "--task", choices=TASKS, default=None, help="CadMtl: export only this head (default: all three)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="CadMtl: fixed square input size in pixels (default: the head's training size from the processor; "
        "with all heads trained at different sizes, height and width are dynamic); anomaly models and localisers "
        "keep the size they were fitted at",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    return parser


def onnx_main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl export onnx`."""
    args = onnx_parser().parse_args(argv)
    from cadmtl.export.onnx import export_onnx

    def export() -> None:
        path = export_onnx(
            args.model, args.out_dir, task=args.task, image_size=args.image_size, opset=args.opset
        )
        extra = "localizer.json" if (path.parent / "localizer.json").is_file() else "config.json"
        print(f"wrote {path} (+ preprocessor_config.json, {extra})")

    return exit_status(export, prefix="cadmtl export onnx")
