"""The served preprocessing (`CadMtlImageProcessor(task=...)`) and the evaluation data pipeline
(`make_dataloader(train=False)`) feed a model the same pixels and give the same metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cadmtl.data.pipeline import load_split, make_dataloader
from cadmtl.data.sources import attach_label_maps, discover_sources, merged_labels
from cadmtl.evaluation.loop import evaluate_task
from cadmtl.presets import backbone_preset
from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel

CONFIGS = {"cls": ["chassis_cls"], "det": ["exterior_det"], "seg": ["exterior_seg"]}
# Demo images are 96..192 px: 48 px is under half of most (the case where training decodes JPEGs at reduced scale).
SIZES = {"cls": 48, "det": 96, "seg": 48}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, CadMtlModel, dict]:
    folder = tmp_path_factory.mktemp("parity") / "demo"
    build_demo_dataset(
        folder, train=8, validation=8, test=8, configs=[c for cs in CONFIGS.values() for c in cs]
    )
    sources = discover_sources(str(folder), CONFIGS, "test")
    config = CadMtlConfig(
        backbone_config=backbone_preset("tiny"),
        cls_labels=merged_labels(sources["cls"]),
        det_labels=merged_labels(sources["det"]),
        seg_labels=merged_labels(sources["seg"]),
        neck_channels=16,
        seg_channels=16,
        image_sizes=SIZES,
    )
    for task, task_sources in sources.items():
        attach_label_maps(task_sources, config.labels_for(task))
    torch.manual_seed(0)
    return folder, CadMtlModel(config).eval(), sources


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_processor_and_eval_pipeline_agree(setup, task: str) -> None:
    folder, model, sources = setup
    (source,) = sources[task]
    processor = CadMtlImageProcessor(size={"height": 96, "width": 96}, task_sizes=SIZES)
    loader_batches = list(
        make_dataloader(
            str(folder),
            source.config,
            "test",
            task,
            batch_size=4,
            image_size=SIZES[task],
            train=False,
            label_map=source.label_map,
        )
    )
    rows = list(load_split(str(folder), source.config, "test"))
    processor_batches, start = [], 0
    for batch in loader_batches:
        count = len(batch["image_ids"])
        assert [row["image_id"] for row in rows[start : start + count]] == batch["image_ids"]
        images = [row["image"] for row in rows[start : start + count]]
        start += count
        pixel_values = processor(images, task=task, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, batch["pixel_values"], atol=1e-5, rtol=0)
        processor_batches.append({**batch, "pixel_values": pixel_values})
    assert start == len(rows)

    names = model.config.labels_for(task)
    cpu = torch.device("cpu")
    through_data = evaluate_task(model, loader_batches, task, names, device=cpu, show_progress=False).metrics
    through_processor = evaluate_task(
        model, processor_batches, task, names, device=cpu, show_progress=False
    ).metrics
    assert through_processor.keys() == through_data.keys()
    for name, value in through_data.items():
        assert through_processor[name] == pytest.approx(value, abs=1e-3, nan_ok=True), name
