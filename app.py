"""The cad-mtl browser demo (a Gradio app, also the Hugging Face Space's `app_file`).

    CADMTL_MODEL=outputs/cadmtl-demo/model GRADIO_SERVER_PORT=7860 python app.py

Tabs:
- **Inspect** (always): upload a photo -> the annotated image (detection boxes and segmentation masks,
  `gr.AnnotatedImage`), the class scores (`gr.Label`), the OK / NG verdict and its anomaly score. The API endpoint
  is `api_name="predict"` (one image in; annotated image, class scores, verdict, anomaly score and a JSON of the
  details out). Inference is `cadmtl.pictures.predict.Predictor`, the code path of `cadmtl predict`.
- **Anomaly (normal-only)** when `CADMTL_ANOMALY_MODEL` names a model folder of `cadmtl anomaly fit` (patch-memory
  scorer) or `cadmtl anomaly train` (learner): heat map, score and verdict (`api_name="anomaly"`).
- **Reference localisation** when `CADMTL_REFERENCE_MODEL` names the `localizer.json` (or its folder) of a
  `cadmtl reference localize` run: a reference and a query image -> boxes where the query differs
  (`api_name="reference"`).
A model whose config records generated training images (`training_data`, written by `cadmtl train` / `cadmtl anomaly
fit` on a `cadmtl data make-demo` repo) gets one sentence above its tab's results saying so (`GENERATED_NOTICE`).

Environment:
- `CADMTL_MODEL`: the CadMtl model folder (or Hub repo id, when online) to serve. Unset: the demo model
  `outputs/cadmtl-demo/model` next to this file; when it is missing it is trained first, by the README's default
  run (`train_accelerate.py`: builds `data/cad100k-mini`, ~1 min on a CPU). If that training fails the app serves an
  untrained tiny model and says so on the page (the documented fallback: the boxes and scores mean nothing).
- `CADMTL_DEVICE`: where the models run (default `cpu`, as on a free Space).
- `CADMTL_TILE_SIZE` / `CADMTL_TILE_OVERLAP`: high-resolution inspection by overlapping tiles of that many pixels
  of the photo (`--tile-size` / `--tile-overlap` of `cadmtl predict` and `cadmtl anomaly`), for both models;
  unset: each model's saved settings (an anomaly scorer fitted with `--tile-size` tiles by default).
- Bounds, so that one visitor cannot take the server's memory: `CADMTL_MAX_IMAGE_PIXELS` (default 12000000;
  larger photos are downscaled on load, by `cadmtl.pictures.predict.load_image`, the helper `cadmtl predict` uses
  too; 0: no budget; the annotated view is drawn at most 1 MP, `DISPLAY_PIXELS`, the details' boxes stay in the
  analysed photo's pixels), `CADMTL_MAX_UPLOAD_MB` (default 20: a larger upload is refused with Gradio's message),
  `CADMTL_CONCURRENCY` (default 1: requests run one at a time, the others wait in the queue) and
  `CADMTL_QUEUE_SIZE` (default 16 waiting requests; more are turned away).
- `GRADIO_SERVER_PORT` / `GRADIO_SERVER_NAME`: Gradio's own settings. Analytics are off
  (`GRADIO_ANALYTICS_ENABLED=False`) and the Hub is used offline (`HF_HUB_OFFLINE=1`) unless set otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# before gradio / huggingface_hub are imported: they read these at import time
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # a Space runs app.py from the repository without installing the package
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cadmtl.model_kinds import ModelLoadError  # noqa: E402
from cadmtl.pictures.overlays import task_colors  # noqa: E402
from cadmtl.pictures.predict import Predictor, load_image  # noqa: E402
from dataset_scripts.provenance import trained_on_generated_images  # noqa: E402

logger = logging.getLogger("cadmtl.app")

DEMO_MODEL = ROOT / "outputs" / "cadmtl-demo" / "model"
UNTRAINED_NOTICE = (
    "**Untrained fallback model**: the demo model could not be trained here, so this page serves a random tiny "
    "model. Its boxes, classes and scores mean nothing; set `CADMTL_MODEL` to a trained model folder."
)
GENERATED_NOTICE = (
    "**This model was trained on generated demo images** (`{repo}`): on real photos its answers mean little; "
    "the route for real photos is in docs/anomaly.md, *Real photos: the demo route*."
)


def generated_notice(config: Any) -> str | None:
    """The one sentence shown above a tab's results when its model records generated training images
    (`training_data` of its config, written by `cadmtl train` / `cadmtl anomaly fit`), else None."""
    if not trained_on_generated_images(config):
        return None
    return GENERATED_NOTICE.format(repo=config.training_data.get("repo", "cadmtl data make-demo"))


def _positive_int(variable: str, default: int) -> int:
    text = os.environ.get(variable, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{variable}={text!r} must be at least 1")
    return value


def tile_settings() -> tuple[int | None, int | None]:
    """(`CADMTL_TILE_SIZE`, `CADMTL_TILE_OVERLAP`) as integers (None where unset), checked like `--tile-size` /
    `--tile-overlap`; a one-line `ValueError` naming the variable otherwise."""
    values = []
    for variable in ("CADMTL_TILE_SIZE", "CADMTL_TILE_OVERLAP"):
        text = os.environ.get(variable, "").strip()
        try:
            values.append(int(text) if text else None)
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not a whole number of pixels") from None
    from modeling_cadmtl.image_processing_cadmtl import check_tile_settings

    try:
        check_tile_settings(values[0], values[1])  # an overlap needs a tile size here
    except ValueError as error:
        raise ValueError(f"CADMTL_TILE_SIZE / CADMTL_TILE_OVERLAP: {error}") from None
    return values[0], values[1]


def serving_limits() -> dict[str, Any]:
    """The queue and upload bounds from the environment (see the module docstring)."""
    return {
        "concurrency": _positive_int("CADMTL_CONCURRENCY", 1),
        "queue_size": _positive_int("CADMTL_QUEUE_SIZE", 16),
        "max_file_size": f"{_positive_int('CADMTL_MAX_UPLOAD_MB', 20)}mb",
    }


def verdict_summary(config: Any) -> str:
    """What the OK / NG verdict of a CadMtl model is worth, for the top of the page (its `verdict_status`)."""
    status = getattr(config, "verdict_status", "uncalibrated")
    reason = getattr(config, "verdict_reason", None)
    if status == "uninformative":
        return (
            f"**No OK / NG verdict**: this model's anomaly score does not separate normal from defective photos "
            f"({reason}). The page shows the score (`{config.verdict_source}` head) without OK / NG."
        )
    text = (
        f"The OK / NG verdict compares its anomaly score (`{config.verdict_source}` head) with the threshold "
        f"{config.verdict_threshold:.3f}"
    )
    if status == "calibrated":
        return text + ", calibrated on labelled validation photos."
    return (
        text + f": **not calibrated** (verdict status `{status}`" + (f": {reason}" if reason else "") + ")."
    )


# The annotated view of the Inspect tab is drawn at most this large (a page shows ~1000 px across anyway).
DISPLAY_PIXELS = 1_000_000


def _display_copy(image: Image.Image) -> tuple[Image.Image, float]:
    """`image` scaled down to at most DISPLAY_PIXELS (itself when it fits), and the scale applied."""
    if image.width * image.height <= DISPLAY_PIXELS:
        return image, 1.0
    scale = (DISPLAY_PIXELS / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), size[0] / image.width


def _draw_box(mask: np.ndarray, box: list[int], border: int = 3) -> None:
    """A box on a label's layer as gr.AnnotatedImage draws one: 0.5 inside, 1 on a `border`-pixel outline."""
    height, width = mask.shape
    x_min, y_min = min(max(box[0], 0), width - 1), min(max(box[1], 0), height - 1)
    x_max, y_max = min(max(box[2], x_min + 1), width), min(max(box[3], y_min + 1), height)
    inside = mask[y_min:y_max, x_min:x_max]
    np.maximum(inside, 0.5, out=inside)
    inside[:, :border] = inside[:, -border:] = inside[:border, :] = inside[-border:, :] = 1.0


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _not_an_image(name: str, path: str, error: BaseException) -> gr.Error:
    reason = str(error).replace(path, name)  # the server's cache path means nothing to the user
    return gr.Error(
        f"{name} is not an image this demo can read ({type(error).__name__}: {reason}). "
        "Upload a JPEG, PNG, BMP or WebP photo."
    )


def _upload_path(value: Any) -> tuple[str | None, str]:
    """(local path, original name) of an image input's raw value. The image inputs run with `preprocess=False`:
    gr.Image's own preprocessing opens the file with PIL and turns a non-image into a generic processing error,
    where this app wants to say what is wrong."""
    if value is None or isinstance(value, str):
        return value, Path(value).name if value else ""
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
    else:
        path, name = getattr(value, "path", None), getattr(value, "orig_name", None)
    return path, name or (Path(path).name if path else "")


def _read_upload(value: Any, what: str = "image") -> Image.Image:
    """The uploaded file as RGB, or a `gr.Error` the page shows (nothing uploaded, not an image, truncated)."""
    path, name = _upload_path(value)
    if not path:
        raise gr.Error(f"Upload an {what} first.")
    try:
        return load_image(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _not_an_image(name, path, error) from error


# ----------------------------------------------------------------------------------------------- models
def default_model() -> tuple[str, bool]:
    """(model folder, is the untrained fallback): `CADMTL_MODEL`, else the demo model, trained if missing."""
    chosen = os.environ.get("CADMTL_MODEL")
    if chosen:
        return chosen, False
    if (DEMO_MODEL / "config.json").is_file():
        return str(DEMO_MODEL), False
    logger.warning(
        "No model at %s: training the demo model first (README default run, ~1 min on CPU)", DEMO_MODEL
    )
    completed = subprocess.run([sys.executable, str(ROOT / "train_accelerate.py")], cwd=ROOT, check=False)
    if completed.returncode == 0 and (DEMO_MODEL / "config.json").is_file():
        return str(DEMO_MODEL), False
    logger.error(
        "Training the demo model failed (exit %d): serving an untrained tiny model", completed.returncode
    )
    return str(_untrained_model()), True


def _untrained_model() -> Path:
    import torch

    from cadmtl.testing import tiny_cadmtl_config
    from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

    folder = ROOT / "outputs" / "cadmtl-untrained" / "model"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        processor = CadMtlImageProcessor(size={"height": 224, "width": 224})
        CadMtlModel(tiny_cadmtl_config()).save_pretrained(folder, image_processor=processor)
    return folder


# ----------------------------------------------------------------------------------------------- handlers
def inspect(predictor: Predictor, path: Any) -> tuple[Any, dict[str, float], str, float, dict]:
    """One uploaded image -> (annotated image, class scores, verdict text, anomaly score, details)."""
    image = _read_upload(path)
    (result,) = predictor([image])
    config = predictor.config
    prediction = result.prediction
    # The page draws on a copy of at most DISPLAY_PIXELS: gr.AnnotatedImage turns every mask and box into a
    # full-size RGBA PNG (float64 arrays on the way), which at 12 MP costs ~0.5 GB and seconds per annotation.
    shown, scale = _display_copy(image)
    annotations: list[tuple[Any, str]] = []
    if prediction.segmentation is not None:
        class_map = prediction.segmentation
        if shown.size != image.size:
            class_map = np.asarray(Image.fromarray(class_map).resize(shown.size, Image.Resampling.NEAREST))
        for class_id in np.unique(class_map):
            if class_id != 0:  # background stays clear
                mask = (class_map == class_id).astype(np.float32)
                annotations.append((mask, config.seg_labels[class_id]))
    detections = []
    box_masks: dict[str, np.ndarray] = {}  # one layer per label: a layer per box would cost one PNG per box
    for box, score, label in zip(prediction.boxes, prediction.box_scores, prediction.box_labels):
        name = config.det_labels[int(label)]
        x_min, y_min, x_max, y_max = (round(float(value)) for value in box)
        mask = box_masks.setdefault(name, np.zeros((shown.height, shown.width), dtype=np.float32))
        _draw_box(mask, [round(float(value) * scale) for value in box])
        detections.append(
            {"label": name, "score": round(float(score), 4), "box_xyxy": [x_min, y_min, x_max, y_max]}
        )
    annotations.extend((mask, name) for name, mask in box_masks.items())
    classes = {name: float(score) for name, score in prediction.classes}
    if (
        result.anomaly_score is None
    ):  # no head of this model gives an anomaly score (see post_process_verdict)
        verdict = "no verdict: none of this model's heads gives an anomaly score"
    elif not result.verdict:  # an uninformative model: the score without OK / NG
        verdict = (
            f"no OK / NG (anomaly score {result.anomaly_score:.3f}): this model's verdict is uninformative "
            f"({config.verdict_reason})"
        )
    else:
        verdict = (
            f"{result.verdict} (anomaly score {result.anomaly_score:.3f}, "
            f"threshold {config.verdict_threshold:.3f})"
        )
    details = {
        "verdict": result.verdict or None,
        "anomaly_score": result.anomaly_score,
        "verdict_source": config.verdict_source,
        "verdict_threshold": config.verdict_threshold,
        "verdict_status": config.verdict_status,
        "verdict_reason": config.verdict_reason,
        "head_scores": result.head_scores,
        "image_size": list(
            image.size
        ),  # the frame of `box_xyxy`: the photo as analysed (after the pixel budget)
        "detections": detections,
    }
    return (shown, annotations), classes, verdict, result.anomaly_score, details


def inspect_anomaly(scorer: Any, path: Any, processor: Any = None) -> tuple[Image.Image, float, str]:
    """The Anomaly tab: `processor` (default: the scorer's own, with its saved tile settings) decides tiles.
    `cadmtl.anomaly.models.inspect_image` is all of its scoring (`benchmarks/demo_route.py` measures it)."""
    from cadmtl.anomaly.models import inspect_image

    inspection = inspect_image(scorer, _read_upload(path), processor)
    picture, score, verdict = inspection.picture, inspection.score, inspection.verdict
    if verdict == "uncalibrated":
        return (
            picture,
            score,
            "uncalibrated: this model has no thresholds (fitted without calibration images), no OK / NG",
        )
    return picture, score, verdict


def localize_reference(runner: Any, reference_path: Any, query_path: Any) -> tuple[Any, float, str]:
    reference = _read_upload(reference_path, "reference image")
    query = _read_upload(query_path, "query image")
    features = runner.features([reference, query])
    (found,) = runner.localizer.localize(features[1:], features[:1], (query.height, query.width))
    annotations = [
        (tuple(round(float(v)) for v in box), f"differs {float(score):.2f}")
        for box, score in zip(found["boxes"].tolist(), found["scores"].tolist())
    ]
    score = float(found["score"])
    verdict = "NG (differs from the reference)" if annotations else "OK (matches the reference)"
    return (query, annotations), score, verdict


def _load(load: Callable[[], Any]) -> tuple[Any, str | None]:
    """(loaded model, None), or (None, the one-line reason) for a missing folder or another kind of model: the
    page shows that sentence where the results would be, and the tab's endpoint answers with it as its error."""
    try:
        return load(), None
    except ModelLoadError as error:
        logger.error("%s", error)
        return None, str(error)


def _serve(handler: Callable[..., Any], model: Any, error: str | None) -> Callable[..., Any]:
    """`handler(model, *inputs)`, or a handler that raises `error` (shown on the page) when no model loaded."""

    def run(*inputs: Any) -> Any:
        if model is None:
            raise gr.Error(error)
        return handler(model, *inputs)

    return run


# ----------------------------------------------------------------------------------------------- the page
def build_demo_app(
    model: str | os.PathLike,
    *,
    anomaly_model: str | os.PathLike | None = None,
    reference_model: str | os.PathLike | None = None,
    device: str = "cpu",
    untrained: bool = False,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
) -> gr.Blocks:
    """The Gradio Blocks of the demo for a CadMtl model folder and, optionally, the anomaly and reference models.
    A model that is missing or of another kind is not served: its tab shows the one-line reason instead.
    `tile_size` / `tile_overlap` override the models' saved tile settings (high-resolution inspection)."""
    predictor, model_error = _load(
        lambda: Predictor.from_pretrained(model, device, tile_size=tile_size, tile_overlap=tile_overlap)
    )
    color_map: dict[str, str] = {}
    if predictor is not None:
        config = predictor.config
        predictor.top_k_classes = len(config.cls_labels)  # the Label shows every class score
        det_colors, seg_colors = task_colors(config.det_labels, config.seg_labels)
        color_map = {name: _hex(color) for name, color in zip(config.det_labels, det_colors)}
        color_map.update({name: _hex(color) for name, color in zip(config.seg_labels[1:], seg_colors[1:])})

    with gr.Blocks(title="cad-mtl inspection demo") as demo:
        if predictor is not None:
            gr.Markdown(
                "# cad-mtl: car defect inspection\n"
                "One DINOv3 model classifies, detects and segments defects. " + verdict_summary(config)
            )
        else:
            gr.Markdown("# cad-mtl: car defect inspection")
        if untrained:
            gr.Markdown(UNTRAINED_NOTICE)
        with gr.Tab("Inspect"):
            if model_error:
                gr.Markdown(f"**No model served**: {model_error}", elem_id="model-error")
            elif notice := generated_notice(config):
                gr.Markdown(notice, elem_id="generated-notice")
            with gr.Row():
                upload = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"])
                annotated = gr.AnnotatedImage(
                    label="Defects (boxes and masks)", color_map=color_map, elem_id="annotated"
                )
            with gr.Row():
                classes = gr.Label(
                    label="Class scores", num_top_classes=predictor.top_k_classes if predictor else None
                )
                with gr.Column():
                    verdict = gr.Textbox(label="Verdict", elem_id="verdict")
                    score = gr.Number(
                        label="Anomaly score", precision=4, placeholder="no photo inspected yet"
                    )
            details = gr.JSON(label="Details")
            run = gr.Button("Inspect", variant="primary")
            outputs = [annotated, classes, verdict, score, details]
            run.click(
                _serve(inspect, predictor, model_error),
                inputs=upload,
                outputs=outputs,
                api_name="predict",
                preprocess=False,
            )
            upload.upload(
                _serve(inspect, predictor, model_error),
                inputs=upload,
                outputs=outputs,
                api_name=False,
                preprocess=False,
            )

        if anomaly_model:
            from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model

            scorer, anomaly_error = _load(lambda: load_anomaly_model(anomaly_model))
            with gr.Tab("Anomaly (normal-only)"):
                if anomaly_error:
                    gr.Markdown(f"**No model served**: {anomaly_error}", elem_id="anomaly-model-error")
                else:
                    gr.Markdown(
                        f"Normal-only scorer `{Path(anomaly_model).name}`: heat map, image score, verdict."
                    )
                    if notice := generated_notice(scorer.config):
                        gr.Markdown(notice, elem_id="anomaly-generated-notice")
                with gr.Row():
                    anomaly_upload = gr.Image(type="filepath", label="Photo")
                    heat = gr.Image(type="pil", label="Anomaly heat map")
                anomaly_score = gr.Number(
                    label="Anomaly score",
                    precision=4,
                    placeholder="no photo scored yet",
                    elem_id="anomaly-score",
                )
                anomaly_verdict = gr.Textbox(label="Verdict", elem_id="anomaly-verdict")
                processor = None if scorer is None else anomaly_processor(scorer, tile_size, tile_overlap)
                gr.Button("Score", variant="primary", elem_id="anomaly-run").click(
                    _serve(functools.partial(inspect_anomaly, processor=processor), scorer, anomaly_error),
                    inputs=anomaly_upload,
                    outputs=[heat, anomaly_score, anomaly_verdict],
                    api_name="anomaly",
                    preprocess=False,
                )

        if reference_model:
            from cadmtl.reference.localize_pairs import runner_from_settings

            runner, reference_error = _load(lambda: runner_from_settings(reference_model, device))
            with gr.Tab("Reference localisation"):
                if reference_error:
                    gr.Markdown(f"**No model served**: {reference_error}", elem_id="reference-model-error")
                else:
                    gr.Markdown(
                        "A defect-free reference and a query of the same part: boxes where the query differs."
                    )
                with gr.Row():
                    reference = gr.Image(type="filepath", label="Reference")
                    query = gr.Image(type="filepath", label="Query")
                differences = gr.AnnotatedImage(label="Where the query differs")
                reference_score = gr.Number(
                    label="Difference score (map maximum)", precision=4, placeholder="no pair compared yet"
                )
                reference_verdict = gr.Textbox(label="Verdict")
                gr.Button("Compare", variant="primary").click(
                    _serve(localize_reference, runner, reference_error),
                    inputs=[reference, query],
                    outputs=[differences, reference_score, reference_verdict],
                    api_name="reference",
                    preprocess=False,
                )
    limits = serving_limits()
    demo.queue(default_concurrency_limit=limits["concurrency"], max_size=limits["queue_size"])
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tile_size, tile_overlap = tile_settings()  # a bad setting stops the app before the demo model trains
    model, untrained = default_model()
    demo = build_demo_app(
        model,
        anomaly_model=os.environ.get("CADMTL_ANOMALY_MODEL") or None,
        reference_model=os.environ.get("CADMTL_REFERENCE_MODEL") or None,
        device=os.environ.get("CADMTL_DEVICE", "cpu"),
        untrained=untrained,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
    )
    # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose the address
    demo.launch(max_file_size=serving_limits()["max_file_size"])


if __name__ == "__main__":
    main()
