"""The demo app's bounds and honesty: big photos are downscaled (a 48 MP JPEG through gradio_client stays within
1.5 GB of extra memory and 30 s), large uploads are refused, the queue has a concurrency limit, no score shows
before a run, and an uninformative verdict shows the score without OK / NG."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.pictures.predict import Predictor
from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

gradio = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="the demo extra (gradio_client) is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_app():
    offline = os.environ.get("HF_HUB_OFFLINE")
    spec = importlib.util.spec_from_file_location("cadmtl_demo_app_limits", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if offline is None:  # app.py defaults it for its own process; the other tests keep the session's setting
        os.environ.pop("HF_HUB_OFFLINE", None)
    return module


app = _load_app()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model forced to see a defect everywhere (a "dent" mask over the whole photo, boxes): the worst case
    for the annotations the page draws."""
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    with torch.no_grad():
        model.cls_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
        model.det_head.cls_logits.bias.copy_(torch.tensor([-20.0, 20.0]))
        model.det_head.centerness.bias.fill_(20.0)
        model.det_head.box_distances.bias.fill_(1.0)
        model.seg_decoder.classifier.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    folder = tmp_path_factory.mktemp("limits") / "model"
    model.save_pretrained(folder, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    return folder


def test_limits_come_from_the_environment(monkeypatch) -> None:
    for variable in ("CADMTL_CONCURRENCY", "CADMTL_QUEUE_SIZE", "CADMTL_MAX_UPLOAD_MB"):
        monkeypatch.delenv(variable, raising=False)
    assert app.serving_limits() == {"concurrency": 1, "queue_size": 16, "max_file_size": "20mb"}
    monkeypatch.setenv("CADMTL_CONCURRENCY", "3")
    monkeypatch.setenv("CADMTL_MAX_UPLOAD_MB", "5")
    assert app.serving_limits() == {"concurrency": 3, "queue_size": 16, "max_file_size": "5mb"}
    monkeypatch.setenv("CADMTL_QUEUE_SIZE", "0")
    with pytest.raises(ValueError, match="CADMTL_QUEUE_SIZE='0' must be at least 1"):
        app.serving_limits()


def test_the_page_queues_and_shows_no_score_before_a_run(model_dir, monkeypatch) -> None:
    monkeypatch.setenv("CADMTL_CONCURRENCY", "2")
    demo = app.build_demo_app(model_dir)
    assert demo._queue.default_concurrency_limit == 2 and demo._queue.max_size == 16
    numbers = [block for block in demo.blocks.values() if isinstance(block, gradio.Number)]
    assert numbers and all(n.value is None and n.placeholder == "no photo inspected yet" for n in numbers)
    header = next(block.value for block in demo.blocks.values() if isinstance(block, gradio.Markdown))
    assert "**not calibrated** (verdict status `uncalibrated`)" in header and "0.500" in header


def test_an_uninformative_model_shows_the_score_without_ok_or_ng(model_dir, tmp_path) -> None:
    predictor = Predictor.from_pretrained(model_dir, "cpu")
    reason = "the best image AUROC on the validation images (max: 0.512) is below 0.6"
    predictor.config.verdict_status, predictor.config.verdict_reason = "uninformative", reason
    Image.fromarray(np.full((48, 64, 3), 120, dtype=np.uint8)).save(tmp_path / "part.png")
    _, _, verdict, score, details = app.inspect(predictor, str(tmp_path / "part.png"))
    assert verdict == (
        f"no OK / NG (anomaly score {score:.3f}): this model's verdict is uninformative ({reason})"
    )
    assert score > 0.99 and details["verdict"] is None and details["verdict_status"] == "uninformative"
    assert app.verdict_summary(predictor.config).startswith("**No OK / NG verdict**")
    assert reason in app.verdict_summary(predictor.config)
    predictor.config.verdict_status, predictor.config.verdict_reason = "calibrated", None
    assert app.verdict_summary(predictor.config).endswith("calibrated on labelled validation photos.")


def _peak_and_current_rss(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in bytes of a Linux process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
def test_a_48_megapixel_photo_is_answered_in_bounded_memory_and_time(model_dir, tmp_path) -> None:
    width, height = 8000, 6000  # 48 MP, a smooth photo-like gradient (~1 MB of JPEG)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    del pixels
    Image.fromarray(np.full((48, 64, 3), 120, dtype=np.uint8)).save(tmp_path / "small.png")
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "heavy.png")  # ~4.3 MB of incompressible PNG
    assert (tmp_path / "heavy.png").stat().st_size > 4 * 2**20

    port = _free_port()
    env = dict(os.environ, CADMTL_MODEL=str(model_dir), GRADIO_SERVER_PORT=str(port))
    env.update(GRADIO_SERVER_NAME="127.0.0.1", PYTHONPATH=str(REPO_ROOT), CADMTL_MAX_UPLOAD_MB="4")
    env.pop("CADMTL_MAX_IMAGE_PIXELS", None)  # the documented default budget, 12 MP
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "app.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "app.py did not start serving within 120 s"
                time.sleep(1)
        client.predict(gradio_client.handle_file(str(tmp_path / "small.png")), api_name="/predict")  # warm up
        _, before = _peak_and_current_rss(server.pid)
        started = time.monotonic()
        annotated, _, verdict, score, details = client.predict(
            gradio_client.handle_file(str(tmp_path / "big.jpg")), api_name="/predict"
        )
        seconds = time.monotonic() - started
        peak, _ = _peak_and_current_rss(server.pid)
        growth = peak - before
        assert verdict.startswith("NG (anomaly score") and score > 0.99
        with Image.open(annotated["image"]) as shown:
            assert shown.size == (1154, 866)  # the view is drawn at 1 MP
        assert details["image_size"] == [4000, 3000]  # analysed at the 12 MP budget, 4:3 kept
        assert all(
            box[2] <= 4000 and box[3] <= 3000 for box in (d["box_xyxy"] for d in details["detections"])
        )
        assert seconds < 30, f"the 48 MP photo took {seconds:.1f} s"
        assert growth < 1.5 * 2**30, f"the server's peak memory grew by {growth / 2**30:.2f} GB"

        with pytest.raises(Exception, match=r"(?i)file.*(size|large|exceeds)"):
            client.predict(gradio_client.handle_file(str(tmp_path / "heavy.png")), api_name="/predict")
        assert server.poll() is None  # refused, still serving
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"48 MP photo: {seconds:.1f} s, peak memory +{growth / 2**20:.0f} MB")
