"""Per-task input sizes: the processor records each head's training size (`task_sizes`), `task=` selects it, and
each transformers pipeline feeds its head at that head's size."""

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

from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

TASK_SIZES = {"cls": 32, "det": 64, "seg": 48}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit", image_sizes=TASK_SIZES)).eval()
    folder = tmp_path_factory.mktemp("cadmtl-task-sizes")
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, task_sizes=TASK_SIZES)
    model.save_pretrained(folder, image_processor=processor)
    return folder


def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))


def test_task_selects_its_size_and_an_explicit_size_wins() -> None:
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, task_sizes=TASK_SIZES)

    def shape(**kwargs) -> tuple[int, ...]:
        return tuple(processor(image(), return_tensors="pt", **kwargs)["pixel_values"].shape[-2:])

    assert shape() == (64, 64)
    assert shape(task="cls") == (32, 32) and shape(task="seg") == (48, 48) and shape(task="det") == (64, 64)
    assert shape(task="cls", size={"height": 16, "width": 16}) == (16, 16)
    assert CadMtlImageProcessor(size={"height": 40, "width": 40})(image(), task="cls")["pixel_values"][
        0
    ].shape[-2:] == (40, 40)  # no task_sizes: `size` for every task


def test_bad_tasks_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown tasks"):
        CadMtlImageProcessor(task_sizes={"depth": 32})
    with pytest.raises(ValueError, match="positive integer"):
        CadMtlImageProcessor(task_sizes={"cls": 0})
    with pytest.raises(ValueError, match="Unknown task 'depth'"):
        CadMtlImageProcessor()(image(), task="depth")


def test_task_sizes_round_trip_through_preprocessor_config(saved_model: Path) -> None:
    stored = json.loads((saved_model / "preprocessor_config.json").read_text())
    assert stored["task_sizes"] == TASK_SIZES and "task" not in stored
    loaded = CadMtlImageProcessor.from_pretrained(saved_model)
    assert loaded.task_sizes == TASK_SIZES and loaded.task is None
    assert CadMtlImageProcessor.from_pretrained(saved_model, task="cls").size_for(None) == {
        "height": 32,
        "width": 32,
    }


def test_each_pipeline_feeds_its_head_at_its_own_size(saved_model: Path) -> None:
    for task_name, task, kwargs in (
        ("image-classification", "cls", {}),
        ("object-detection", "det", {"threshold": 0.0}),
        ("image-segmentation", "seg", {"subtask": "semantic"}),
    ):
        pipe = pipeline(task_name, model=str(saved_model))
        assert pipe.image_processor.task == task
        inputs = pipe.preprocess(image(), **({"subtask": "semantic"} if task == "seg" else {}))
        side = TASK_SIZES[task]
        assert tuple(inputs["pixel_values"].shape) == (1, 3, side, side), task_name
        assert pipe(image(), **kwargs)  # and the whole pipeline runs at that size


# Loads the saved folder the way a Hub user must: `pipeline(..., trust_remote_code=True)`, with the project's
# packages unimportable (a meta-path finder refuses them), offline.
REMOTE_PIPELINES = """
import json
import sys


class RefuseProjectPackages:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("cadmtl", "modeling_cadmtl", "dataset_scripts"):
            raise ModuleNotFoundError(f"{name} is blocked: only the repo's own code may run")
        return None


sys.meta_path.insert(0, RefuseProjectPackages())
import numpy as np
from PIL import Image
from transformers import pipeline

image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
seen = {}
for name, kwargs in (
    ("image-classification", {}),
    ("object-detection", {"threshold": 0.0}),
    ("image-segmentation", {"subtask": "semantic"}),
):
    pipe = pipeline(name, model=sys.argv[1], trust_remote_code=True)
    inputs = pipe.preprocess(image, **({"subtask": "semantic"} if name == "image-segmentation" else {}))
    outputs = pipe(image, **kwargs)
    seen[name] = {
        "processor": type(pipe.image_processor).__module__,
        "model": type(pipe.model).__module__,
        "task": pipe.image_processor.task,
        "shape": list(inputs["pixel_values"].shape),
        "outputs": len(outputs),
    }
try:
    import cadmtl  # noqa: F401
except ImportError:
    seen["cadmtl importable"] = False
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_remote_code_pipelines_feed_each_head_at_its_own_size(saved_model: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_PIPELINES, str(saved_model)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen.pop("cadmtl importable") is False
    for name, task in (
        ("image-classification", "cls"),
        ("object-detection", "det"),
        ("image-segmentation", "seg"),
    ):
        side = TASK_SIZES[task]
        assert seen[name]["processor"].startswith("transformers_modules."), seen[name]
        assert seen[name]["model"].startswith("transformers_modules."), seen[name]
        assert seen[name]["task"] == task
        assert seen[name]["shape"] == [1, 3, side, side], name
        assert seen[name]["outputs"] > 0, name


def test_predict_runs_one_forward_per_distinct_size() -> None:
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, task_sizes={"cls": 32, "det": 64})
    assert processor.size_groups(("cls", "det", "seg")) == [
        ({"height": 32, "width": 32}, ("cls",)),
        ({"height": 64, "width": 64}, ("det", "seg")),
    ]
    assert [group for _, group in CadMtlImageProcessor().size_groups(("cls", "det", "seg"))] == [
        ("cls", "det", "seg")
    ]
