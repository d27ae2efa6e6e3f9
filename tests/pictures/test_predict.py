"""`cadmtl predict` as a batch tool: COCO results that pycocotools loads, verdicts, summary rows, bad input, videos."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from pycocotools.coco import COCO

from cadmtl.cli import main as cli_main
from cadmtl.pictures import predict
from cadmtl.testing import DET_LABELS, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel


@pytest.fixture(scope="module")
def forced_model_dir(tmp_path_factory) -> Path:
    """A tiny model forced to call everything anomalous: class "cracked", "scratch" boxes, "dent" mask."""
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    with torch.no_grad():
        model.cls_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
        model.det_head.cls_logits.bias.copy_(torch.tensor([-20.0, 20.0]))
        model.det_head.centerness.bias.fill_(20.0)
        model.det_head.box_distances.bias.fill_(1.0)
        model.seg_decoder.classifier.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    model.config.verdict_source = "cls"
    model.config.verdict_threshold = 0.9
    folder = tmp_path_factory.mktemp("forced-model")
    model.save_pretrained(folder, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    return folder


def _truncated_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(3).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture
def inputs(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "parts").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)).save(root / "parts" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "parts" / "small.jpg")
    (root / "parts" / "cut.jpg").write_bytes(_truncated_jpeg())
    (root / "notes.png").write_bytes(b"this is not a png")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_files_writes_coco_results_summary_and_crops(forced_model_dir, inputs, tmp_path, monkeypatch):
    # a truncated file is an error even where something asked PIL to fill truncated images with grey
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    out = tmp_path / "out"
    run = predict.predict_files(
        forced_model_dir,
        [inputs / "parts", str(inputs / "*.png")],
        out,
        batch_size=2,
        crops=True,
        device="cpu",
    )
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored

    rows = _rows(out / "summary.csv")
    assert list(rows[0]) == list(predict.SUMMARY_COLUMNS)
    by_name = {Path(row["file_name"]).name: row for row in rows}
    assert set(by_name) == {"cut.jpg", "gray.png", "small.jpg", "notes.png", "wide.png"}
    for bad in ("cut.jpg", "notes.png"):  # reported, never scored
        row = by_name[bad]
        assert row["error"].startswith(("OSError", "UnidentifiedImageError")) and row["verdict"] == "error"
        assert row["anomaly_score"] == row["num_defects"] == ""
    assert "truncated" in by_name["cut.jpg"]["error"]

    coco = COCO(str(out / "images.json"))
    results = coco.loadRes(str(out / "detections.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == DET_LABELS
    images = {image["file_name"]: image for image in coco.dataset["images"]}
    assert sorted(Path(name).name for name in images) == ["gray.png", "small.jpg", "wide.png"]
    assert sorted(image["id"] for image in images.values()) == [1, 2, 3]
    assert (images[str(inputs / "wide.png")]["width"], images[str(inputs / "wide.png")]["height"]) == (90, 60)

    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == run.num_detections == len(run.crops) > 0
    assert {d["category_id"] for d in detections} == {2}  # "scratch", label index 1 -> COCO id 2
    for name, image in images.items():
        row = by_name[Path(name).name]
        own = [d for d in detections if d["image_id"] == image["id"]]
        assert all(d["file_name"] == name for d in own)
        assert int(row["num_defects"]) == len(own) == len(results.getAnnIds(imgIds=[image["id"]])) > 0
        for d in own:
            x, y, w, h = d["bbox"]
            assert min(x, y) >= 0 and w > 0 and h > 0 and x + w <= image["width"] + 0.01
            assert y + h <= image["height"] + 0.01 and 0.3 <= d["score"] <= 1
        # verdict_source "cls": 1 - P(normal) with a +8 bias on "cracked"; threshold 0.9 -> NG
        assert row["verdict"] == "NG" and float(row["anomaly_score"]) > 0.99
        assert row["top_class"] == "cracked" and float(row["top_class_score"]) > 0.99 and row["error"] == ""
    first, crop = detections[0], run.crops[0]
    image = coco.imgs[first["image_id"]]
    x, y, w, h = first["bbox"]
    expected = (
        min(image["width"], math.ceil(x + w)) - max(0, math.floor(x)),
        min(image["height"], math.ceil(y + h)) - max(0, math.floor(y)),
    )
    assert np.abs(np.subtract(Image.open(crop).size, expected)).max() <= 1  # the bbox is rounded to 0.01 px
    assert crop.name == "0_scratch.png"
    assert run.crops[0].is_relative_to(out / "crops")
    assert {p.relative_to(out).as_posix() for p in run.overlays} == {
        "parts/gray.png", "parts/small.png", "wide.png"
    }  # fmt: skip


def test_the_verdict_follows_the_saved_threshold(forced_model_dir, inputs, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in forced_model_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "verdict_threshold": 1.01}))
    predictor = predict.Predictor.from_pretrained(model_dir, "cpu", tasks=["cls"])
    (result,) = predictor([Image.open(inputs / "wide.png").convert("RGB")])
    assert result.verdict == "OK" and 0.99 < result.anomaly_score <= 1.0
    assert set(result.head_scores) == {"cls", "det", "seg"} and result.head_scores["seg"] == pytest.approx(
        1.0
    )
    assert result.prediction.classes[0][0] == "cracked" and len(result.prediction.boxes) > 0
    assert result.prediction.segmentation is None  # only "cls" is drawn: no full-size class map


def test_a_model_without_an_anomaly_head_gets_an_empty_verdict(forced_model_dir, inputs, tmp_path):
    # a classifier of part names trained alone: no `normal` class, no det / seg head trained -> no verdict
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in forced_model_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config.update(verdict_source="max", image_sizes={"cls": 64}, cls_labels=["door", "hood", "mirror"])
    (model_dir / "config.json").write_text(json.dumps(config))
    predict.predict_files(model_dir, [inputs / "wide.png"], tmp_path / "out", device="cpu")
    (row,) = _rows(tmp_path / "out" / "summary.csv")
    assert (row["verdict"], row["anomaly_score"], row["top_class"], row["error"]) == ("", "", "mirror", "")


def test_nothing_readable_still_writes_the_summary_then_fails(forced_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(_truncated_jpeg())
    with pytest.raises(ValueError, match=r"none of the 2 image files could be read: .*a\.png .*b\.jpg"):
        predict.predict_files(forced_model_dir, bad, tmp_path / "out", device="cpu")
    assert [row["error"] != "" for row in _rows(tmp_path / "out" / "summary.csv")] == [True, True]
    with pytest.raises(FileNotFoundError, match=r"the pattern .*\*\.tif matches no file"):
        predict.collect_images([str(bad / "*.tif")])


def _write_video(path: Path, frames: int, rate: int) -> None:
    av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_videos_are_sampled_at_the_chosen_rate_and_a_broken_one_is_reported(forced_model_dir, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    _write_video(clips / "belt.mp4", frames=10, rate=4)  # 2.5 s
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    Image.new("RGB", (32, 32), (90, 90, 90)).save(clips / "still.png")

    times = [time for time, _ in predict.iter_video_frames(clips / "belt.mp4", fps=1)]
    assert times == pytest.approx([0.0, 1.0, 2.0])
    assert len(list(predict.iter_video_frames(clips / "belt.mp4", fps=0))) == 10
    frame = next(predict.iter_video_frames(clips / "belt.mp4", fps=2))[1]
    assert frame.mode == "RGB" and frame.size == (64, 48)

    out = tmp_path / "out"
    run = predict.predict_files(forced_model_dir, clips, out, video_fps=2, device="cpu", batch_size=4)
    rows = {row["file_name"]: row for row in _rows(out / "summary.csv")}
    frame_names = [f"{clips / 'belt.mp4'}#t={t:.3f}" for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert all(rows[name]["verdict"] == "NG" for name in frame_names)
    assert "cannot be decoded" in rows[str(clips / "broken.mp4")]["error"]
    assert rows[str(clips / "still.png")]["verdict"] == "NG" and run.num_scored == 6
    assert (out / "belt.mp4" / "1.500s.png").is_file() and (out / "still.png").is_file()
    images = json.loads((out / "images.json").read_text())["images"]
    assert [image["file_name"] for image in images] == [*frame_names, str(clips / "still.png")]


def test_default_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert predict.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert predict.default_device() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert predict.default_device() == "cpu"


def test_cli_predict_reports_what_it_wrote(forced_model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(
        ["predict", str(forced_model_dir), str(inputs), "--output-dir", str(out), "--crops", "--no-overlays"]
    )
    printed = capsys.readouterr().out
    assert code == 1  # two inputs could not be read; the other three were scored
    assert "scored 3 images on" in printed and "3 NG, 0 OK" in printed and "2 unreadable inputs" in printed
    assert "and 0 overlays and" in printed and not list(out.glob("*.png"))
    assert len(_rows(out / "summary.csv")) == 5


def test_an_uninformative_model_gets_scores_without_ok_or_ng(forced_model_dir, inputs, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in forced_model_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    reason = "the best image AUROC on the validation images (max: 0.512) is below 0.6"
    config.update(verdict_status="uninformative", verdict_reason=reason)
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    images = [str(inputs / "wide.png"), str(inputs / "parts" / "small.jpg")]
    assert cli_main(["predict", str(model_dir), *images, "--output-dir", str(out), "--no-overlays"]) == 0
    printed = capsys.readouterr().out
    assert "scored 2 images on " in printed
    assert f": no OK / NG (the model's verdict is uninformative: {reason})" in printed
    rows = _rows(out / "summary.csv")
    assert [row["verdict"] for row in rows] == ["uninformative", "uninformative"]
    assert all(0.99 < float(row["anomaly_score"]) <= 1.0 for row in rows)  # the score is still given
    info = json.loads((out / "images.json").read_text())["info"]
    assert (info["verdict_status"], info["verdict_reason"]) == ("uninformative", reason)

    # the forced model was never calibrated: its OK / NG says so
    assert cli_main(["predict", str(forced_model_dir), *images, "--output-dir", str(tmp_path / "raw")]) == 0
    assert (
        "2 NG, 0 OK (verdict threshold uncalibrated, not calibrated on labelled images)"
        in capsys.readouterr().out
    )
