"""Optimizer groups (layer-wise lr decay, no-decay parameters), early-layer freezing, unused-head handling."""

from __future__ import annotations

import pytest
import torch

from cadmtl.testing import tiny_cadmtl_config
from cadmtl.training.optim import (
    backbone_layer_id,
    build_param_groups,
    drop_gradients,
    early_backbone_parameters,
    resolve_freeze_blocks,
    unused_parameters,
    zero_touch,
)
from modeling_cadmtl import CadMtlModel


@pytest.fixture
def model() -> CadMtlModel:
    torch.manual_seed(0)
    return CadMtlModel(tiny_cadmtl_config("vit"))  # 3 ViT layers


def test_layer_ids_follow_the_depth(model: CadMtlModel) -> None:
    assert backbone_layer_id("embeddings.patch_embeddings.weight", model) == 0
    assert backbone_layer_id("model.layer.0.mlp.up_proj.weight", model) == 1
    assert backbone_layer_id("model.layer.2.norm1.weight", model) == 3
    assert backbone_layer_id("norm.weight", model) == 4


def test_layer_wise_lr_decay_and_no_decay_groups(model: CadMtlModel) -> None:
    groups = build_param_groups(
        model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5, head_lr_multiplier=10
    )
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name["backbone.embeddings.patch_embeddings.weight"]["lr"] == pytest.approx(0.5**4)
    assert by_name["backbone.model.layer.0.attention.q_proj.weight"]["lr"] == pytest.approx(0.5**3)
    assert by_name["backbone.model.layer.2.attention.q_proj.weight"]["lr"] == pytest.approx(0.5)
    assert by_name["backbone.norm.weight"]["lr"] == pytest.approx(1.0)
    assert by_name["det_head.cls_logits.weight"]["lr"] == pytest.approx(10.0)
    # no weight decay on norms, biases, tokens and scales
    for name in (
        "backbone.embeddings.cls_token",
        "backbone.norm.weight",
        "det_head.scales.0.scale",
        "cls_head.classifier.bias",
    ):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["cls_head.classifier.weight"]["weight_decay"] == 0.05
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_freeze_resolution(model: CadMtlModel) -> None:
    assert resolve_freeze_blocks(model, 0.34) == 1
    assert resolve_freeze_blocks(model, 2) == 2
    assert resolve_freeze_blocks(model, 0) == 0
    with pytest.raises(ValueError, match="Cannot freeze 5 blocks of a backbone with 3"):
        resolve_freeze_blocks(model, 5)
    frozen = {id(p) for p in early_backbone_parameters(model, 1)}
    assert id(model.backbone.embeddings.patch_embeddings.weight) in frozen
    assert id(model.backbone.model.layer[0].mlp.up_proj.weight) in frozen
    assert id(model.backbone.model.layer[1].mlp.up_proj.weight) not in frozen
    assert early_backbone_parameters(model, 0) == []


def test_dropped_gradients_leave_parameters_untouched_by_adamw(model: CadMtlModel) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    frozen = early_backbone_parameters(model, 1)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    labels = torch.tensor([0, 1])
    for _ in range(2):
        model(torch.randn(2, 3, 64, 64), task="cls", labels=labels).loss.backward()
        drop_gradients(frozen + unused_parameters(model, {"cls"}))
        optimizer.step()
        optimizer.zero_grad()
    for parameter in frozen + list(model.det_head.parameters()) + list(model.neck.parameters()):
        assert torch.equal(parameter, before[id(parameter)])  # no gradient step, no weight decay, no momentum
    assert not torch.equal(model.cls_head.classifier.weight, before[id(model.cls_head.classifier.weight)])
    assert not torch.equal(
        model.backbone.model.layer[2].mlp.up_proj.weight,
        before[id(model.backbone.model.layer[2].mlp.up_proj.weight)],
    )


def test_unused_parameters_per_task(model: CadMtlModel) -> None:
    heads = {
        "cls": set(map(id, model.cls_head.parameters())),
        "det": set(map(id, model.det_head.parameters())),
        "seg": set(map(id, model.seg_decoder.parameters())),
        "neck": set(map(id, model.neck.parameters())),
    }
    mask_token = {id(model.backbone.embeddings.mask_token)}  # only masked-image pre-training uses it
    assert (
        set(map(id, unused_parameters(model, {"cls"})))
        == heads["det"] | heads["seg"] | heads["neck"] | mask_token
    )
    assert set(map(id, unused_parameters(model, {"det"}))) == heads["cls"] | heads["seg"] | mask_token
    assert set(map(id, unused_parameters(model, {"cls", "det", "seg"}))) == mask_token


def test_zero_touch_reaches_every_unused_parameter_with_zero_gradient(model: CadMtlModel) -> None:
    loss = model(torch.randn(1, 3, 64, 64), task="cls", labels=torch.tensor([1])).loss
    (loss + zero_touch(model, {"cls"})).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.det_head.parameters())
    assert all(p.grad is not None for p in model.seg_decoder.parameters())
