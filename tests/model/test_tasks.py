"""The task registries: the Hub side (`modeling_cadmtl/tasks_cadmtl.py`) and the training / evaluation side
(`cadmtl/tasks.py`) declare each head once, and every name they hold points at something that exists."""

from __future__ import annotations

import inspect

import pytest
import torch

from cadmtl.data.pipeline import TaskTransform, collate_fn
from cadmtl.evaluation.loop import SCORERS
from cadmtl.evaluation.reporting import HEADLINE
from cadmtl.tasks import CADMTL_TASKS, TASKS, get_cadmtl_task
from cadmtl.testing import tiny_cadmtl_config
from dataset_scripts import schema
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.tasks_cadmtl import TASK_DEFINITIONS


def test_both_registries_hold_the_same_tasks_in_the_dataset_order() -> None:
    assert tuple(CADMTL_TASKS) == tuple(TASK_DEFINITIONS) == TASKS == schema.TASKS
    for name, task in CADMTL_TASKS.items():
        assert task.name == name and task.hub is TASK_DEFINITIONS[name]
        assert task.label_columns == schema.TASK_COLUMNS[name]


def test_unknown_task_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'ocr'; expected one of \('cls', 'det', 'seg'\)"):
        get_cadmtl_task("ocr")


@pytest.mark.parametrize("name", TASKS)
def test_every_named_method_and_module_exists(name: str) -> None:
    task = get_cadmtl_task(name)
    model = CadMtlModel(tiny_cadmtl_config())
    assert sum(p.numel() for p in getattr(model, task.hub.head_module).parameters()) > 0
    assert callable(getattr(TaskTransform, task.sample))
    assert task.metric in SCORERS
    assert set(task.encoded_image_columns) <= set(task.label_columns)
    post_process = getattr(CadMtlImageProcessor, task.hub.post_process)
    assert set(task.hub.post_process_options) <= set(inspect.signature(post_process).parameters)


def test_registry_values_reach_their_consumers() -> None:
    assert HEADLINE == {
        "cls": ("acc@1", "Cls. Acc (%)"),
        "det": ("AP", "Det. mAP (%)"),
        "seg": ("mIoU", "Seg. mIoU (%)"),
    }
    assert [t.name for t in sorted(CADMTL_TASKS.values(), key=lambda t: t.table_rank)] == [
        "det",
        "cls",
        "seg",
    ]
    # detection batches keep one target dict per image; the others stack into one tensor
    item = {"pixel_values": torch.zeros(3, 4, 4), "image_id": "a", "orig_size": (4, 4)}
    det = collate_fn("det")([item | {"labels": {"boxes": None}}] * 2)
    assert isinstance(det["labels"], list) and len(det["labels"]) == 2
    cls = collate_fn("cls")([item | {"labels": torch.tensor(1)}] * 2)
    assert cls["labels"].tolist() == [1, 1]
