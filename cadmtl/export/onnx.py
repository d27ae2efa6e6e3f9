"""ONNX export of a CadMtl model, and an onnxruntime predictor that reuses the image processor.

`export_onnx(model_dir, out_dir)` writes a folder that serves without PyTorch modelling code:

- `model.onnx`: `torch.onnx.export(..., dynamo=True)`, opset >= 18, input `pixel_values (batch, 3, H, W)` with a
  dynamic batch, outputs named like `CadMtlOutput`'s fields (`cls_logits`, `det_logits`, `det_centerness_logits`,
  `pred_boxes`, `seg_logits`; only those of the exported heads). NMS is not in the graph: it stays in
  `CadMtlImageProcessor.post_process_object_detection`.
- `preprocessor_config.json`: the processor, with the input size(s) the graph takes.
- `config.json`: the model config (label names of every head), which the predictor checks the graph against.

Input size: with `task`, the graph is fixed at that head's size (`task_sizes`, else `size`, or `image_size`). With
all heads and one size for all (or `image_size`), it is fixed at that size; when the heads were trained at
different sizes, H and W are dynamic (multiples of nothing in particular: the model pads inside) and
`OnnxPredictor` runs each head at its own size, like `cadmtl predict`. A fixed size lets onnxruntime fold more of
the graph (the position embeddings), so it is the faster choice when one size serves.

Anomaly models and the reference localiser are exported by the same call (see `cadmtl.export.anomaly`).

Example:

```python
from cadmtl.export.onnx import OnnxPredictor, export_onnx

export_onnx("outputs/cadmtl-demo/model", "onnx/")
predictor = OnnxPredictor("onnx/")
results = predictor.predict(images)  # {"classification": [...], "detection": [...], "segmentation": [...],
                                    #  "verdict": [{"verdict": "OK" | "NG", "anomaly_score", "head_scores"}, ...]}
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cadmtl.model_kinds import ANOMALY_MODEL_KINDS, CADMTL, LOCALIZER, load_pretrained, require_model_kind
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.tasks_cadmtl import TASK_DEFINITIONS, TASKS, get_task, output_fields, task_of_field

logger = logging.getLogger(__name__)

__all__ = ["MIN_OPSET", "OnnxPredictor", "export_onnx", "session_options"]

MIN_OPSET = 18
ONNX_FILE = "model.onnx"
EXPORT_INFO_FILE = "onnx_export.json"


class _ExportedHeads(torch.nn.Module):
    """`pixel_values -> (the output tensors of `tasks`)`, in `tasks_cadmtl.output_fields(tasks)` order (the graph's
    outputs are named like the fields of `CadMtlOutput`)."""

    def __init__(self, model: CadMtlModel, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.tasks = model, tasks

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, task=self.tasks[0] if len(self.tasks) == 1 else None)
        return tuple(getattr(outputs, field) for field in output_fields(self.tasks))


def _load_processor(model_dir: str | os.PathLike) -> CadMtlImageProcessor:
    try:
        return CadMtlImageProcessor.from_pretrained(model_dir)
    except OSError as error:
        logger.warning(
            "%s has no usable preprocessor_config.json (%s); using the default processor", model_dir, error
        )
        return CadMtlImageProcessor()


def _square_side(size: dict[str, int]) -> tuple[int, int] | None:
    height, width = size.get("height"), size.get("width")
    return (int(height), int(width)) if height and width else None


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str | None = None,
    image_size: int | None = None,
    opset: int = MIN_OPSET,
    optimize: bool = True,
) -> Path:
    """Export `model_dir` (a saved CadMtl folder or Hub repo id) to `out_dir/model.onnx` with its processor and
    config; returns the path of `model.onnx`. See the module docstring for the input size rules.

    `model_dir` may also be a saved anomaly model (`DIR/model` of `cadmtl anomaly fit / train`) or a reference
    localiser (`localizer.json` of `cadmtl reference localize`, or its folder): those are exported by
    `cadmtl.export.anomaly` (`task` and `image_size` do not apply: they are fixed by the fitted model).

    Raises:
        ModelLoadError: `model_dir` does not exist, holds no weights, weights that do not fit, or a kind of model
            that is not exported (the message names the command that serves it).
        ValueError: an unknown task, an image size that is not positive, an opset below 18.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (the dynamo exporter's minimum), got {opset}.")
    from .anomaly import export_anomaly_onnx, export_localizer_onnx

    info = require_model_kind(model_dir, CADMTL, *ANOMALY_MODEL_KINDS, LOCALIZER)
    if info.kind is not CADMTL:
        if task is not None or image_size is not None:
            raise ValueError(
                f"{model_dir} holds {info.holds}: --task and --image-size only apply to CadMtl models (its input "
                "size is the one it was fitted at)."
            )
        export = export_localizer_onnx if info.kind is LOCALIZER else export_anomaly_onnx
        return export(model_dir, out_dir, opset=opset, optimize=optimize)
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS} (or none for every head).")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    model = load_pretrained(CadMtlModel, model_dir, info.holds).float().eval()
    processor = _load_processor(model_dir)
    tasks = (task,) if task is not None else TASKS

    if image_size is not None:
        sizes = {(image_size, image_size)}
    else:
        sizes = {_square_side(processor.size_for(t)) for t in tasks}
    fixed = sizes.pop() if len(sizes) == 1 and None not in sizes else None
    if fixed is not None:  # the graph takes one size: so does the processor saved with it, for every task
        settings = {
            **processor.to_dict(),
            "size": {"height": fixed[0], "width": fixed[1]},
            "task_sizes": None,
        }
        export_processor = CadMtlImageProcessor.from_dict(settings)
        example_side = fixed
    else:
        export_processor, example_side = processor, (64, 96)
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, Any] = {0: batch}
    if fixed is None:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    example = torch.randn(2, 3, *example_side)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    parameters_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    output_names = list(output_fields(tasks))
    with torch.no_grad():
        torch.onnx.export(
            _ExportedHeads(model, tasks).eval(),
            (example,),
            str(onnx_path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names,
            dynamic_shapes={"pixel_values": axes},
            opset_version=opset,
            external_data=parameters_bytes
            > 1_800_000_000,  # one file unless protobuf's 2 GB limit forbids it
            optimize=optimize,
            verbose=False,
        )
    export_processor.save_pretrained(out_dir)
    model.config.save_pretrained(out_dir)
    info = {
        "tasks": list(tasks),
        "outputs": output_names,
        "input_size": list(fixed) if fixed is not None else "dynamic",
        "opset": opset,
        "source": str(model_dir),
    }
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return onnx_path


def session_options(intra_op_num_threads: int | None = None, optimization: str = "all") -> Any:
    """onnxruntime `SessionOptions`: graph optimisation level `optimization` ("basic", "extended", "all",
    "disable"), sequential execution, and `intra_op_num_threads` threads (default: onnxruntime's, one per core)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_num_threads:
        options.intra_op_num_threads = intra_op_num_threads
    options.log_severity_level = 3
    return options


class OnnxPredictor:
    """Runs an exported folder (`model.onnx`, `config.json`, `preprocessor_config.json`) with onnxruntime, with
    `CadMtlImageProcessor`'s pre- and post-processing.

    `predict(images)` returns `{"classification": [...], "detection": [...], "segmentation": [...]}` (the heads the
    graph has), one entry per image in the formats of the processor's `post_process_image_classification`,
    `post_process_object_detection` and `post_process_semantic_segmentation` (boxes and masks at each image's
    original size), and `"verdict"`: the OK / NG verdict of each image from the config's calibrated threshold.

    High-resolution inspection: with `tile_size` / `tile_overlap` (or the settings in the exported
    `preprocessor_config.json`) the detection and segmentation heads run on overlapping tiles merged back by the
    processor, exactly as for the PyTorch model (`CadMtlImageProcessor.predict`).

    Raises at construction: `FileNotFoundError` when a file is missing, `ValueError` when the graph's outputs do
    not match the config (an unknown output, or a class count that differs from the config's labels).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        providers: Sequence[Any] | None = None,
        options: Any | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        missing = [
            name
            for name in (ONNX_FILE, "config.json", "preprocessor_config.json")
            if not (self.folder / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{self.folder} lacks {', '.join(missing)}: export it with `cadmtl export onnx MODEL {self.folder}`."
            )
        self.config = CadMtlConfig.from_pretrained(self.folder)
        self.processor = CadMtlImageProcessor.from_pretrained(self.folder)
        self.processor.set_tiles(tile_size, tile_overlap)  # default: the tiles saved with the export
        self.session = ort.InferenceSession(
            str(self.folder / ONNX_FILE),
            sess_options=options if options is not None else session_options(),
            providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
        )
        self.output_names = [output.name for output in self.session.get_outputs()]
        self._check_outputs()
        self.tasks = tuple(t for t in TASKS if get_task(t).output_fields[0] in self.output_names)
        input_shape = self.session.get_inputs()[0].shape
        self.input_size = tuple(input_shape[2:]) if all(isinstance(d, int) for d in input_shape[2:]) else None
        if self.input_size is not None:  # a graph of fixed size takes that size for every head
            self.processor.size = {"height": self.input_size[0], "width": self.input_size[1]}
            self.processor.task_sizes = None

    def _check_outputs(self) -> None:
        unknown = [name for name in self.output_names if task_of_field(name) is None]
        if unknown:
            raise ValueError(
                f"{self.folder / ONNX_FILE} has outputs {unknown} that are not CadMtl outputs "
                f"(expected some of {list(output_fields(TASKS))})."
            )
        for task, fields in ((task.name, task.output_fields) for task in TASK_DEFINITIONS.values()):
            present = [field for field in fields if field in self.output_names]
            if present and len(present) != len(fields):
                raise ValueError(
                    f"{self.folder / ONNX_FILE}: the {task} head needs the outputs {list(fields)}, found only {present}."
                )
        # (output, axis holding the classes, task) for the outputs that carry one score per class
        class_axes = [
            (task.output_fields[0], task.class_axis, task.name) for task in TASK_DEFINITIONS.values()
        ]
        shapes = {output.name: output.shape for output in self.session.get_outputs()}
        for name, axis, task in class_axes:
            if name not in shapes:
                continue
            classes = shapes[name][axis]
            expected = len(self.config.labels_for(task))
            if isinstance(classes, int) and classes != expected:
                raise ValueError(
                    f"{self.folder / ONNX_FILE}: output {name} has {classes} classes but config.json has "
                    f"{expected} {task}_labels {self.config.labels_for(task)}; the graph and the config come from "
                    "different models (export them together)."
                )

    def run(self, pixel_values: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw outputs `{name: tensor}` for preprocessed `pixel_values (B, 3, H, W)`."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        values = self.session.run(
            None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        )
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, values)}

    def __call__(
        self, pixel_values: np.ndarray | torch.Tensor, task: str | None = None, pixel_mask: Any = None
    ) -> dict[str, torch.Tensor]:
        """`run`, called like `CadMtlModel` so the processor's one inference path (`forward_size_groups`) drives
        the graph. The graph computes all its heads whatever `task` is, and takes no pixel mask: padded images
        (an aspect-preserving size) would be scored as if the padding were image."""
        if pixel_mask is not None and not bool(torch.as_tensor(pixel_mask).all()):
            raise ValueError(
                f"{self.folder / ONNX_FILE} takes no pixel_mask: give images of one aspect ratio, or export with a "
                "fixed size (height and width) in preprocessor_config.json."
            )
        return self.run(pixel_values)

    def predict(
        self,
        images: Image.Image | Sequence[Image.Image] | Any,
        *,
        det_threshold: float = 0.3,
        top_k: int = 5,
        nms_threshold: float = 0.6,
        verdict_threshold: float | None = None,
    ) -> dict[str, list[Any]]:
        """Predictions of every exported head for `images` (one PIL image / array or a list of them), and the
        OK / NG verdict of each image under `"verdict"`: `{"verdict", "anomaly_score", "head_scores"}` from the
        config's `verdict_source` and calibrated `verdict_threshold` (`verdict_threshold` overrides it), as
        `CadMtlImageProcessor.post_process_verdict` gives it for the PyTorch model. It is left out when the graph
        lacks the head the verdict reads; with `"max"` it is the maximum over the exported heads."""
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        ):
            images = [images]
        images = list(images)
        verdict_heads = tuple(head for head in self.config.verdict_heads if head in self.tasks)
        gives_verdict = bool(verdict_heads) and self.config.verdict_source in ("max", *verdict_heads)
        if not images:
            return {get_task(task).result_key: [] for task in self.tasks} | (
                {"verdict": []} if gives_verdict else {}
            )
        target_sizes = [_image_size(image) for image in images]
        outputs = self.processor.predict(self, images, self.tasks)
        # the call options of the heads' post-processing; each takes its `TaskDefinition.post_process_options`
        options = {
            "top_k": top_k,
            "id2label": dict(enumerate(self.config.cls_labels)),
            "threshold": det_threshold,
            "target_sizes": target_sizes,
            "nms_threshold": nms_threshold,
        }
        results: dict[str, list[Any]] = {}
        for task in map(get_task, self.tasks):
            post_process = getattr(self.processor, task.post_process)
            results[task.result_key] = post_process(
                outputs, **{key: options[key] for key in task.post_process_options}
            )
        if gives_verdict:
            threshold = self.config.verdict_threshold if verdict_threshold is None else verdict_threshold
            results["verdict"] = self.processor.post_process_anomaly_score(
                outputs,
                source=self.config.verdict_source,
                threshold=threshold,
                normal_class_id=self.config.normal_class_id,
                heads=verdict_heads,
            )
        return results


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an HWC / CHW array or a CHW tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]
    return shape[0], shape[1]
