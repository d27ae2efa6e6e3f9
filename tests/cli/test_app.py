"""The Gradio demo (`app.py`): driven in-process through gradio_client, and in a real headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.anomaly import PatchMemoryScorer
from cadmtl.features import backbone_from_config
from cadmtl.testing import CLS_LABELS, tiny_cadmtl_config, tiny_vit_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

gradio = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="the demo extra (gradio_client) is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_app():
    offline = os.environ.get("HF_HUB_OFFLINE")
    spec = importlib.util.spec_from_file_location("cadmtl_demo_app", REPO_ROOT / "app.py")
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
def models(tmp_path_factory) -> dict[str, Path]:
    """A forced CadMtl model (always "cracked", "scratch" boxes, a "dent" mask, NG), a patch-memory scorer and a
    reference localiser's settings, all tiny and random."""
    root = tmp_path_factory.mktemp("demo-models")
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    with torch.no_grad():
        model.cls_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
        model.det_head.cls_logits.bias.copy_(torch.tensor([-20.0, 20.0]))
        model.det_head.centerness.bias.fill_(20.0)
        model.det_head.box_distances.bias.fill_(1.0)
        model.seg_decoder.classifier.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    model.config.verdict_source, model.config.verdict_threshold = "cls", 0.9
    model.save_pretrained(
        root / "model", image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64})
    )

    scorer = PatchMemoryScorer.from_backbone(
        backbone_from_config(tiny_vit_config()).eval(), layers=[1, 2], image_size=(64, 64)
    )
    scorer.fit(list(torch.randn(2, 3, 64, 64) * 0.1), few_shot=True)
    scorer.image_threshold, scorer.pixel_threshold = 1e-3, 1e-3
    scorer.save_pretrained(root / "anomaly")

    settings = {
        "model": "tiny",
        "layers": [2],
        "image_size": 64,
        "localizer": {"window": 2, "sigma": 2.0, "threshold": 1e-3, "min_area": 1, "chunk_size": 1024},
    }
    (root / "reference").mkdir()
    (root / "reference" / "localizer.json").write_text(json.dumps(settings))
    return {"model": root / "model", "anomaly": root / "anomaly", "reference": root / "reference"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-images")
    rng = np.random.default_rng(0)
    plain = rng.integers(100, 140, (64, 80, 3), dtype=np.uint8)
    marked = plain.copy()
    marked[20:40, 30:50] = 255
    Image.fromarray(plain).save(root / "plain.png")
    Image.fromarray(marked).save(root / "marked.png")
    (root / "notes.png").write_text("not an image")
    return {"plain": root / "plain.png", "marked": root / "marked.png", "text": root / "notes.png"}


@pytest.fixture(scope="module")
def served(models):
    demo = app.build_demo_app(
        models["model"], anomaly_model=models["anomaly"], reference_model=models["reference"]
    )
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True
    )
    yield url
    demo.close()


def test_the_predict_endpoint_returns_verdict_scores_and_annotations(served, images):
    client = gradio_client.Client(served, verbose=False)
    annotated, classes, verdict, score, details = client.predict(
        gradio_client.handle_file(str(images["plain"])), api_name="/predict"
    )
    assert verdict.startswith("NG (anomaly score 1.000, threshold 0.900)")
    assert score == pytest.approx(1.0, abs=1e-3) and details["verdict"] == "NG"
    assert details["verdict_source"] == "cls" and details["head_scores"]["cls"] > 0.999
    assert classes["label"] == "cracked"
    ranked = [c["label"] for c in classes["confidences"]]
    assert ranked[0] == "cracked" and sorted(ranked) == sorted(CLS_LABELS)  # every class score is shown
    labels = [annotation["label"] for annotation in annotated["annotations"]]
    assert labels == ["dent", "scratch"] and details["detections"]  # one layer per label: the mask, the boxes
    with Image.open(annotated["image"]) as shown:
        assert shown.size == (80, 64)
    for box in (d["box_xyxy"] for d in details["detections"]):
        assert 0 <= box[0] < box[2] <= 80 and 0 <= box[1] < box[3] <= 64

    with pytest.raises(Exception, match=r"notes\.png is not an image this demo can read"):
        client.predict(gradio_client.handle_file(str(images["text"])), api_name="/predict")


def test_the_anomaly_and_reference_tabs(served, images):
    client = gradio_client.Client(served, verbose=False)
    heat, score, verdict = client.predict(
        gradio_client.handle_file(str(images["marked"])), api_name="/anomaly"
    )
    with Image.open(heat) as picture:
        assert picture.size == (80, 64)
    assert score > 1e-3 and verdict == "NG"

    same, same_score, same_verdict = client.predict(
        gradio_client.handle_file(str(images["plain"])),
        gradio_client.handle_file(str(images["plain"])),
        api_name="/reference",
    )
    assert same["annotations"] == [] and same_score == pytest.approx(0.0, abs=1e-4)
    assert same_verdict.startswith("OK")
    differs, differs_score, differs_verdict = client.predict(
        gradio_client.handle_file(str(images["plain"])),
        gradio_client.handle_file(str(images["marked"])),
        api_name="/reference",
    )
    assert differs_verdict.startswith("NG") and differs_score > 1e-3 and differs["annotations"]


def _notices(demo) -> dict[str, str]:
    return {
        block.elem_id: block.value
        for block in demo.blocks.values()
        if isinstance(block, gradio.Markdown) and block.elem_id and "notice" in block.elem_id
    }


@pytest.mark.parametrize("generated", [True, False])
def test_the_page_says_when_a_model_was_trained_on_generated_images(models, tmp_path, generated):
    record = {"repo": "data/cad100k-mini", "configs": ["exterior_ad"], "generated": generated}
    for name in ("model", "anomaly"):
        shutil.copytree(models[name], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "training_data": record}))
    notices = _notices(app.build_demo_app(tmp_path / "model", anomaly_model=tmp_path / "anomaly"))
    if generated:
        expected = app.GENERATED_NOTICE.format(repo="data/cad100k-mini")
        assert notices == {"generated-notice": expected, "anomaly-generated-notice": expected}
        assert expected.startswith(
            "**This model was trained on generated demo images** (`data/cad100k-mini`)"
        )
    else:
        assert notices == {}
    # a model that records no training data (saved before the record existed) gets no notice either
    assert _notices(app.build_demo_app(models["model"], anomaly_model=models["anomaly"])) == {}


def test_default_model_prefers_the_environment_then_trains_then_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CADMTL_MODEL", "some/model")
    assert app.default_model() == ("some/model", False)
    monkeypatch.delenv("CADMTL_MODEL")
    monkeypatch.setattr(app, "ROOT", tmp_path)
    monkeypatch.setattr(app, "DEMO_MODEL", tmp_path / "outputs" / "cadmtl-demo" / "model")
    calls = []

    def failed_training(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(app.subprocess, "run", failed_training)
    model, untrained = app.default_model()
    assert untrained and calls[0][-1].endswith("train_accelerate.py")
    assert CadMtlModel.from_pretrained(model).config.cls_labels == tiny_cadmtl_config().cls_labels


@pytest.mark.slow
def test_python_app_py_serves_the_model_named_by_the_environment(models, images):
    """The documented command: `CADMTL_MODEL=DIR GRADIO_SERVER_PORT=PORT python app.py`."""
    port = _free_port()
    env = dict(os.environ, CADMTL_MODEL=str(models["model"]), GRADIO_SERVER_PORT=str(port))
    env.update(GRADIO_SERVER_NAME="127.0.0.1", PYTHONPATH=str(REPO_ROOT))
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
        _, _, verdict, score, _ = client.predict(
            gradio_client.handle_file(str(images["plain"])), api_name="/predict"
        )
        assert verdict.startswith("NG") and score > 0.99
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------------------------------- a real browser
def _browser() -> tuple[str, str] | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.mark.slow
@pytest.mark.skipif(
    _browser() is None,
    reason="headless browser test needs chromium and chromedriver (apt-get install chromium chromium-driver)",
)
def test_a_browser_uploads_an_image_and_sees_the_annotated_result(served, images, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver_path = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 60)
        upload = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "input[type=file]"))
        upload.send_keys(str(images["plain"]))  # the upload event runs the model
        verdict = wait.until(
            lambda page: (
                page.find_element(By.CSS_SELECTOR, "#verdict textarea").get_attribute("value") or None
            )
        )
        shown = wait.until(
            lambda page: (
                page.find_elements(By.CSS_SELECTOR, "#annotated img")
                if len(page.find_elements(By.CSS_SELECTOR, "#annotated img")) >= 2
                else None
            )
        )
        screenshot = tmp_path / "demo.png"
        browser.save_screenshot(str(screenshot))

        # the Anomaly tab: open it, upload the marked photo, score it
        tab = next(
            b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Anomaly" in b.text
        )
        tab.click()
        anomaly_upload = wait.until(
            lambda page: next(
                (
                    element
                    for element in page.find_elements(By.CSS_SELECTOR, "input[type=file]")
                    if element.find_element(By.XPATH, "ancestor::*[@role='tabpanel']").is_displayed()
                ),
                None,
            )
        )
        anomaly_upload.send_keys(str(images["marked"]))
        wait.until(  # the upload's preview is shown before the Score button may run
            lambda page: (
                [
                    image
                    for panel in page.find_elements(By.CSS_SELECTOR, "[role=tabpanel]")
                    if panel.is_displayed()
                    for image in panel.find_elements(By.TAG_NAME, "img")
                ]
                or None
            )
        )
        browser.find_element(By.ID, "anomaly-run").click()
        anomaly_verdict = wait.until(
            lambda page: (
                page.find_element(By.CSS_SELECTOR, "#anomaly-verdict textarea").get_attribute("value") or None
            )
        )
        anomaly_score = browser.find_element(By.CSS_SELECTOR, "#anomaly-score input").get_attribute("value")
    finally:
        browser.quit()
    assert anomaly_verdict == "NG" and float(anomaly_score) > 1e-3  # the scorer's thresholds are 1e-3
    assert verdict.startswith("NG (anomaly score")
    assert len(shown) >= 2  # the photo and at least one mask / box layer
    with Image.open(screenshot) as picture:
        assert picture.size[0] >= 1000 and len(picture.getcolors(1 << 20) or [None] * 1000) > 50
