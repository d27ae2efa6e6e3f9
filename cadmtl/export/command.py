"""`cadmtl export`: export a saved model for serving.

    cadmtl export onnx outputs/cadmtl-demo/model onnx/ [--task det] [--image-size 512] [--opset 18]

Writes `onnx/model.onnx` (dynamic batch, input `pixel_values`, outputs named like the model's fields), the
processor (`preprocessor_config.json`) and the config (`config.json`, label names); `cadmtl.export.onnx.OnnxPredictor`
serves the folder with onnxruntime. The work is done by `cadmtl.export.onnx.export_onnx`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modeling_cadmtl.configuration_cadmtl import TASKS

EXAMPLE = """examples:
  cadmtl export onnx outputs/cadmtl-demo/model onnx/
  cadmtl export onnx outputs/cadmtl-demo/model onnx-det/ --task det --image-size 512

then, in Python:
  from cadmtl.export.onnx import OnnxPredictor
  OnnxPredictor("onnx/").predict(images)  # {"classification", "detection", "segmentation", "verdict"}"""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="cadmtl export",
        description="Export a saved CadMtl model for serving.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = root.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx",
        help="ONNX graph + processor + config, for onnxruntime",
        description="Export MODEL to OUT_DIR/model.onnx (torch.onnx dynamo exporter, dynamic batch, no NMS in the "
        "graph) with its preprocessor_config.json and config.json.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    onnx.add_argument("model", help="saved model folder (with model.safetensors) or Hub repo id")
    onnx.add_argument("out_dir", help="folder for model.onnx, preprocessor_config.json and config.json")
    onnx.add_argument(
        "--task", choices=TASKS, default=None, help="export only this head (default: all three)"
    )
    onnx.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="fixed square input size in pixels (default: the head's training size from the processor; with all "
        "heads trained at different sizes, height and width are dynamic)",
    )
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from cadmtl.export.onnx import export_onnx

    try:
        path = export_onnx(
            args.model, args.out_dir, task=args.task, image_size=args.image_size, opset=args.opset
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"cadmtl export onnx: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (+ preprocessor_config.json, config.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
