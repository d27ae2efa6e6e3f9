"""Prediction overlays and evaluation charts: palette, image discovery and reading, drawing with hand-made
predictions, end-to-end rendering with a tiny model forced to predict, confusion-matrix maths, charts, CLI."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.cli import main as cli_main
from cadmtl.evaluation.metrics import ClassificationMetrics, DetectionMetrics, SegmentationMetrics
from cadmtl.pictures import charts, overlays, predict
from cadmtl.testing import CLS_LABELS, DET_LABELS, SEG_LABELS, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

# ------------------------------------------------------------------------------------------------ palette


def test_palette_is_fixed_distinct_and_starts_with_okabe_ito():
    assert overlays.class_color(0) == (0xE6, 0x9F, 0x00)  # Okabe-Ito orange
    assert overlays.class_color(4) == (0x00, 0x72, 0xB2)  # Okabe-Ito blue
    colors = [overlays.class_color(index) for index in range(120)]
    assert colors == [overlays.class_color(index) for index in range(120)]
    assert len(set(colors)) == 120
    assert all(0 <= channel <= 255 for color in colors for channel in color)
    with pytest.raises(ValueError, match=">= 0"):
        overlays.class_color(-1)


def test_task_colors_share_colours_by_class_name():
    det_colors, seg_colors = overlays.task_colors(
        ["dent", "scratch"], ["background", "scratch", "rust", "dent"]
    )
    assert det_colors == [overlays.class_color(0), overlays.class_color(1)]
    assert seg_colors[1] == det_colors[1]  # scratch
    assert seg_colors[3] == det_colors[0]  # dent
    assert seg_colors[2] == overlays.class_color(2)  # rust: the first palette entry no detection class uses


# ----------------------------------------------------------------------------------- finding and reading


def _write(path: Path, image: Image.Image, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def test_collect_images_walks_folders_and_mirrors_names(tmp_path):
    root = tmp_path / "photos"
    rgb = Image.new("RGB", (8, 8))
    _write(root / "b.JPG", rgb)
    _write(root / "sub" / "c.webp", rgb)
    _write(root / "a.jpg", rgb)
    _write(root / "a.png", rgb)  # same stem as a.jpg
    (root / "notes.txt").write_text("not an image")
    _write(root / "out" / "old.png", rgb)  # the output folder of an earlier run

    sources = predict.collect_images([root], exclude=root / "out")
    assert [source.path.relative_to(root).as_posix() for source in sources] == [
        "a.jpg",
        "a.png",
        "b.JPG",
        "sub/c.webp",
    ]
    assert [source.output_name.as_posix() for source in sources] == [
        "a.jpg.png",
        "a.png.png",
        "b.png",
        "sub/c.png",
    ]

    single = _write(tmp_path / "scan.tiff", rgb)  # explicit files are taken whatever their extension
    several = predict.collect_images([root / "sub", single])
    assert [source.output_name.as_posix() for source in several] == ["sub/c.png", "scan.png"]


def test_collect_images_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg does not exist"):
        predict.collect_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        predict.collect_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no image file or folder"):
        predict.collect_images([])


def test_load_image_gives_upright_8bit_rgb_for_any_mode(tmp_path):
    transparent = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    transparent.putpixel((0, 0), (255, 0, 0, 255))
    loaded = predict.load_image(_write(tmp_path / "rgba.png", transparent))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0) and loaded.getpixel((1, 0)) == (255, 255, 255)

    sixteen = Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16))
    loaded = predict.load_image(_write(tmp_path / "depth.png", sixteen))
    assert np.asarray(loaded)[..., 0].tolist() == [[0, 255], [100, 200]]

    cmyk = predict.load_image(_write(tmp_path / "cmyk.jpg", Image.new("CMYK", (6, 4), (0, 0, 0, 0))))
    assert cmyk.mode == "RGB" and cmyk.size == (6, 4)

    # EXIF orientation 6 (rotate 90° clockwise to display): a 6x4 file is a 4x6 photo
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = predict.load_image(_write(tmp_path / "phone.jpg", Image.new("RGB", (6, 4)), exif=exif))
    assert rotated.size == (4, 6)


# ---------------------------------------------------------------------------------- drawing by hand


def _blend(base: tuple[int, ...], color: tuple[int, ...], opacity: float = 0.45) -> tuple[int, ...]:
    return tuple(round((1 - opacity) * b + opacity * c) for b, c in zip(base, color))


def test_draw_predictions_puts_mask_boxes_banner_and_legend_where_predicted():
    grey = (120, 120, 120)
    image = Image.new("RGB", (200, 160), grey)
    segmentation = np.zeros((160, 200), dtype=np.uint8)
    segmentation[60:120, 20:80] = 2  # "scratch"
    prediction = overlays.ImagePrediction(
        classes=[("worn", 0.931), ("normal", 0.05)],
        boxes=np.array([[110.0, 70.0, 180.0, 130.0]]),
        box_scores=np.array([0.87]),
        box_labels=np.array([0]),  # "dent"
        segmentation=segmentation,
    )
    drawn = overlays.draw_predictions(image, prediction, DET_LABELS, SEG_LABELS)
    det_colors, seg_colors = overlays.task_colors(DET_LABELS, SEG_LABELS)
    assert drawn.size == image.size and drawn.mode == "RGB"
    assert image.getpixel((50, 90)) == grey  # the input is not modified

    assert drawn.getpixel((50, 90)) == _blend(grey, seg_colors[2])  # inside the mask
    assert drawn.getpixel((20, 90)) == seg_colors[2]  # its outline is solid
    assert drawn.getpixel((110, 100)) == det_colors[0]  # the box's left edge
    assert drawn.getpixel((145, 100)) == grey  # inside the box, no mask there
    assert drawn.getpixel((100, 20)) == grey  # untouched background
    banner = np.asarray(drawn)[:2, :2]
    assert banner.max() < grey[0]  # the dark banner panel in the top-left corner
    legend = np.asarray(drawn)[-2:, -2:]
    assert legend.max() < grey[0]  # and the legend panel at the bottom right


def test_draw_predictions_with_nothing_to_draw_returns_the_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    drawn = overlays.draw_predictions(
        image, overlays.ImagePrediction(boxes=np.zeros((0, 4))), DET_LABELS, SEG_LABELS
    )
    assert np.array_equal(np.asarray(drawn), np.asarray(image))


def test_draw_predictions_rejects_inconsistent_predictions():
    image = Image.new("RGB", (20, 10))
    with pytest.raises(ValueError, match=r"shape \(20, 10\) but the image is 10x20"):
        overlays.draw_predictions(
            image,
            overlays.ImagePrediction(segmentation=np.zeros((20, 10), dtype=int)),
            DET_LABELS,
            SEG_LABELS,
        )
    with pytest.raises(ValueError, match=r"class ids outside \[0, 3\): \[7\]"):
        overlays.draw_predictions(
            image, overlays.ImagePrediction(segmentation=np.full((10, 20), 7)), DET_LABELS, SEG_LABELS
        )
    with pytest.raises(ValueError, match=r"labels \[5\] are outside \[0, 2\)"):
        bad_box = overlays.ImagePrediction(
            boxes=np.ones((1, 4)), box_scores=np.ones(1), box_labels=np.array([5])
        )
        overlays.draw_predictions(image, bad_box, DET_LABELS, SEG_LABELS)


# --------------------------------------------------------------------------- end to end with a tiny model


@pytest.fixture(scope="module")
def forced_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose biases make it predict: class "cracked", "scratch" boxes everywhere, mask "dent"."""
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    with torch.no_grad():
        model.cls_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
        model.det_head.cls_logits.bias.copy_(torch.tensor([-20.0, 20.0]))
        model.det_head.centerness.bias.fill_(20.0)
        model.det_head.box_distances.bias.fill_(1.0)  # boxes of about 2 strides around each location
        model.seg_decoder.classifier.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    folder = tmp_path_factory.mktemp("forced-model")
    model.save_pretrained(folder, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    _write(root / "wide.png", Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)))
    _write(root / "parts" / "gray.PNG", Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)))
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_predict_files_overlays_writes_overlays_at_original_size(
    forced_model_dir, image_folder, tmp_path, caplog
):
    out = tmp_path / "overlays"
    with caplog.at_level(logging.WARNING, logger=predict.__name__):
        written = predict.predict_files(forced_model_dir, image_folder, out, batch_size=2).overlays
    assert written == [out / "parts" / "gray.png", out / "wide.png"]
    assert "Skipped 1 of 3 inputs" in caplog.text and "broken.jpg" in caplog.text

    det_colors, seg_colors = overlays.task_colors(DET_LABELS, SEG_LABELS)
    for path, source in zip(written, [image_folder / "parts" / "gray.PNG", image_folder / "wide.png"]):
        original = np.asarray(Image.open(source).convert("RGB")).astype(int)
        overlay = np.asarray(Image.open(path))
        assert overlay.shape == original.shape
        changed = np.abs(overlay.astype(int) - original).sum(axis=2) > 0
        assert changed.mean() > 0.9  # the "dent" mask covers the whole image
        colors = {tuple(pixel) for pixel in overlay.reshape(-1, 3)}
        assert det_colors[1] in colors  # "scratch" boxes
        assert seg_colors[1] in colors  # the solid mask outline along the image border


def test_predict_files_overlays_draws_only_the_requested_task(forced_model_dir, image_folder, tmp_path):
    (written,) = predict.predict_files(
        forced_model_dir, [image_folder / "wide.png"], tmp_path, tasks=["seg"]
    ).overlays
    original = np.asarray(Image.open(image_folder / "wide.png")).astype(np.float64)
    overlay = np.asarray(Image.open(written)).astype(int)
    _, seg_colors = overlays.task_colors(DET_LABELS, SEG_LABELS)
    expected = np.round(0.55 * original + 0.45 * np.array(seg_colors[1])).astype(int)
    inner = (slice(5, 30), slice(5, 60))  # away from the outline and the legend
    assert np.abs(overlay[inner] - expected[inner]).max() <= 1  # float32 blending may round .5 the other way

    (banner_only,) = predict.predict_files(
        forced_model_dir, [image_folder / "wide.png"], tmp_path / "cls", tasks=["cls"], top_k_classes=1
    ).overlays
    overlay = np.asarray(Image.open(banner_only)).astype(int)
    changed = np.abs(overlay - original).sum(axis=2) > 0
    assert changed[:5, :5].all() and not changed[-5:, :].any()  # a banner at the top, nothing below it


def test_predict_files_overlays_with_an_aspect_preserving_padded_processor(forced_model_dir, tmp_path):
    model_dir = tmp_path / "padded-model"
    shutil.copytree(forced_model_dir, model_dir)
    config_path = model_dir / "preprocessor_config.json"
    settings = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**settings, "size": {"shortest_edge": 64}, "do_pad": True}))
    grey = (100, 100, 100)
    sources = [
        _write(tmp_path / "in" / "landscape.png", Image.new("RGB", (96, 48), grey)),
        _write(tmp_path / "in" / "portrait.png", Image.new("RGB", (40, 100), grey)),
    ]
    written = predict.predict_files(
        model_dir, sources, tmp_path / "out", tasks=["seg"], batch_size=2
    ).overlays
    _, seg_colors = overlays.task_colors(DET_LABELS, SEG_LABELS)
    for source, path in zip(sources, written):
        overlay = Image.open(path)
        assert overlay.size == Image.open(source).size
        assert overlay.getpixel((overlay.width // 2, 10)) == _blend(grey, seg_colors[1])


def test_predict_files_overlays_fails_clearly_when_nothing_is_readable(forced_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"none of the 2 image files could be read: .*a\.png .*b\.jpg"):
        predict.predict_files(forced_model_dir, bad, tmp_path / "out")
    _write(bad / "c.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match=r"would overwrite their input images \(.*c\.png\)"):
        predict.predict_files(forced_model_dir, bad, bad)
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        predict.predict_files(forced_model_dir, bad, tmp_path / "out", tasks=["depth"])


def test_segmentation_of_large_images_is_computed_at_a_bounded_size(monkeypatch):
    processor = CadMtlImageProcessor()
    logits = torch.zeros(3, 8, 8)
    logits[1, :, :4] = 5.0  # left half class 1
    logits[2, :, 4:] = 5.0  # right half class 2
    full = predict._class_map(processor, logits, (40, 30))
    monkeypatch.setattr(predict, "_MAX_SEGMENTATION_LOGITS", 3 * 10 * 10)
    bounded = predict._class_map(processor, logits, (40, 30))
    assert full.shape == bounded.shape == (40, 30)
    for class_map in (full, bounded):
        assert (class_map[:, :12] == 1).all() and (class_map[:, -12:] == 2).all()


# ---------------------------------------------------------------------------------------------- charts


def test_normalized_confusion_matrix_puts_rates_in_the_right_cells():
    counts = [[3, 1, 0], [0, 0, 0], [2, 0, 5]]
    rates = charts.normalized_confusion_matrix(counts)
    assert rates[0].tolist() == [0.75, 0.25, 0.0]
    assert np.isnan(rates[1]).all()  # no samples of class 1: no rate, not 0
    np.testing.assert_allclose(rates[2], [2 / 7, 0.0, 5 / 7])
    assert charts.normalized_confusion_matrix(counts, normalize=False).tolist() == counts
    with pytest.raises(ValueError, match="square"):
        charts.normalized_confusion_matrix([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-negative"):
        charts.normalized_confusion_matrix([[1, -2], [0, 1]])


def test_fold_confusion_matrix_keeps_busiest_classes_and_every_count():
    counts = np.array([[5, 0, 1, 0], [0, 0, 0, 1], [2, 0, 9, 0], [0, 1, 0, 0]])
    folded, names = charts.fold_confusion_matrix(counts, ["a", "b", "c", "d"], max_classes=3)
    assert names == ["a", "c", "other (2 classes)"]
    assert folded.tolist() == [[5, 1, 0], [2, 9, 0], [0, 0, 2]]
    assert folded.sum() == counts.sum()
    unchanged, same = charts.fold_confusion_matrix(counts, list("abcd"), max_classes=4)
    assert same == list("abcd") and np.array_equal(unchanged, counts)
    with pytest.raises(ValueError, match="4 label names"):
        charts.fold_confusion_matrix(counts[:3, :3], list("abcd"), max_classes=3)


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    classification = ClassificationMetrics(3, label_names=CLS_LABELS, top_k=(1,))
    classification.update(
        torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]]),
        torch.tensor([0, 0, 0, 2, 2]),
    )
    segmentation = SegmentationMetrics(3, label_names=SEG_LABELS)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 1
    prediction = target.clone()
    prediction[0, :2, :4] = 0
    segmentation.update(prediction, target)
    detection = DetectionMetrics(label_names=DET_LABELS)
    detection.update(
        [
            {
                "boxes": torch.tensor([[0.0, 0, 10, 10]]),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([0]),
            }
        ],
        [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}],
    )
    return {
        "cls": classification.compute_detailed().to_dict(),
        "seg": segmentation.compute_detailed().to_dict(),
        "det": detection.compute_detailed().to_dict(),
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        return image.size


def test_per_class_rows_sort_best_first_and_keep_undefined_classes(reports):
    metric, count_key, rows = charts.per_class_rows(reports["cls"])
    assert (metric, count_key) == ("acc@1", "support")
    assert rows == [("normal", 2 / 3, 3), ("cracked", 0.5, 2), ("worn", None, 0)]  # "worn" has no samples
    metric, count_key, rows = charts.per_class_rows(reports["seg"])
    assert (metric, count_key) == ("IoU", "gt_pixels")
    assert rows[0][0] == "background" and rows[-1] == ("scratch", None, 0)
    assert charts.per_class_rows(reports["det"])[:2] == ("AP", "num_ground_truth")
    assert charts.per_class_rows(reports["seg"], "Fscore")[0] == "Fscore"
    with pytest.raises(ValueError, match=r"no per-class 'AP50' in the report; available: \['Fscore', 'IoU'"):
        charts.per_class_rows(reports["seg"], "AP50")


def test_charts_are_valid_pngs_of_a_sensible_size(reports, tmp_path):
    for task in ("cls", "seg", "det"):
        width, height = _png_size(
            charts.plot_per_class(reports[task], tmp_path / f"{task}_bars.png", title=task)
        )
        assert 600 <= width <= 2000 and 250 <= height <= 2000
    width, height = _png_size(charts.plot_confusion_matrix(reports["cls"], tmp_path / "cm.png"))
    assert 400 <= width <= 2000 and 400 <= height <= 2000
    with pytest.raises(ValueError, match="no confusion matrix"):
        charts.plot_confusion_matrix(reports["det"], tmp_path / "det_cm.png")


def test_a_large_confusion_matrix_is_folded_to_max_classes(tmp_path):
    size = 70
    counts = np.diag(np.arange(1, size + 1))
    report = {"per_class": {}, "label_names": [f"class_{i}" for i in range(size)], "confusion_matrix": counts}
    width, height = _png_size(charts.plot_confusion_matrix(report, tmp_path / "big.png", max_classes=50))
    assert max(width, height) < 3000


@pytest.fixture
def eval_results(reports, tmp_path) -> Path:
    results = {
        name: {"task": task, "split": "test", "metrics": reports[task]["metrics"], "report": reports[task]}
        for name, task in (("chassis_cls@test", "cls"), ("exterior_det", "det"), ("exterior_seg", "seg"))
    }
    results["old_run"] = {"task": "cls", "split": "test", "metrics": {"acc@1": 0.5}}  # no report
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps({"paradigm": "adaptive", "results": results}))
    return path


def test_plot_evaluation_draws_every_config(eval_results, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=charts.__name__):
        written = charts.plot_evaluation(eval_results, tmp_path / "charts")
    assert [path.name for path in written] == [
        "chassis_cls@test_per_class.png",
        "chassis_cls@test_confusion_matrix.png",
        "exterior_det_per_class.png",
        "exterior_det_confusion_matrix.png",  # detection: classes + background, from its analysis
        "exterior_det_confusion_matrix_counts.png",
        "exterior_det_pr_curve.png",
        "exterior_det_f1_curve.png",
        "exterior_det_p_curve.png",
        "exterior_det_r_curve.png",
        "exterior_seg_per_class.png",
        "exterior_seg_confusion_matrix.png",
    ]
    assert all(_png_size(path)[0] > 300 for path in written)
    assert "1 of 4 configs" in caplog.text and "old_run" in caplog.text


def _detection_report(score_threshold: float = 0.3) -> dict:
    """Two images, two classes: a found dent, a scratch found as a dent, a missed scratch, two stray boxes."""
    metric = DetectionMetrics(label_names=DET_LABELS[:2], score_threshold=score_threshold)
    metric.update(
        [
            {
                "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]),
                "scores": torch.tensor([0.9, 0.8, 0.6]),
                "labels": torch.tensor([0, 0, 1]),
            },
            {
                "boxes": torch.tensor([[0.0, 0, 20, 15]]),
                "scores": torch.tensor([0.2]),
                "labels": torch.tensor([1]),
            },
        ],
        [
            {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])},
            {"boxes": torch.tensor([[0.0, 0, 20, 20]]), "labels": torch.tensor([1])},
        ],
    )
    return json.loads(json.dumps(metric.compute_detailed().to_dict()))  # as read back from eval_results.json


def test_detection_charts_from_a_small_report(tmp_path):
    report = _detection_report()
    assert report["analysis"]["confusion_matrix"]["matrix"] == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    for name, draw in (
        ("pr.png", lambda path: charts.plot_pr_curve(report, path, title="det")),
        ("f1.png", lambda path: charts.plot_confidence_curve(report, path, "F1")),
        ("recall.png", lambda path: charts.plot_confidence_curve(report, path, "recall")),
        ("cm.png", lambda path: charts.plot_detection_confusion_matrix(report, path)),
        ("cm_counts.png", lambda path: charts.plot_detection_confusion_matrix(report, path, normalize=False)),
    ):
        width, height = _png_size(draw(tmp_path / name))
        assert 500 <= width <= 2000 and 400 <= height <= 2000
    with pytest.raises(ValueError, match="curve must be one of"):
        charts.plot_confidence_curve(report, tmp_path / "x.png", "AP")


def test_detection_charts_of_an_old_report_fail_or_skip_clearly(tmp_path, caplog):
    old = _detection_report()
    del old["analysis"]  # eval_results.json written before the curves were recorded
    for draw in (charts.plot_pr_curve, charts.plot_confidence_curve, charts.plot_detection_confusion_matrix):
        with pytest.raises(ValueError, match=r"no detection .* evaluate again"):
            draw(old, tmp_path / "x.png")
    results = {
        "old_det": {"task": "det", "split": "test", "metrics": old["metrics"], "report": old},
        "new_det": {"task": "det", "split": "test", "metrics": old["metrics"], "report": _detection_report()},
    }
    source = tmp_path / "eval_results.json"
    source.write_text(json.dumps({"results": results}))
    with caplog.at_level(logging.WARNING, logger=charts.__name__):
        written = charts.plot_evaluation(source, tmp_path / "charts")
    assert [path.name for path in written if path.name.startswith("old_det")] == ["old_det_per_class.png"]
    assert len([path for path in written if path.name.startswith("new_det")]) == 7
    assert "1 of 2 detection configs" in caplog.text and "old_det" in caplog.text


def test_large_detection_confusion_matrix_keeps_background(tmp_path):
    size = 60
    labels = [f"class_{i}" for i in range(size)] + ["background"]
    matrix = np.diag(np.arange(1, size + 2))
    matrix[-1, -1] = 0
    report = {
        "per_class": {},
        "analysis": {"confusion_matrix": {"labels": labels, "matrix": matrix.tolist()}},
    }
    report["analysis"].update(score_threshold=0.3, iou_threshold=0.5)
    folded, names = charts.fold_confusion_matrix(matrix, labels, 50, keep=[size])
    assert names[-2:] == ["background", "other (12 classes)"] and folded.sum() == matrix.sum()
    folded, names = charts.fold_confusion_matrix(matrix[::-1, ::-1], labels[::-1], 50, keep=[0])
    assert names[0] == "background"  # the quietest row and column, kept anyway
    width, height = _png_size(charts.plot_detection_confusion_matrix(report, tmp_path / "big.png"))
    assert max(width, height) < 3000


def test_plot_evaluation_errors_name_the_file(tmp_path):
    broken = tmp_path / "eval_results.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"eval_results\.json is not valid JSON"):
        charts.plot_evaluation(broken, tmp_path / "charts")
    broken.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match=r"eval_results\.json has no 'results'"):
        charts.plot_evaluation(broken, tmp_path / "charts")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json does not exist"):
        charts.plot_evaluation(tmp_path / "nowhere.json", tmp_path / "charts")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_charts_and_predict(eval_results, forced_model_dir, image_folder, tmp_path, capsys):
    assert cli_main(["charts", str(eval_results), "--output-dir", str(tmp_path / "charts")]) == 0
    assert "wrote 11 charts" in capsys.readouterr().out
    assert len(list((tmp_path / "charts").glob("*.png"))) == 11

    arguments = [
        "predict",
        str(forced_model_dir),
        str(image_folder / "wide.png"),
        str(image_folder / "broken.jpg"),
    ]
    assert (
        cli_main(
            [*arguments, "--output-dir", str(tmp_path / "pics"), "--threshold", "0.5", "--device", "cpu"]
        )
        == 1  # one input unreadable, the other scored
    )
    printed = capsys.readouterr().out
    assert "scored 1 images on cpu" in printed and "1 unreadable inputs (errors in summary.csv)" in printed
    assert "and 1 overlays" in printed
    assert (tmp_path / "pics" / "wide.png").is_file()

    assert (
        cli_main(["predict", str(forced_model_dir), str(tmp_path / "nope"), "--output-dir", str(tmp_path)])
        == 2
    )
    assert "nope does not exist" in capsys.readouterr().err
