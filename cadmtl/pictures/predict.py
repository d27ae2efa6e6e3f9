"""Running a saved CadMtl model on image files, folders, globs and videos: COCO results, a verdict per image, overlays.

Example:

```python
from cadmtl.pictures.predict import Predictor, predict_files

run = predict_files("outputs/cadmtl-demo/model", ["photos/", "line/*.jpg", "belt.mp4"], "outputs/predict")
predictor = Predictor.from_pretrained("outputs/cadmtl-demo/model")  # one image at a time (the demo app)
(result,) = predictor([image])  # result.verdict, result.anomaly_score, result.prediction (boxes, mask, classes)
```

[`predict_files`] writes, under its output folder:

- `detections.json`: COCO results, one `{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score",
  "file_name"}` per detection at or above the threshold. `category_id` is the detection label index **+ 1**, as in
  the evaluation's COCO ground truth (`cadmtl.evaluation.metrics`); the names are the `categories` of `images.json`.
- `images.json`: a COCO dataset without annotations, `{"info", "images": [{"id", "file_name", "width",
  "height"}], "annotations": [], "categories": [{"id", "name"}]}`, so that
  `COCO("images.json").loadRes("detections.json")` loads the results (pycocotools needs `categories` there, and
  `loadRes` refuses an empty results list). Image ids start at 1, in input order.
- `summary.csv`: one row per image or video frame: `file_name`, `verdict` (`OK` / `NG`; `uninformative` for a
  model whose `config.verdict_status` says its score does not separate normal from anomalous images), `anomaly_score`,
  `top_class`, `top_class_score`, `num_defects` (detections at or above the threshold), `error`. An input that
  cannot be read (corrupt, truncated, not an image, a video that cannot be decoded) gets a row with its
  `file_name`, verdict `error` and the message in `error`; it is never scored, and the other inputs go on (the
  score columns of every command: `dataset_scripts.options.SCORE_COLUMNS`).
- one overlay PNG per image (mirroring the input names with `.png`; a video's frames go to a folder named after
  the video, one `<seconds>s.png` per frame) and, with `crops=True`, `crops/<overlay name>/<k>_<label>.png`.

A video frame's `file_name` is the video path with a media-fragment time, `belt.mp4#t=2.000`. Videos are decoded
with PyAV (`pip install 'cad-mtl[video]'`): torchvision 0.29 no longer reads video.

The verdict is the processor's `post_process_anomaly_score` with the model config's `verdict_source`,
`verdict_threshold` (calibrated at the end of training) and `normal_class_id`; its `anomaly_score` is in [0, 1].
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

from cadmtl.pictures.overlays import ImagePrediction, draw_predictions
from cadmtl.tasks import get_cadmtl_task
from dataset_scripts.images import to_rgb
from dataset_scripts.options import ERROR_VERDICT
from dataset_scripts.safe_paths import safe_file_name, safe_output_path
from dataset_scripts.schema import TASKS

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SUMMARY_COLUMNS",
    "TASKS",
    "VIDEO_EXTENSIONS",
    "ImageResult",
    "ImageSource",
    "PredictRun",
    "Predictor",
    "collect_images",
    "default_device",
    "iter_video_frames",
    "load_image",
    "max_image_pixels",
    "predict_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
SUMMARY_COLUMNS = (  # holds SCORE_COLUMNS
    "file_name",
    "verdict",
    "anomaly_score",
    "top_class",
    "top_class_score",
    "num_defects",
    "error",
)
_GLOB_CHARACTERS = frozenset("*?[")

# ----------------------------------------------------------------------------------------------------------
# Finding and reading images
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """An input file and the relative path its overlay gets under the output folder.

    For a video (`is_video`), `output_name` is the folder its frames' overlays go to (the video's own name).
    """

    path: Path
    output_name: Path
    is_video: bool = False


def _expand(item: str | os.PathLike) -> list[Path]:
    """`item` as paths: itself when it exists or holds no glob character, else its sorted glob matches."""
    text = os.fspath(item)
    if Path(text).exists() or not _GLOB_CHARACTERS & set(text):
        return [Path(text)]
    matches = sorted(glob.glob(text, recursive=True))
    if not matches:
        raise FileNotFoundError(f"collect_images: the pattern {text} matches no file")
    return [Path(match) for match in matches]


def collect_images(
    inputs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None, *, videos: bool = False
) -> list[ImageSource]:
    """The image (and, with `videos=True`, video) files named by `inputs` and the names their overlays will get.

    `inputs` are files, folders and glob patterns (`"line/**/*.jpg"`, expanded when no such file exists). Folders
    are walked recursively for `IMAGE_EXTENSIONS` (and `VIDEO_EXTENSIONS`) in any letter case (sorted, so the
    order is stable); files named explicitly are taken whatever their extension (a `.tif` works if PIL reads it;
    with `videos=True` a file with a video extension is a video). An overlay keeps the path relative to its
    folder, with `.png` as extension; with several inputs each folder's images go under a sub-folder named after
    it. When two images would get the same name (`a.jpg` and `a.png`) both keep their original extension
    (`a.jpg.png`, `a.png.png`). Files inside `exclude` (the output folder) are skipped so a second run does not
    draw on its own overlays.

    Raises:
        FileNotFoundError: an input does not exist, or a pattern matches nothing.
        ValueError: no input was given, or the inputs hold no image file.
    """
    inputs = [path for item in inputs for path in _expand(item)]
    if not inputs:
        raise ValueError("collect_images: no image file or folder was given")
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            prefix = Path(item.resolve().name) if len(inputs) > 1 else Path()
            # an output folder inside the input folder is skipped; one equal to it cannot be (nothing would be left)
            skip = excluded if excluded is not None and excluded != item.resolve() else None
            for path in sorted(item.rglob("*")):
                if not path.is_file() or path.suffix.lower() not in extensions:
                    continue
                if skip is not None and path.resolve().is_relative_to(skip):
                    continue
                found.append((path, prefix / path.relative_to(item)))
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"collect_images: {item} does not exist")
    if not found:
        raise ValueError(
            f"collect_images: no image files ({', '.join(extensions)}) in {', '.join(map(str, inputs))}"
        )
    return _unique_output_names(found, videos)


def _unique_output_names(found: list[tuple[Path, Path]], videos: bool) -> list[ImageSource]:
    def is_video(path: Path) -> bool:
        return videos and path.suffix.lower() in VIDEO_EXTENSIONS

    def first_choice(path: Path, relative: Path) -> Path:
        # a video's frames go to a folder named like the video file itself (`belt.mp4/`): no image overlay
        # (always `.png`) can take that name
        return relative if is_video(path) else relative.with_suffix(".png")

    counts: dict[Path, int] = {}
    for path, relative in found:
        counts[first_choice(path, relative)] = counts.get(first_choice(path, relative), 0) + 1
    sources, taken = [], set()
    for path, relative in found:
        name = first_choice(path, relative)
        if counts[name] > 1:
            name = relative.with_name(relative.name + ".png")
        # the same file reached through two inputs, or a.jpg.png next to a.jpg: number the later ones
        candidate, number = name, 2
        while candidate in taken:
            candidate = name.with_name(f"{name.stem}-{number}{name.suffix}")
            number += 1
        taken.add(candidate)
        sources.append(ImageSource(path, candidate, is_video(path)))
    return sources


# Pixel budget of an image read for inference (`cadmtl predict`, `cadmtl anomaly predict`, the demo app): larger
# images are downscaled on load, so one 48 MP upload cannot take gigabytes. 0 in the variable: no budget.
MAX_IMAGE_PIXELS_VARIABLE = "CADMTL_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 12_000_000


def max_image_pixels() -> int | None:
    """The pixel budget of [`load_image`]: `CADMTL_MAX_IMAGE_PIXELS` (an integer, 0 = none), default 12 MP."""
    text = os.environ.get(MAX_IMAGE_PIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        budget = int(float(text))
    except ValueError:
        raise ValueError(
            f"{MAX_IMAGE_PIXELS_VARIABLE}={text!r} is not a number of pixels (0: no budget)"
        ) from None
    if budget < 0:
        raise ValueError(f"{MAX_IMAGE_PIXELS_VARIABLE}={text!r} must be >= 0 (0: no budget)")
    return budget or None


def _within_budget(width: int, height: int, budget: int) -> tuple[int, int]:
    """The largest (width, height) with the same aspect ratio and at most `budget` pixels."""
    scale = math.sqrt(budget / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image (its first frame for multi-frame files).

    EXIF orientation is applied (the overlay looks like the photo does in a viewer, and the model sees the same
    pixels); every mode is converted by the project's one rule, :func:`dataset_scripts.images.to_rgb`. A truncated
    file raises `OSError` even where something set PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` (which would otherwise
    fill the missing part with grey and let it be scored as a partial image).

    An image of more than `max_pixels` pixels (None: [`max_image_pixels`], i.e. `CADMTL_MAX_IMAGE_PIXELS` or 12 MP;
    0: no budget) is downscaled to fit it, keeping its aspect ratio: a JPEG is decoded at a reduced scale directly
    (PIL's `draft`, so the full-size pixels never exist in memory), then resized. Everything downstream (boxes,
    overlays, `images.json` sizes) is then in the downscaled image's pixels. Pillow's own decompression-bomb
    check still applies first: a file claiming more than twice `PIL.Image.MAX_IMAGE_PIXELS` (~179 MP) raises
    `PIL.Image.DecompressionBombError` before anything is decoded.
    """
    budget = max_image_pixels() if max_pixels is None else max_pixels
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as opened:
            original = opened.size
            if budget and original[0] * original[1] > budget:
                opened.draft(
                    opened.mode, _within_budget(*original, budget)
                )  # JPEG: decode at 1/2, 1/4 or 1/8
            opened.load()
            image = ImageOps.exif_transpose(opened)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    image = to_rgb(image)
    if budget and image.width * image.height > budget:
        image = image.resize(_within_budget(image.width, image.height, budget), Image.Resampling.BILINEAR)
    if image.size not in (original, original[::-1]):
        logger.info(
            "%s: %dx%d (%.1f MP) downscaled to %dx%d, the %s pixel budget (%s)",
            path,
            *original,
            original[0] * original[1] / 1e6,
            *image.size,
            f"{budget:,}",
            MAX_IMAGE_PIXELS_VARIABLE,
        )
    return image


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def iter_video_frames(path: str | os.PathLike, fps: float = 1.0) -> Iterator[tuple[float, Image.Image]]:
    """(time in seconds, RGB frame) of a video file, `fps` frames per second of video (the first frame at or after
    each multiple of `1 / fps`); `fps <= 0` gives every frame. Decoded by PyAV.

    Raises:
        ImportError: PyAV is not installed (`pip install 'cad-mtl[video]'`).
        ValueError: the file has no video stream, or cannot be decoded (the message names the file).
    """
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"{path}: reading video needs PyAV (`pip install 'cad-mtl[video]'` or `pip install av`)"
        ) from error
    next_time, index = 0.0, 0
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else index / rate
                index += 1
                if fps > 0 and time + 1e-6 < next_time:
                    continue
                if fps > 0:
                    next_time = (math.floor(time * fps + 1e-6) + 1) / fps
                yield time, frame.to_image().convert("RGB")
    except av.FFmpegError as error:
        reason = getattr(error, "strerror", None) or error  # FFmpeg's message without the repeated file name
        raise ValueError(f"{path}: the video cannot be decoded after {index} frames ({reason})") from error


@dataclass
class _Item:
    """One image to score (or an input that failed, with `error`): what a row of summary.csv is about."""

    file_name: str
    output_name: Path | None
    image: Image.Image | None = None
    error: str = ""


def _read_items(sources: Sequence[ImageSource], video_fps: float) -> Iterator[_Item]:
    for source in sources:
        if not source.is_video:
            try:
                yield _Item(str(source.path), source.output_name, load_image(source.path))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                # PIL reports truncated or non-image files as OSError, some broken headers as SyntaxError/ValueError
                yield _Item(str(source.path), source.output_name, error=_reason(error))
            continue
        try:
            for time, frame in iter_video_frames(source.path, video_fps):
                name = f"{time:.3f}s.png"
                yield _Item(f"{source.path}#t={time:.3f}", source.output_name / name, frame)
        except (ImportError, OSError, ValueError) as error:
            yield _Item(str(source.path), None, error=_reason(error))


# ----------------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------------

# Logits resized to a large photo cost classes x height x width floats (and an argmax over them); above this many
# the class map is computed at a smaller size and enlarged with nearest neighbour. The decoder's output is far
# coarser than either size, so the map looks the same; 2**23 keeps a 12 MP photo's map at ~0.2 GB and ~1 s.
_MAX_SEGMENTATION_LOGITS = 2**23


def default_device() -> str:
    """Where inference runs when nobody says: CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class ImageResult:
    """Everything the model says about one image.

    Attributes:
        prediction: the top classes, the detections at or above the threshold and (when "seg" is one of the
            predictor's `tasks`) the segmentation class map, in the image's own pixels (see [`ImagePrediction`]).
        anomaly_score: the image-level anomaly score in [0, 1] from the config's `verdict_source` (None, and
            `verdict` "", for a model none of whose heads gives one: see `post_process_verdict`).
        head_scores: each head's anomaly score (`cls`, `det`, `seg`).
        verdict: `"OK"` or `"NG"` (score at or above the config's `verdict_threshold`).
    """

    prediction: ImagePrediction
    anomaly_score: float | None
    head_scores: dict[str, float] = field(default_factory=dict)
    verdict: str = "OK"


class Predictor:
    """A CadMtl model and its processor: PIL images in, [`ImageResult`]s out (the one inference path of
    `cadmtl predict` and the demo app).

    Every head runs (the `max` verdict reads all three, the COCO results and the summary need classes and
    boxes), each at the input size it was trained at (the processor's `task_sizes`): one forward pass per distinct
    size. `tasks` selects what `draw` draws (and whether the full-size segmentation map is computed).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        tasks: Sequence[str] = TASKS,
        det_threshold: float = 0.3,
        top_k_classes: int = 3,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> None:
        processor.set_tiles(
            tile_size, tile_overlap
        )  # high-resolution inspection: see CadMtlImageProcessor.predict
        tasks = tuple(dict.fromkeys(tasks))
        unknown = [task for task in tasks if task not in TASKS]
        if not tasks or unknown:
            raise ValueError(f"Predictor: tasks must be a non-empty subset of {TASKS}, got {tasks}")
        if not 0.0 <= det_threshold <= 1.0:
            raise ValueError(f"Predictor: det_threshold must be in [0, 1], got {det_threshold}")
        if top_k_classes < 1:
            raise ValueError(f"Predictor: top_k_classes must be >= 1, got {top_k_classes}")
        self.model, self.processor = model.eval(), processor
        self.tasks, self.det_threshold, self.top_k_classes = tasks, det_threshold, top_k_classes

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, device: str | torch.device | None = None, **kwargs: Any
    ) -> Predictor:
        """Load a saved model folder or Hub repo id on `device` (default: [`default_device`]).

        Raises:
            ModelLoadError: `model_dir` does not exist, holds another kind of model (the message names the command
                that serves it), or weights that do not fit a CadMtl model.
        """
        from cadmtl.model_kinds import CADMTL, load_pretrained, require_model_kind
        from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

        info = require_model_kind(model_dir, CADMTL)  # before anything is built: never a half-random model
        model = load_pretrained(CadMtlModel, model_dir, info.holds).to(device or default_device())
        try:
            processor = CadMtlImageProcessor.from_pretrained(model_dir)
        except OSError as error:
            logger.warning(
                "%s has no usable preprocessor_config.json (%s); using the default CadMtlImageProcessor (512x512)",
                model_dir,
                error,
            )
            processor = CadMtlImageProcessor()
        return cls(model, processor, **kwargs)

    @property
    def config(self) -> Any:
        return self.model.config

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[ImageResult]:
        """Score RGB PIL images (one batch: every image goes through the model at once)."""
        config = self.config
        # the processor's one inference path: each head at its own input size, one forward pass per size
        outputs = self.processor.predict(self.model, list(images), TASKS, device=_device(self.model))
        sizes = [(image.height, image.width) for image in images]
        scores = self.processor.post_process_verdict(outputs, config)
        ranked = self.processor.post_process_image_classification(
            outputs, top_k=self.top_k_classes, id2label=dict(enumerate(config.cls_labels))
        )
        detections = self.processor.post_process_object_detection(
            outputs, threshold=self.det_threshold, target_sizes=sizes
        )
        results = []
        for index, (score, classes, found) in enumerate(zip(scores, ranked, detections)):
            names, values = classes["label_names"], classes["scores"].tolist()
            prediction = ImagePrediction(
                classes=[(name, float(value)) for name, value in zip(names, values)],
                boxes=found["boxes"].cpu().numpy(),
                box_scores=found["scores"].cpu().numpy(),
                box_labels=found["labels"].cpu().numpy(),
            )
            if "segmentation" in self._drawn:  # a full-size class map costs time and memory: only when drawn
                logits = outputs["seg_logits"][index]
                pixel_mask = outputs.get("seg_pixel_mask")
                if pixel_mask is not None:
                    # padding sits at the bottom / right: keep the part of the input that is the image
                    rows, columns = pixel_mask[index].any(dim=1).sum(), pixel_mask[index].any(dim=0).sum()
                    logits = logits[:, : int(rows), : int(columns)]
                prediction.segmentation = _class_map(self.processor, logits, sizes[index])
            results.append(
                ImageResult(prediction, score["anomaly_score"], score["head_scores"], score["verdict"] or "")
            )
        return results

    @property
    def _drawn(self) -> set[str]:
        """The `ImagePrediction` fields of the heads in `tasks` (`CadMtlTask.overlay_fields`)."""
        return {name for task in self.tasks for name in get_cadmtl_task(task).overlay_fields}

    def draw(self, image: Image.Image, result: ImageResult) -> Image.Image:
        """The overlay of `result` on `image`: of the mask, boxes and class banner, those of `tasks`."""
        shown = ImagePrediction(**{name: getattr(result.prediction, name) for name in self._drawn})
        return draw_predictions(image, shown, self.config.det_labels, self.config.seg_labels)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _class_map(processor: Any, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrink = min(1.0, math.sqrt(_MAX_SEGMENTATION_LOGITS / (logits.shape[0] * height * width)))
    work_size = (max(1, round(height * shrink)), max(1, round(width * shrink)))
    (class_map,) = processor.post_process_semantic_segmentation(
        {"seg_logits": logits[None]}, target_sizes=[work_size]
    )
    class_map = class_map.cpu().numpy().astype(np.uint8)  # the config keeps seg classes below 255
    if work_size != (height, width):
        class_map = np.asarray(Image.fromarray(class_map).resize((width, height), Image.Resampling.NEAREST))
    return class_map


# ----------------------------------------------------------------------------------------------------------
# Writing the results of a run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PredictRun:
    """What [`predict_files`] wrote: the paths, and one summary row per image, frame or failed input."""

    output_dir: Path
    rows: list[dict[str, Any]]
    overlays: list[Path]
    crops: list[Path]
    num_detections: int

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["error"]]

    @property
    def num_scored(self) -> int:
        return len(self.rows) - len(self.errors)


def _crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    x_min, y_min, x_max, y_max = box
    left, top = (
        min(max(0, math.floor(x_min)), image.width - 1),
        min(max(0, math.floor(y_min)), image.height - 1),
    )
    right, bottom = (
        max(left + 1, min(image.width, math.ceil(x_max))),
        max(top + 1, min(image.height, math.ceil(y_max))),
    )
    return image.crop((left, top, right, bottom))


def predict_files(
    model_dir: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    det_threshold: float = 0.3,
    top_k_classes: int = 3,
    tasks: Sequence[str] = TASKS,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    video_fps: float = 1.0,
    overlays: bool = True,
    crops: bool = False,
    predictor: Predictor | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
) -> PredictRun:
    """Run a CadMtl model on image files, folders, globs and videos; write the files listed in the module docstring.

    Args:
        model_dir: a saved model folder or a Hub repo id (anything `CadMtlModel.from_pretrained` takes); its
            `preprocessor_config.json` sets the network input size of each head (`task_sizes`, else `size`).
        inputs: image files, folders (walked recursively), glob patterns and video files (see [`collect_images`]).
        output_dir: where the results go (created if needed).
        det_threshold: minimum detection score for a box to be reported, counted and drawn.
        top_k_classes: how many classes the banner lists.
        tasks: which predictions to draw, any of "cls", "det", "seg" (every head still runs for the verdict and
            the JSON / CSV files).
        device: where the model runs ("cpu", "cuda", "cuda:1", "mps"); default [`default_device`].
        batch_size: images per forward pass.
        video_fps: frames taken per second of video (`<= 0`: every frame).
        overlays: write one overlay PNG per image.
        crops: write one PNG per detection under `crops/`.
        predictor: an already loaded [`Predictor`] (then `model_dir`, `det_threshold`, `top_k_classes`, `tasks`,
            `device` and the tile settings are its own).
        tile_size, tile_overlap: high-resolution inspection: the detection and segmentation heads run on
            overlapping tiles of `tile_size` pixels (see `CadMtlImageProcessor.predict`); default: the settings in
            the model's `preprocessor_config.json` (none: whole images).

    Raises:
        ValueError: bad arguments, overlays that would overwrite their inputs, or no input could be read (the
            files are written first; the message names the inputs and their errors).
    """
    if batch_size < 1:
        raise ValueError(f"predict_files: batch_size must be >= 1, got {batch_size}")
    if tile_size is not None:  # before the model loads
        from modeling_cadmtl.image_processing_cadmtl import check_tile_settings

        check_tile_settings(tile_size, tile_overlap)
    output_dir = Path(output_dir)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources = collect_images(inputs, exclude=output_dir, videos=True)
    if overlays:
        _refuse_overwriting_inputs(sources, output_dir)
    if predictor is None:
        predictor = Predictor.from_pretrained(
            model_dir,
            device,
            tasks=tasks,
            det_threshold=det_threshold,
            top_k_classes=top_k_classes,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
        )
    config = predictor.config
    output_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    written: list[Path] = []
    crop_paths: list[Path] = []
    for item, result in _predicted_items(predictor, sources, video_fps, batch_size):
        if result is None:
            rows.append(
                {
                    **dict.fromkeys(SUMMARY_COLUMNS, ""),
                    "file_name": item.file_name,
                    "verdict": ERROR_VERDICT,
                    "error": item.error,
                }
            )
            continue
        image_id = len(images) + 1
        image = item.image
        images.append(
            {"id": image_id, "file_name": item.file_name, "width": image.width, "height": image.height}
        )
        detections.extend(coco_detections(image_id, item.file_name, result.prediction))
        rows.append(summary_row(item.file_name, result, config))
        if crops:
            crop_paths.extend(
                _write_crops(image, result.prediction, output_dir, item.output_name, config.det_labels)
            )
        if overlays:
            written.append(_write_overlay(predictor, image, result, output_dir, item.output_name))

    dataset = coco_images_dataset(images, config, f"cadmtl predict {model_dir}", predictor.det_threshold)
    _write_results(output_dir, dataset, detections, rows)
    run = PredictRun(output_dir, rows, written, crop_paths, len(detections))
    _report_unreadable(run)
    return run


def _refuse_overwriting_inputs(sources: Sequence[ImageSource], output_dir: Path) -> None:
    """A `ValueError` when an overlay would land on its own input image (an output folder among the inputs)."""
    overwritten = [
        str(s.path)
        for s in sources
        if not s.is_video
        and safe_output_path(output_dir, s.output_name.as_posix()).resolve() == s.path.resolve()
    ]
    if overwritten:
        raise ValueError(
            f"predict_files: the overlays would overwrite their input images ({', '.join(overwritten[:5])}); "
            "choose an output_dir outside the image folders"
        )


def _predicted_items(
    predictor: Predictor, sources: Sequence[ImageSource], video_fps: float, batch_size: int
) -> Iterator[tuple[_Item, ImageResult | None]]:
    """Each input image or frame in order with its result, `batch_size` images a forward; an input that could not
    be read comes with None as soon as it is met."""
    has_video = any(source.is_video for source in sources)
    batch: list[_Item] = []
    with tqdm(total=None if has_video else len(sources), desc="predicting", unit="img") as progress:
        for item in _read_items(sources, video_fps):
            if item.image is None:
                yield item, None
                progress.update(1)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                yield from zip(batch, predictor([item.image for item in batch]))
                progress.update(len(batch))
                batch = []
        if batch:
            yield from zip(batch, predictor([item.image for item in batch]))
            progress.update(len(batch))


def coco_detections(image_id: int, file_name: str, prediction: ImagePrediction) -> list[dict[str, Any]]:
    """The COCO results of one image: `{"image_id", "category_id" (label index + 1), "bbox" xywh pixels, "score",
    "file_name"}` per box."""
    detections = []
    for box, score, label in zip(prediction.boxes, prediction.box_scores, prediction.box_labels):
        x_min, y_min, x_max, y_max = (float(value) for value in box)
        detections.append(
            {
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [round(x_min, 2), round(y_min, 2), round(x_max - x_min, 2), round(y_max - y_min, 2)],
                "score": round(float(score), 5),
                "file_name": file_name,
            }
        )
    return detections


def summary_row(file_name: str, result: ImageResult, config: Any) -> dict[str, Any]:
    """The `summary.csv` row of a scored image (`SUMMARY_COLUMNS`)."""
    top_class, top_score = result.prediction.classes[0]
    return {
        "file_name": file_name,
        "verdict": result.verdict or ("uninformative" if config.verdict_status == "uninformative" else ""),
        "anomaly_score": "" if result.anomaly_score is None else f"{result.anomaly_score:.6g}",
        "top_class": top_class,
        "top_class_score": f"{top_score:.6g}",
        "num_defects": len(result.prediction.boxes),
        "error": "",
    }


def _write_crops(
    image: Image.Image,
    prediction: ImagePrediction,
    output_dir: Path,
    output_name: Path,
    labels: Sequence[str],
) -> list[Path]:
    """One PNG per box, `crops/<overlay name>/<k>_<label>.png`."""
    # the image's own folder, then the class name (the model's) as one file name: inside OUT
    folder = safe_output_path(output_dir / "crops", output_name.with_suffix("").as_posix())
    paths = []
    for k, (box, label) in enumerate(zip(prediction.boxes, prediction.box_labels)):
        target = folder / safe_file_name(f"{k}_{labels[int(label)]}", ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        _crop(image, tuple(float(value) for value in box)).save(target, format="PNG")
        paths.append(target)
    return paths


def _write_overlay(
    predictor: Predictor, image: Image.Image, result: ImageResult, output_dir: Path, output_name: Path
) -> Path:
    target = safe_output_path(output_dir, output_name.as_posix())
    target.parent.mkdir(parents=True, exist_ok=True)
    predictor.draw(image, result).save(target, format="PNG")
    return target


def coco_images_dataset(
    images: list[dict[str, Any]], config: Any, description: str, det_threshold: float
) -> dict[str, Any]:
    """`images.json`: a COCO dataset without annotations, whose `categories` are the detection labels (id =
    index + 1) and whose `info` records the threshold and the verdict settings."""
    return {
        "info": {
            "description": description,
            "det_threshold": det_threshold,
            "category_ids": "detection label index + 1",
            "verdict_source": config.verdict_source,
            "verdict_threshold": config.verdict_threshold,
            "verdict_status": config.verdict_status,
            "verdict_reason": config.verdict_reason,
        },
        "images": images,
        "annotations": [],
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(config.det_labels)],
    }


def _write_results(
    output_dir: Path, dataset: dict[str, Any], detections: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    (output_dir / "images.json").write_text(json.dumps(dataset, indent=1) + "\n")
    (output_dir / "detections.json").write_text(json.dumps(detections) + "\n")
    with open(output_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _report_unreadable(run: PredictRun) -> None:
    """Warn about the inputs that could not be read; a `ValueError` when none could."""
    failed = run.errors
    if not failed:
        return
    listing = "; ".join(f"{row['file_name']} ({row['error']})" for row in failed[:20])
    more = f"; and {len(failed) - 20} more" if len(failed) > 20 else ""
    if not run.num_scored:
        raise ValueError(
            f"predict_files: none of the {len(failed)} image files could be read: {listing}{more} "
            f"(see {run.output_dir / 'summary.csv'})"
        )
    logger.warning(
        "Skipped %d of %d inputs that could not be read: %s%s", len(failed), len(run.rows), listing, more
    )
