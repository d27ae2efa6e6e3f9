"""The OK / NG inspection pipeline shipped with a saved model (`pipeline_cadmtl.py`, `custom_pipelines`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from cadmtl.testing import CLS_LABELS, DET_LABELS, populate_hf_cache, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.configuration_cadmtl import PIPELINE_TASK
from modeling_cadmtl.pipeline_cadmtl import CadMtlInspectionPipeline

SIZES = {"cls": 32, "det": 64, "seg": 64}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[CadMtlModel, Path]:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config(image_sizes=SIZES, verdict_threshold=0.4)).eval()
    with torch.no_grad():  # some detection scores above 0.3, so the pipeline lists detections
        model.det_head.cls_logits.bias.fill_(0.0)
    folder = tmp_path_factory.mktemp("inspection") / "model"
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, task_sizes=SIZES)
    model.save_pretrained(folder, image_processor=processor)
    return model, folder


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (80, 100, 3), dtype=np.uint8))


def reference(model: CadMtlModel, image: Image.Image) -> dict:
    """The verdict by hand: each head at its own size, then `post_process_verdict`."""
    processor = CadMtlImageProcessor()
    with torch.no_grad():
        small = model(
            processor(image, size={"height": 32, "width": 32}, return_tensors="pt")["pixel_values"],
            task="cls",
        )
        large = model(processor(image, size={"height": 64, "width": 64}, return_tensors="pt")["pixel_values"])
    outputs = {
        "cls_logits": small.cls_logits,
        **{k: v for k, v in large.items() if k.startswith(("det_", "seg_"))},
    }
    return processor.post_process_verdict(outputs, model.config)[0]


def test_the_saved_config_declares_the_pipeline(saved) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        PIPELINE_TASK: {
            "impl": "pipeline_cadmtl.CadMtlInspectionPipeline",
            "pt": ["AutoModel"],
            "type": "image",
        }
    }
    assert (folder / "pipeline_cadmtl.py").read_text() == (
        Path(sys.modules[CadMtlInspectionPipeline.__module__].__file__).read_text()
    )


def test_pipeline_gives_the_verdict_classes_and_detections(saved) -> None:
    model, folder = saved
    inspect = pipeline(model=str(folder), pipeline_class=CadMtlInspectionPipeline)
    assert [tasks for _, tasks in inspect.size_groups] == [("cls",), ("det", "seg")]
    image = picture()
    result = inspect(image, det_threshold=0.3, top_k=2)
    expected = reference(model, image)
    assert result["anomaly_score"] == pytest.approx(expected["anomaly_score"], abs=1e-6)
    assert result["head_scores"] == pytest.approx(expected["head_scores"], abs=1e-6)
    assert result["verdict"] == expected["verdict"] == ("NG" if expected["anomaly_score"] >= 0.4 else "OK")
    assert (result["source"], result["threshold"]) == ("max", 0.4)
    assert len(result["classes"]) == 2 and {c["label"] for c in result["classes"]} <= set(CLS_LABELS)
    assert result["classes"][0]["score"] >= result["classes"][1]["score"]
    assert result["detections"], "a zero detection bias scores 0.5 * centerness: some boxes pass 0.3"
    for detection in result["detections"]:
        assert detection["label"] in DET_LABELS and detection["score"] >= 0.3
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 100 and 0 <= box["ymin"] <= box["ymax"] <= 80
    # the threshold is the stored one unless a call overrides it
    score = result["anomaly_score"]
    assert inspect(image, threshold=score)["verdict"] == "NG"
    assert inspect(image, threshold=np.nextafter(score, 2.0))["verdict"] == "OK"
    both = inspect([image, picture(1)])
    assert len(both) == 2 and both[0]["anomaly_score"] == pytest.approx(score, abs=1e-6)


REMOTE = """
import json, sys
sys.modules["modeling_cadmtl"] = None  # only the repo's own code may run
import numpy as np
from PIL import Image
from transformers import pipeline
inspect = pipeline("cadmtl-inspection", model=sys.argv[1], trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
result = inspect(image, det_threshold=0.3)
result["module"] = type(inspect).__module__
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.parametrize("by_repo_id", [False, True], ids=["local-folder", "repo-id-offline-cache"])
def test_remote_code_pipeline_offline_without_the_package(saved, tmp_path: Path, by_repo_id: bool) -> None:
    model, folder = saved
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    source = str(folder)
    if by_repo_id:
        populate_hf_cache(folder, "cad-mtl/inspection-tiny", tmp_path / "hf_home")
        source = "cad-mtl/inspection-tiny"
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE, source],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    expected = reference(model, picture())
    assert result["anomaly_score"] == pytest.approx(expected["anomaly_score"], abs=1e-5)
    assert result["verdict"] == expected["verdict"] and result["threshold"] == 0.4
    assert set(result) >= {"verdict", "anomaly_score", "head_scores", "classes", "detections"}
