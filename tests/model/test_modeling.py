"""CadMtlModel: shapes, losses, gradients, bad input, bf16, pretrained backbones."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel, DINOv3ViTModel

from cadmtl.testing import (
    CLS_LABELS,
    DET_LABELS,
    SEG_LABELS,
    detection_target,
    tiny_cadmtl_config,
    tiny_vit_config,
)
from modeling_cadmtl import (
    CadMtlConfig,
    CadMtlForImageClassification,
    CadMtlForObjectDetection,
    CadMtlForSemanticSegmentation,
    CadMtlModel,
)
from modeling_cadmtl.detection_cadmtl import assign_targets, location_grid


def make_labels(batch_size: int, height: int, width: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "cls": torch.tensor([i % len(CLS_LABELS) for i in range(batch_size)]),
        "det": [
            detection_target([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]], [0, 1]) for _ in range(batch_size)
        ],
        "seg": torch.randint(0, len(SEG_LABELS), (batch_size, height, width), generator=generator),
    }


@pytest.fixture(scope="module", params=["vit", "convnext"])
def model(request) -> CadMtlModel:
    torch.manual_seed(0)
    return CadMtlModel(tiny_cadmtl_config(request.param)).eval()


@pytest.mark.parametrize("task", ["cls", "det", "seg", None])
def test_forward_shapes_and_losses(model: CadMtlModel, task: str | None) -> None:
    height, width = 96, 128  # multiples of 32: 12x16 + 6x8 + 3x4 = 252 locations
    pixel_values = torch.randn(2, 3, height, width)
    labels = make_labels(2, height, width)
    outputs = model(pixel_values, task=task, labels=labels if task is None else labels[task])

    ran = {"cls", "det", "seg"} if task is None else {task}
    assert set(outputs.losses) == ran
    assert torch.isfinite(outputs.loss)
    assert outputs.loss.item() == pytest.approx(sum(v.item() for v in outputs.losses.values()), rel=1e-6)
    if "cls" in ran:
        assert outputs.cls_logits.shape == (2, len(CLS_LABELS))
    else:
        assert outputs.cls_logits is None
    if "det" in ran:
        assert outputs.det_logits.shape == (2, 252, len(DET_LABELS))
        assert outputs.det_centerness_logits.shape == (2, 252)
        assert outputs.pred_boxes.shape == (2, 252, 4)
        assert set(outputs.loss_terms) >= {"det/classification", "det/box", "det/centerness"}
    else:
        assert outputs.det_logits is None and outputs.pred_boxes is None
    if "seg" in ran:
        assert outputs.seg_logits.shape == (2, len(SEG_LABELS), height, width)
    else:
        assert outputs.seg_logits is None


@pytest.mark.parametrize("size", [(50, 70), (17, 33), (224, 160)])
def test_any_input_size_is_padded_inside(model: CadMtlModel, size: tuple[int, int]) -> None:
    pixel_values = torch.randn(1, 3, *size)
    outputs = model(pixel_values)
    assert outputs.seg_logits.shape[-2:] == size
    padded = [math.ceil(s / 32) * 32 for s in size]
    expected_locations = sum((padded[0] // s) * (padded[1] // s) for s in (8, 16, 32))
    assert outputs.pred_boxes.shape == (1, expected_locations, 4)


def test_losses_are_finite_on_images_without_boxes(model: CadMtlModel) -> None:
    empty = [detection_target([], []), detection_target([], [])]
    outputs = model(torch.randn(2, 3, 64, 64), task="det", labels=empty)
    assert torch.isfinite(outputs.loss)
    assert outputs.loss_terms["det/box"].item() == 0.0
    assert outputs.loss_terms["det/classification"].item() > 0  # every location is a negative
    outputs.loss.backward()


def test_all_ignore_segmentation_batch_gives_finite_loss(tiny_config: CadMtlConfig) -> None:
    model = CadMtlModel(tiny_config)
    labels = torch.full((1, 64, 64), 255)
    outputs = model(torch.randn(1, 3, 64, 64), task="seg", labels=labels)
    assert torch.isfinite(outputs.loss)


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_gradient_reaches_backbone_and_only_the_requested_head(task: str) -> None:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).train()
    labels = make_labels(2, 64, 64)[task]
    model(torch.randn(2, 3, 64, 64), task=task, labels=labels).loss.backward()

    def has_grad(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.backbone.embeddings.patch_embeddings)
    assert has_grad(model.cls_head) == (task == "cls")
    assert has_grad(model.det_head) == (task == "det")
    assert has_grad(model.seg_decoder) == (task == "seg")
    assert has_grad(model.neck) == (task in ("det", "seg"))


def test_a_few_steps_fit_one_batch() -> None:
    """Each head can learn: the loss on a fixed batch falls clearly within a few optimizer steps."""
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit")).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = make_labels(2, 64, 64)
    labels["seg"] = torch.zeros(2, 64, 64, dtype=torch.long)
    labels["seg"][:, 16:48, 16:48] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        outputs = model(pixel_values, labels=labels)
        first = first or {task: loss.item() for task, loss in outputs.losses.items()}
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
    last = {task: loss.item() for task, loss in model(pixel_values, labels=labels).losses.items()}
    for task in ("cls", "det", "seg"):
        assert last[task] < 0.7 * first[task], (task, first[task], last[task])


def test_detection_initialisation_follows_fcos(tiny_config: CadMtlConfig) -> None:
    model = CadMtlModel(tiny_config)
    prior_bias = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(model.det_head.cls_logits.bias, torch.full((len(DET_LABELS),), prior_bias))
    assert model.det_head.cls_tower[0][0].weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert all(scale.scale.item() == 1.0 for scale in model.det_head.scales)


def test_fcos_assignment_hand_computed_case() -> None:
    # A 64x64 input: 8x8 points at stride 8 (centres 4, 12, ...), 4x4 at 16, 2x2 at 32.
    points, strides, bounds = location_grid([(8, 8), (4, 4), (2, 2)], (8, 16, 32), torch.device("cpu"))
    # Box 16..40 x 16..40 (largest side distance <= 24 < 64 -> level stride 8), centre (28, 28). Centre sampling
    # radius 1.5 * 8 = 12 keeps points with |p - 28| < 12 inside the box: x, y in {20, 28, 36}.
    box = torch.tensor([[[16.0, 16.0, 40.0, 40.0]]])
    matched = assign_targets(points, strides, bounds, box, torch.ones(1, 1, dtype=torch.bool), 1.5)
    positives = points[matched[0] >= 0]
    expected = {(x, y) for x in (20.0, 28.0, 36.0) for y in (20.0, 28.0, 36.0)}
    assert {tuple(p.tolist()) for p in positives} == expected
    # Overlapping boxes: a location goes to the smaller one.
    boxes = torch.tensor([[[16.0, 16.0, 40.0, 40.0], [20.0, 20.0, 36.0, 36.0]]])
    matched = assign_targets(points, strides, bounds, boxes, torch.ones(1, 2, dtype=torch.bool), 1.5)
    centre = ((points[:, 0] == 28) & (points[:, 1] == 28)).nonzero().item()
    assert matched[0, centre].item() == 1


@pytest.mark.parametrize(
    ("task", "labels", "message"),
    [
        ("cls", torch.tensor([0, 3]), r"ids \[3\] are outside the label set of 3"),
        ("cls", torch.tensor([0]), r"must have shape \(2,\)"),
        ("det", [detection_target([[0.5, 0.5, 0.1, 0.1]], [2])] * 2, r"class ids \[2\] are outside"),
        ("det", [detection_target([[0.5, 0.5, -0.1, 0.1]], [0])] * 2, "negative width or height"),
        ("det", [{"boxes": torch.zeros(0, 4)}] * 2, "needs 'class_labels' and 'boxes'"),
        ("seg", torch.zeros(2, 32, 32, dtype=torch.long), r"shape of the images .* \(2, 64, 64\)"),
        ("seg", torch.full((2, 64, 64), 7), r"ids \[7\] are outside the label set of 3 .*255 = ignore"),
    ],
)
def test_bad_labels_raise_clear_errors(tiny_config: CadMtlConfig, task, labels, message) -> None:
    model = CadMtlModel(tiny_config)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 64, 64), task=task, labels=labels)


def test_bad_inputs_raise_clear_errors(tiny_config: CadMtlConfig) -> None:
    model = CadMtlModel(tiny_config)
    with pytest.raises(ValueError, match="Unknown task 'detection'"):
        model(torch.randn(1, 3, 64, 64), task="detection")
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\), got \(1, 4, 64, 64\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="labels must be a dict keyed by task"):
        model(torch.randn(1, 3, 64, 64), labels=torch.tensor([0]))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="duplicate names"):
        tiny_cadmtl_config(cls_labels=["a", "a"])
    with pytest.raises(ValueError, match="`seg_labels` needs at least 2"):
        tiny_cadmtl_config(seg_labels=["background"])
    with pytest.raises(ValueError, match="must include the last layer"):
        CadMtlConfig(backbone_config=tiny_vit_config(out_indices=[1, 2]))
    with pytest.raises(ValueError, match="Unsupported backbone"):
        CadMtlConfig(backbone_config={"model_type": "vit"})


def test_pixel_mask_normalises_boxes_by_the_real_image_size(tiny_config: CadMtlConfig) -> None:
    model = CadMtlModel(tiny_config).eval()
    pixel_values = torch.randn(1, 3, 64, 128)
    full = model(pixel_values, task="det")
    mask = torch.zeros(1, 64, 128, dtype=torch.long)
    mask[:, :, :64] = 1  # the real image is the left half
    half = model(pixel_values, task="det", pixel_mask=mask)
    # Same absolute boxes, expressed relative to a width of 64 instead of 128.
    torch.testing.assert_close(half.pred_boxes[..., 0::2], full.pred_boxes[..., 0::2] * 2)
    torch.testing.assert_close(half.pred_boxes[..., 1::2], full.pred_boxes[..., 1::2])


def test_bf16_autocast_forward(tiny_config: CadMtlConfig) -> None:
    model = CadMtlModel(tiny_config)
    labels = make_labels(2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.det_logits.dtype == torch.bfloat16  # the convs ran in bf16
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in outputs.losses.values())
    outputs.loss.backward()
    assert model.backbone.embeddings.patch_embeddings.weight.grad.dtype == torch.float32


def test_task_classes_share_the_checkpoint_and_expose_their_labels(
    tiny_config: CadMtlConfig, tmp_path
) -> None:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_config).eval()
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 64, 64)
    reference = model(pixel_values)

    classifier = CadMtlForImageClassification.from_pretrained(tmp_path).eval()
    assert classifier.config.id2label == dict(enumerate(CLS_LABELS))
    torch.testing.assert_close(classifier(pixel_values).logits, reference.cls_logits)

    detector = CadMtlForObjectDetection.from_pretrained(tmp_path).eval()
    assert detector.config.id2label == dict(enumerate(DET_LABELS))
    det = detector(pixel_values)
    torch.testing.assert_close(det.logits, reference.det_logits)
    torch.testing.assert_close(det.pred_boxes, reference.pred_boxes)
    torch.testing.assert_close(det.centerness_logits, reference.det_centerness_logits)

    segmenter = CadMtlForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert segmenter.config.id2label == dict(enumerate(SEG_LABELS))
    torch.testing.assert_close(segmenter(pixel_values).logits, reference.seg_logits)


def test_from_backbone_loads_dinov3_vit_weights(tmp_path) -> None:
    checkpoint = tmp_path / "dinov3-tiny"
    DINOv3ViTModel(tiny_vit_config(num_hidden_layers=6)).save_pretrained(checkpoint)
    model = CadMtlModel.from_backbone(
        checkpoint, cls_labels=CLS_LABELS, det_labels=DET_LABELS, neck_channels=16
    )
    assert model.config.backbone_config.out_indices == [2, 4, 6]  # three layers spread over the depth
    assert model.config.cls_labels == CLS_LABELS
    source = DINOv3ViTModel.from_pretrained(checkpoint).state_dict()
    target = model.backbone.state_dict()
    assert set(source) == set(target)
    for name, tensor in source.items():
        assert torch.equal(tensor, target[name]), name
    # The heads are initialised, not garbage.
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64)).det_logits).all()


def test_from_backbone_loads_dinov3_convnext_weights(tmp_path) -> None:
    checkpoint = tmp_path / "dinov3-convnext-tiny"
    DINOv3ConvNextModel(
        DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    ).save_pretrained(checkpoint)
    model = CadMtlModel.from_backbone(checkpoint, neck_channels=16, seg_channels=16)
    source = DINOv3ConvNextModel.from_pretrained(checkpoint).state_dict()
    target = model.backbone.state_dict()
    shared = set(source) & set(target)
    assert shared == set(target)  # every backbone tensor came from the checkpoint (its final norm is unused)
    for name in shared:
        assert torch.equal(source[name], target[name]), name


def test_from_backbone_overrides_reach_the_backbone_config(tmp_path) -> None:
    checkpoint = tmp_path / "dinov3-tiny"
    DINOv3ViTModel(tiny_vit_config()).save_pretrained(checkpoint)
    model = CadMtlModel.from_backbone(
        checkpoint, backbone_overrides={"out_indices": [3], "drop_path_rate": 0.1}, neck_channels=16
    )
    assert model.config.backbone_config.out_features == ["stage3"]
    assert model.config.backbone_config.drop_path_rate == 0.1
    assert model(torch.randn(1, 3, 64, 64)).pred_boxes.shape == (1, 84, 4)


def test_cls_candidates_restrict_the_classification_loss(tiny_config: CadMtlConfig) -> None:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_config).eval()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    candidates = torch.tensor([False, True, True])  # e.g. the two classes of the images' domain
    outputs = model(pixel_values, task="cls", labels=labels, cls_candidates=candidates)
    expected = torch.nn.functional.cross_entropy(outputs.cls_logits[:, 1:], labels - 1)
    torch.testing.assert_close(outputs.loss, expected)
    assert outputs.cls_logits.shape == (2, len(CLS_LABELS))  # the logits keep every class
    with pytest.raises(ValueError, match="cls_candidates exclude the label of some images"):
        model(pixel_values, task="cls", labels=torch.tensor([0, 2]), cls_candidates=candidates)
