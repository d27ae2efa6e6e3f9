"""ONNX export of the normal-only anomaly models and of the reference localiser, with onnxruntime predictors that
reuse the PyTorch pre- and post-processing.

- **Anomaly models** (a folder written by `cadmtl anomaly fit` / `train`, i.e. `DIR/model`): `model.onnx` maps
  `pixel_values (batch, 3, H, W)` at the model's size to `anomaly_maps (batch, H, W)` and `image_scores (batch,)`,
  the fields of `AnomalyOutput`. The patch-memory scorer's memory bank is a constant of the graph and its nearest
  neighbours are searched in float32: exactly, or, with the model's `search_projection_dim`, on the seeded
  projection with `num_candidates` re-ranked exactly (as the PyTorch model does; a reduced `search_dtype` or an
  inverted file, `search_num_lists`, is not carried over: the graph then searches exactly), on the grid averaged
  over `query_stride` cells where that is set; the learner's four inpainting / rotation passes and its normal
  statistics are in the graph too. Beside it:
  `config.json` (with the calibrated thresholds) and `preprocessor_config.json` (`AnomalyImageProcessor`).
  `AnomalyOnnxPredictor` gives the maps at each image's size, the score, the OK / NG verdict and the defect mask.
- **Reference localiser** (the `localizer.json` of `cadmtl reference localize`, or its output folder): `model.onnx`
  maps `reference_pixel_values` and `query_pixel_values` (batch, 3, S, S) to `difference_maps (batch, S, S)` and
  `patch_distances (batch, h, w)`. `LocalizerOnnxPredictor` turns the distances into the map at each query's own
  size and boxes exactly as `cadmtl reference localize` does (`difference_map`, `boxes_from_map` at the saved
  threshold).

Both graphs have a dynamic batch and fixed spatial sizes (opset >= 18, torch.onnx dynamo exporter).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cadmtl.anomaly.models import load_anomaly_model
from cadmtl.features import PatchFeatureExtractor, load_backbone
from cadmtl.reference.localizer import (
    ReferenceLocalizer,
    boxes_from_map,
    difference_map,
    window_nearest_distance,
)
from modeling_cadmtl_anomaly import AnomalyImageProcessor, AnomalyLearnerConfig, PatchMemoryConfig
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization
from modeling_cadmtl_anomaly.image_processing_cadmtl_anomaly import image_size_of

__all__ = [
    "ANOMALY_OUTPUTS",
    "LOCALIZER_INPUTS",
    "LOCALIZER_OUTPUTS",
    "AnomalyOnnxPredictor",
    "LocalizerOnnxPredictor",
    "export_anomaly_onnx",
    "export_localizer_onnx",
]

ONNX_FILE = "model.onnx"
EXPORT_INFO_FILE = "onnx_export.json"
LOCALIZER_FILE = "localizer.json"
ANOMALY_MODEL_TYPES = (PatchMemoryConfig.model_type, AnomalyLearnerConfig.model_type)
ANOMALY_OUTPUTS = ("anomaly_maps", "image_scores")
LOCALIZER_INPUTS = ("reference_pixel_values", "query_pixel_values")
LOCALIZER_OUTPUTS = ("difference_maps", "patch_distances")


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    onnx_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    optimize: bool,
) -> None:
    """The dynamo export shared by both graphs: every input has one dynamic batch axis (the same for all)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    parameters_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            example,
            str(onnx_path),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes={name: {0: batch} for name in input_names},
            opset_version=opset,
            external_data=parameters_bytes
            > 1_800_000_000,  # one file unless protobuf's 2 GB limit forbids it
            optimize=optimize,
            verbose=False,
        )


# ------------------------------------------------------------------------------------------------ anomaly models
class _AnomalyGraph(nn.Module):
    """`pixel_values -> (anomaly_maps, image_scores)` of a scorer or learner (its Hub inference, `predict`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model.predict(pixel_values)
        return outputs.anomaly_maps, outputs.image_scores


def export_anomaly_onnx(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = 18, optimize: bool = True
) -> Path:
    """Export a saved patch-memory scorer or learner (`DIR/model`) to `out_dir/model.onnx` with its config and
    processor; returns the path of `model.onnx`.

    Raises:
        ModelLoadError: the folder does not exist, holds no weights or another kind of model.
    """
    # a dense memory stays float16 through `.float()` (`PatchMemoryModel._apply`), so in the graph: half the file
    model = load_anomaly_model(model_dir).float().eval()
    height, width = model.image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    example = (torch.randn(2, 3, height, width),)
    if hasattr(model, "export_index"):  # the scorer draws its search projection before tracing
        model.export_index()
    _export(_AnomalyGraph(model), example, onnx_path, ["pixel_values"], ANOMALY_OUTPUTS, opset, optimize)
    model.config.save_pretrained(out_dir)
    AnomalyImageProcessor.from_model_config(model.config).save_pretrained(out_dir)
    info = {
        "kind": "anomaly",
        "model_type": model.config.model_type,
        "inputs": ["pixel_values"],
        "outputs": list(ANOMALY_OUTPUTS),
        "input_size": [height, width],
        "opset": opset,
        "source": str(model_dir),
    }
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return onnx_path


def _session(folder: Path, providers: Sequence[Any] | None, options: Any | None) -> Any:
    import onnxruntime as ort

    from .onnx import session_options

    return ort.InferenceSession(
        str(folder / ONNX_FILE),
        sess_options=options if options is not None else session_options(),
        providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
    )


def _check_files(folder: Path, names: Sequence[str]) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: export it with `cadmtl export onnx MODEL {folder}`."
        )


def _check_names(folder: Path, what: str, found: Sequence[str], expected: Sequence[str]) -> None:
    if list(found) != list(expected):
        raise ValueError(
            f"{folder / ONNX_FILE} has {what} {list(found)}, expected {list(expected)}: it was not exported "
            "from this kind of model (export the model and its config together)."
        )


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    ):
        return [images]
    return list(images)


class AnomalyOnnxPredictor:
    """Runs an exported anomaly model (`model.onnx`, `config.json`, `preprocessor_config.json`) with onnxruntime
    and `AnomalyImageProcessor`'s pre- and post-processing.

    `predict(images)` returns one dict per image as `post_process_anomaly_maps` does: `anomaly_map` at the image's
    size, `score`, and with the config's calibrated thresholds `verdict` ("OK" / "NG") and `mask`. It scores
    through `AnomalyImageProcessor.predict`, the PyTorch model's path: by tiles when the model was fitted with
    them (the processor saved beside the graph holds its `tile_size`), or when `tile_size` / `tile_overlap` are
    given (they override the saved settings; the graph takes tiles at its fixed input size).
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
        from transformers import AutoConfig

        self.folder = Path(folder)
        _check_files(self.folder, (ONNX_FILE, "config.json", "preprocessor_config.json"))
        model_type = json.loads((self.folder / "config.json").read_text()).get("model_type")
        if model_type not in ANOMALY_MODEL_TYPES:
            raise ValueError(
                f"{self.folder / 'config.json'} is a {model_type!r} config, not an anomaly model "
                f"({', '.join(ANOMALY_MODEL_TYPES)}); serve CadMtl exports with OnnxPredictor."
            )
        self.config = AutoConfig.from_pretrained(self.folder)
        self.processor = AnomalyImageProcessor.from_pretrained(self.folder)
        if tile_size is not None or tile_overlap is not None:
            saved = self.processor.to_dict()
            self.processor = AnomalyImageProcessor.from_model_config(
                self.config,
                tile_size=tile_size if tile_size is not None else saved.get("tile_size"),
                tile_overlap=tile_overlap,
            )
        self.session = _session(self.folder, providers, options)
        _check_names(self.folder, "inputs", [i.name for i in self.session.get_inputs()], ["pixel_values"])
        _check_names(self.folder, "outputs", [o.name for o in self.session.get_outputs()], ANOMALY_OUTPUTS)

    @property
    def thresholds(self) -> dict[str, float | None]:
        return {
            "image_threshold": self.config.image_threshold,
            "pixel_threshold": self.config.pixel_threshold,
        }

    def run(self, pixel_values: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw outputs {"anomaly_maps", "image_scores"} of preprocessed `pixel_values (B, 3, H, W)`."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        values = self.session.run(
            None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        )
        return {name: torch.from_numpy(value) for name, value in zip(ANOMALY_OUTPUTS, values)}

    def predict(self, images: Any) -> list[dict[str, Any]]:
        """Results of one image (PIL / uint8 array / tensor) or a list of them."""
        images = _as_list(images)
        if not images:
            return []
        outputs = self.processor.predict(
            self.run, images, image_score=self.config.image_score, top_fraction=self.config.top_fraction
        )
        sizes = [image_size_of(image) for image in images]
        return self.processor.post_process_anomaly_maps(outputs, target_sizes=sizes, **self.thresholds)


# ------------------------------------------------------------------------------------------ reference localiser
class LocalizerGraph(nn.Module):
    """(reference, query) pixel values -> (difference maps at the input size, patch distances): the features, the
    windowed nearest-neighbour distances and the smoothing of `cadmtl reference localize`."""

    def __init__(
        self, extractor: PatchFeatureExtractor, localizer: ReferenceLocalizer, image_size: int
    ) -> None:
        super().__init__()
        self.extractor, self.localizer, self.image_size = extractor, localizer, image_size

    def forward(
        self, reference_pixel_values: torch.Tensor, query_pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.extractor(query_pixel_values).float()
        reference = self.extractor(reference_pixel_values).float()
        distances = window_nearest_distance(
            query, reference, self.localizer.window, self.localizer.chunk_size
        )
        size = (self.image_size, self.image_size)
        return difference_map(distances, size, self.localizer.sigma), distances


def _localizer_settings(settings: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(settings)
    path = path / LOCALIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pass the localizer.json of `cadmtl reference localize`."
        )
    run = json.loads(path.read_text())
    missing = [key for key in ("model", "layers", "image_size", "localizer") if key not in run]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: it is not the localizer.json of `cadmtl reference localize`."
        )
    return path, run


def export_localizer_onnx(
    settings: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = 18, optimize: bool = True
) -> Path:
    """Export the reference localiser described by a `localizer.json` (or the folder holding it) to
    `out_dir/model.onnx`, with the settings (`localizer.json`, threshold included) and the processor.

    The backbone is loaded as the localiser run loaded it (`model`; a preset's random weights from the run's
    `seed`, 0 when the file predates it)."""
    path, run = _localizer_settings(settings)
    backbone, described = load_backbone(run["model"], int(run.get("seed", 0)))
    extractor = PatchFeatureExtractor(backbone.float().eval(), run["layers"])
    localizer = ReferenceLocalizer.from_dict(run["localizer"])
    image_size = int(run["image_size"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    example = (torch.randn(2, 3, image_size, image_size), torch.randn(2, 3, image_size, image_size))
    graph = LocalizerGraph(extractor, localizer, image_size)
    _export(graph, example, onnx_path, LOCALIZER_INPUTS, LOCALIZER_OUTPUTS, opset, optimize)
    (out_dir / LOCALIZER_FILE).write_text(json.dumps({**run, "backbone": described}, indent=2) + "\n")
    mean, std = backbone_normalization(backbone.config)  # as the localiser run normalised (PairRunner)
    AnomalyImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std
    ).save_pretrained(out_dir)
    info = {
        "kind": "localizer",
        "inputs": list(LOCALIZER_INPUTS),
        "outputs": list(LOCALIZER_OUTPUTS),
        "input_size": [image_size, image_size],
        "opset": opset,
        "source": str(path),
    }
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return onnx_path


class LocalizerOnnxPredictor:
    """Runs an exported reference localiser (`model.onnx`, `localizer.json`, `preprocessor_config.json`) with
    onnxruntime; `predict(references, queries)` gives per pair what `ReferenceLocalizer.localize` gives: `map`
    (at the query's size), `score` (its maximum), `boxes` (N, 4) xyxy query pixels, `scores`, `mask`, and
    `has_anomaly` (boxes exist, i.e. score > the saved threshold)."""

    def __init__(
        self, folder: str | os.PathLike, *, providers: Sequence[Any] | None = None, options: Any | None = None
    ) -> None:
        self.folder = Path(folder)
        _check_files(self.folder, (ONNX_FILE, LOCALIZER_FILE, "preprocessor_config.json"))
        _, self.settings = _localizer_settings(self.folder)
        self.localizer = ReferenceLocalizer.from_dict(self.settings["localizer"])
        self.processor = AnomalyImageProcessor.from_pretrained(self.folder)
        self.session = _session(self.folder, providers, options)
        _check_names(self.folder, "inputs", [i.name for i in self.session.get_inputs()], LOCALIZER_INPUTS)
        _check_names(self.folder, "outputs", [o.name for o in self.session.get_outputs()], LOCALIZER_OUTPUTS)

    def run(
        self, reference_pixel_values: np.ndarray | torch.Tensor, query_pixel_values: np.ndarray | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The raw outputs {"difference_maps", "patch_distances"} of preprocessed pairs (B, 3, S, S) each."""
        feeds = {
            name: np.ascontiguousarray(
                value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32
            )
            for name, value in zip(LOCALIZER_INPUTS, (reference_pixel_values, query_pixel_values))
        }
        return {
            name: torch.from_numpy(v) for name, v in zip(LOCALIZER_OUTPUTS, self.session.run(None, feeds))
        }

    def predict(self, references: Any, queries: Any) -> list[dict[str, Any]]:
        """One result per (reference, query) pair; references and queries are images or lists of them."""
        references, queries = _as_list(references), _as_list(queries)
        if len(references) != len(queries):
            raise ValueError(f"got {len(references)} references for {len(queries)} queries")
        if not queries:
            return []
        outputs = self.run(
            self.processor(references)["pixel_values"], self.processor(queries)["pixel_values"]
        )
        results = []
        for distances, query in zip(outputs["patch_distances"], queries):
            anomaly_map = difference_map(distances[None], image_size_of(query), self.localizer.sigma)[0]
            boxes, scores, mask = boxes_from_map(
                anomaly_map, self.localizer.threshold, self.localizer.min_area
            )
            results.append(
                {
                    "boxes": boxes,
                    "scores": scores,
                    "mask": mask,
                    "map": anomaly_map,
                    "score": anomaly_map.max(),
                    "has_anomaly": bool(len(boxes)),
                }
            )
        return results
