"""The anomaly models as Hub repos: the processor matches the fitting pipeline, post-processing gives verdicts and
masks from the thresholds, and a saved scorer / learner loads by remote code without cad-mtl installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.anomaly import AnomalyLearner, AnomalyLearnerConfig, PatchMemoryScorer
from cadmtl.anomaly.data import to_pixel_values
from cadmtl.features import backbone_from_config
from cadmtl.testing import populate_hf_cache, tiny_vit_config
from modeling_cadmtl_anomaly import AnomalyImageProcessor

SIZE = 64


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((80, 100), (64, 48))
    ] + [Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8))]  # grayscale: converted


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dense_scorer) -> dict[str, tuple[torch.nn.Module, Path]]:
    root = tmp_path_factory.mktemp("anomaly-hub")
    torch.manual_seed(0)
    scorer = PatchMemoryScorer.from_backbone(
        backbone_from_config(tiny_vit_config()), layers=[1, 2], coreset_fraction=0.5, image_size=(SIZE, SIZE)
    )
    scorer.fit(to_pixel_values(pictures(), SIZE))
    scorer.image_threshold, scorer.pixel_threshold = 1.0, 2.0
    scorer.save_pretrained(root / "scorer")
    # the approximate search, the query stride and the map flips are Hub-file code too: a 4 x 4 grid averaged
    # 3 x 3 (ceil mode), its maps averaged with the horizontally flipped view's
    strided = PatchMemoryScorer.from_pretrained(root / "scorer")
    strided.config.search_projection_dim, strided.config.num_candidates, strided.config.query_stride = 4, 2, 3
    strided.config.map_flips = ["h"]
    strided.save_pretrained(root / "scorer-strided")
    strided = PatchMemoryScorer.from_pretrained(root / "scorer-strided")
    # the dense memory of the nearest images (retrieval, float16 patches, projected search, border profile) and the
    # defect head fused with it, too
    dense = tiny_dense_scorer(
        to_pixel_values(pictures()[:2], SIZE), to_pixel_values(pictures()[2:], SIZE), SIZE
    )
    dense.image_threshold, dense.pixel_threshold = 1.0, 2.0
    dense.save_pretrained(root / "scorer-dense")
    dense = PatchMemoryScorer.from_pretrained(root / "scorer-dense")
    learner = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=32, image_threshold=0.5)).eval()
    learner.fit_normal_statistics([to_pixel_values(pictures(), 32)])
    learner.save_pretrained(root / "learner")
    saved = {
        "scorer": (scorer, root / "scorer"),
        "scorer-strided": (strided, root / "scorer-strided"),
        "scorer-dense": (dense, root / "scorer-dense"),
        "learner": (learner, root / "learner"),
    }
    if importlib.util.find_spec("timm") is not None:
        # the distill task's frozen timm teacher is saved inside the learner and rebuilt by the Hub files
        tasks = ["inpaint", "rotation", "segment", "distill"]
        config = AnomalyLearnerConfig(
            preset="tiny",
            image_size=32,
            image_threshold=0.5,
            tasks=tasks,
            teacher_backbone="tf_efficientnet_lite0",
        )
        distill = AnomalyLearner(config).eval()
        distill.fit_normal_statistics([to_pixel_values(pictures(), 32)])
        distill.save_pretrained(root / "learner-distill")
        saved["learner-distill"] = (distill, root / "learner-distill")
    return saved


def test_the_processor_is_the_fitting_pipeline(saved) -> None:
    _, folder = saved["scorer"]
    processor = AnomalyImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": SIZE, "width": SIZE}
    expected = to_pixel_values(pictures(), SIZE)
    torch.testing.assert_close(
        processor(pictures(), return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0
    )
    arrays = [np.asarray(p.convert("RGB")) for p in pictures()]
    torch.testing.assert_close(processor(arrays)["pixel_values"], expected, rtol=0, atol=0)


def test_post_processing_applies_the_stored_thresholds(saved) -> None:
    scorer, folder = saved["scorer"]
    processor = AnomalyImageProcessor.from_pretrained(folder)
    images = pictures()
    outputs = scorer(**processor(images))
    sizes = [(image.height, image.width) for image in images]
    results = processor.post_process_anomaly_maps(outputs, target_sizes=sizes, **scorer.thresholds)
    for result, size, score, amap in zip(results, sizes, outputs.image_scores, outputs.anomaly_maps):
        assert tuple(result["anomaly_map"].shape) == size and result["score"] == pytest.approx(float(score))
        assert result["verdict"] == ("NG" if result["score"] >= 1.0 else "OK")
        assert torch.equal(result["mask"], result["anomaly_map"] >= 2.0)
        assert result["anomaly_map"].max() <= amap.max() + 1e-5  # bilinear resizing does not invent peaks
    plain = processor.post_process_anomaly_maps(outputs)
    assert (
        "verdict" not in plain[0] and "mask" not in plain[0] and plain[0]["anomaly_map"].shape == (SIZE, SIZE)
    )
    with pytest.raises(ValueError, match="got 1 target sizes for 3 anomaly maps"):
        processor.post_process_anomaly_maps(outputs, target_sizes=sizes[:1])


def test_saved_folders_are_hub_repos(saved) -> None:
    for name, model_file, model_class in (
        ("scorer", "modeling_cadmtl_anomaly.py", "PatchMemoryModel"),
        ("learner", "learner_cadmtl_anomaly.py", "AnomalyLearnerModel"),
    ):
        _, folder = saved[name]
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == f"{model_file[:-3]}.{model_class}"
        assert config["architectures"] == [model_class]
        assert (folder / model_file).is_file() and (folder / "features_cadmtl_anomaly.py").is_file()
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["auto_map"] == {
            "AutoImageProcessor": "image_processing_cadmtl_anomaly.AnomalyImageProcessor"
        }


REMOTE_LOAD = """
import sys
for name in ("cadmtl", "modeling_cadmtl_anomaly", "modeling_cadmtl", "dataset_scripts", "datasets", "accelerate"):
    sys.modules[name] = None  # only the repo's own code may run
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained({source!r}, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained({source!r}, trust_remote_code=True)
images = [Image.open(path) for path in {images!r}]
outputs = model(**processor(images, return_tensors="pt"))
results = processor.post_process_anomaly_maps(
    outputs, target_sizes=[(i.height, i.width) for i in images], **model.thresholds)
torch.save({{"module": type(model).__module__, "maps": outputs.anomaly_maps, "scores": outputs.image_scores,
            "verdicts": [r.get("verdict") for r in results]}}, {result!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scorer", "scorer-strided", "scorer-dense", "learner", "learner-distill"])
@pytest.mark.parametrize("by_repo_id", [False, True], ids=["local-folder", "repo-id-offline-cache"])
def test_remote_code_load_without_cadmtl(saved, tmp_path, name: str, by_repo_id: bool) -> None:
    if name not in saved:
        pytest.skip("the distill learner's teacher needs timm (the `pretrained` extra)")
    model, folder = saved[name]
    paths = []
    for index, image in enumerate(pictures()):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    source = str(folder)
    if by_repo_id:
        source = f"cad-mtl/{name}-tiny"
        populate_hf_cache(folder, source, tmp_path / "hf_home")
    script = REMOTE_LOAD.format(source=source, images=paths, result=str(tmp_path / "out.pt"))
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    pixel_values = to_pixel_values([Image.open(path) for path in paths], model.image_size)
    reference = model.predict(pixel_values)
    torch.testing.assert_close(result["maps"], reference.anomaly_maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["scores"], reference.image_scores, rtol=0, atol=1e-6)
    threshold = model.image_threshold
    assert result["verdicts"] == ["NG" if float(s) >= threshold else "OK" for s in reference.image_scores]
