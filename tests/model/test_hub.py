"""Hub round trips: save/load, remote code without the package, offline repo-id loads, pipelines, push_to_hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import pipeline

from cadmtl.testing import CLS_LABELS, DET_LABELS, SEG_LABELS, populate_hf_cache, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[CadMtlModel, Path]:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    folder = tmp_path_factory.mktemp("cadmtl-tiny")
    model.save_pretrained(folder, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    return model, folder


def test_save_pretrained_writes_a_complete_hub_repo(saved_model) -> None:
    _, folder = saved_model
    files = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "configuration_cadmtl.py",
        "modeling_cadmtl.py",
        "image_processing_cadmtl.py",
        "detection_cadmtl.py",
        "segmentation_cadmtl.py",
        "neck_cadmtl.py",
        "tasks_cadmtl.py",
    } <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cadmtl"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cadmtl.CadMtlConfig",
        "AutoModel": "modeling_cadmtl.CadMtlModel",
        "AutoModelForImageClassification": "modeling_cadmtl.CadMtlForImageClassification",
        "AutoModelForObjectDetection": "modeling_cadmtl.CadMtlForObjectDetection",
        "AutoModelForSemanticSegmentation": "modeling_cadmtl.CadMtlForSemanticSegmentation",
    }
    assert (config["cls_labels"], config["det_labels"], config["seg_labels"]) == (
        CLS_LABELS,
        DET_LABELS,
        SEG_LABELS,
    )
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_cadmtl.CadMtlImageProcessor"}
    assert processor["size"] == {"height": 64, "width": 64}
    # The flat code files only import each other with single-level relative imports (Hub requirement).
    for code in folder.glob("*.py"):
        assert not re.search(r"^\s*(from|import) modeling_cadmtl", code.read_text(), re.MULTILINE), code.name


def test_model_card_has_valid_hub_metadata(saved_model) -> None:
    _, folder = saved_model
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "object-detection"
    assert metadata["license"] == "other" and metadata["license_name"] == "dinov3-license"
    assert "dinov3" in metadata["tags"]
    assert "datasets" not in metadata  # saved without training data: the card claims no dataset
    assert "$" not in text.split("---\n", 2)[2].replace("$$", "")  # every placeholder was filled


def test_save_load_round_trip_gives_identical_outputs(saved_model) -> None:
    model, folder = saved_model
    loaded = CadMtlModel.from_pretrained(folder).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    expected, actual = model(pixel_values), loaded(pixel_values)
    for field in ("cls_logits", "det_logits", "det_centerness_logits", "pred_boxes", "seg_logits"):
        assert torch.equal(expected[field], actual[field]), field


REMOTE_LOAD = """
import sys
sys.modules["modeling_cadmtl"] = None  # the package must not be importable: only the repo's own code may run
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForObjectDetection
model = AutoModel.from_pretrained({source!r}, trust_remote_code=True).eval()
detector = AutoModelForObjectDetection.from_pretrained({source!r}, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained({source!r}, trust_remote_code=True)
pixel_values = torch.load({inputs!r})
torch.save({{"module": type(model).__module__, "processor": type(processor).__module__,
            "seg_logits": model(pixel_values).seg_logits, "det_logits": detector(pixel_values).logits,
            "id2label": detector.config.id2label}}, {result!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("by_repo_id", [False, True], ids=["local-folder", "repo-id-offline-cache"])
def test_remote_code_load_without_the_package(saved_model, tmp_path, by_repo_id: bool) -> None:
    model, folder = saved_model
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "inputs.pt")
    # The same intra-op thread count as this process: outputs are compared bit for bit.
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    source = str(folder)
    if by_repo_id:
        populate_hf_cache(folder, "cad-mtl/dinov3-b-adaptive", tmp_path / "hf_home")
        source = "cad-mtl/dinov3-b-adaptive"
    script = REMOTE_LOAD.format(
        source=source, inputs=str(tmp_path / "inputs.pt"), result=str(tmp_path / "out.pt")
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    assert result["processor"].startswith("transformers_modules.")
    assert result["id2label"] == dict(enumerate(DET_LABELS))
    reference = model(pixel_values)
    assert torch.equal(result["seg_logits"], reference.seg_logits)
    assert torch.equal(result["det_logits"], reference.det_logits)


def test_the_three_pipelines(saved_model) -> None:
    _, folder = saved_model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))

    classify = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    predictions = classify(image, top_k=3)
    assert [p["label"] for p in predictions] != [] and {p["label"] for p in predictions} == set(CLS_LABELS)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)

    detect = pipeline("object-detection", model=str(folder), trust_remote_code=True)
    detections = detect(image, threshold=0.0)
    assert 0 < len(detections) <= 100
    for detection in detections:
        assert detection["label"] in DET_LABELS
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 100 and 0 <= box["ymin"] <= box["ymax"] <= 80

    segment = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    segments = segment(image, subtask="semantic")
    assert {s["label"] for s in segments} <= set(SEG_LABELS)
    assert all(s["mask"].size == (100, 80) for s in segments)
    # The masks of the classes present partition the image.
    coverage = sum(np.asarray(s["mask"], dtype=np.int64) // 255 for s in segments)
    assert (coverage == 1).all()


def test_push_to_hub_uploads_the_saved_folder_with_our_card(saved_model, monkeypatch) -> None:
    model, _ = saved_model
    uploaded: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["created"] = repo_id
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision, create_pr):
            uploaded["files"] = {
                p.name: p.read_text() for p in Path(folder_path).iterdir() if p.suffix == ".md"
            }
            uploaded["names"] = sorted(p.name for p in Path(folder_path).iterdir())
            return "commit-url"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    result = model.push_to_hub(
        "cad-mtl/test-push",
        model_card_data={"results": {"exterior_det": {"task": "det", "metrics": {"AP": 0.5}}}},
    )
    assert result == "commit-url" and uploaded["created"] == "cad-mtl/test-push"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_cadmtl.py"} <= set(
        uploaded["names"]
    )
    metadata = yaml.safe_load(uploaded["files"]["README.md"].split("---\n")[1])
    [index] = metadata["model-index"]
    [result_entry] = index["results"]
    assert result_entry["dataset"]["config"] == "exterior_det"
    assert result_entry["metrics"] == [{"type": "AP", "value": 50.0, "name": "AP"}]
