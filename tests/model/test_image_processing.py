"""CadMtlImageProcessor: preprocessing with boxes and masks, and post-processing against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_cadmtl import CadMtlImageProcessor, CadMtlObjectDetectionOutput, CadMtlOutput

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_non_rgb_images_are_converted(mode: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    processor = CadMtlImageProcessor(size={"height": 32, "width": 32})
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    expected = torch.tensor(image.convert("RGB").getpixel((0, 0)), dtype=torch.float32)[:, None, None] / 255
    torch.testing.assert_close(pixel_values[0, :, :1, :1], (expected - MEAN) / STD, atol=1e-2, rtol=0)


def test_rgba_array_is_converted() -> None:
    array = np.zeros((30, 40, 4), dtype=np.uint8)
    array[..., 0], array[..., 3] = 255, 255
    pixel_values = CadMtlImageProcessor(size={"height": 32, "width": 32})(array, return_tensors="pt")[
        "pixel_values"
    ]
    assert pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(
        pixel_values[0, :, 0, 0], ((torch.tensor([1.0, 0, 0]) - MEAN[:, 0, 0]) / STD[:, 0, 0])
    )


def test_detection_annotations_become_normalised_cxcywh() -> None:
    image = Image.new("RGB", (200, 100))
    annotations = {"image_id": 7, "annotations": [{"bbox": [20, 10, 40, 30], "category_id": 1}]}
    batch = CadMtlImageProcessor(size={"height": 64, "width": 64})(
        image, annotations=annotations, return_tensors="pt"
    )
    [target] = batch["labels"]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.25, 0.2, 0.3]]))
    assert target["class_labels"].tolist() == [1]
    assert target["orig_size"].tolist() == [100, 200] and target["image_id"].tolist() == [7]


def test_negative_box_width_is_rejected() -> None:
    annotations = [{"annotations": [{"bbox": [20, 10, -4, 30], "category_id": 0}]}]
    with pytest.raises(ValueError, match=r"Image 0: annotations \[0\] have a negative box width"):
        CadMtlImageProcessor()(Image.new("RGB", (50, 50)), annotations=annotations)


def test_segmentation_maps_are_resized_with_nearest_and_kept_aligned() -> None:
    mask = np.zeros((40, 80), dtype=np.uint8)
    mask[:, 40:] = 2  # right half is class 2
    image = Image.new("RGB", (80, 40))
    batch = CadMtlImageProcessor(size={"height": 20, "width": 40})(
        image, segmentation_maps=Image.fromarray(mask), return_tensors="pt"
    )
    labels = batch["labels"]
    assert labels.shape == (1, 20, 40) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == {0, 2}  # nearest: no blended ids
    assert (labels[0, :, :20] == 0).all() and (labels[0, :, 20:] == 2).all()


def test_segmentation_map_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"Segmentation map 0 has size \(10, 10\) but its image has size \(40, 80\)"
    ):
        CadMtlImageProcessor()(
            Image.new("RGB", (80, 40)), segmentation_maps=np.zeros((10, 10), dtype=np.uint8)
        )


def test_padding_keeps_aspect_and_marks_real_pixels() -> None:
    processor = CadMtlImageProcessor(size={"shortest_edge": 32}, do_pad=True)
    images = [Image.new("RGB", (64, 32)), Image.new("RGB", (32, 64))]
    masks = [np.ones((32, 64), dtype=np.uint8), np.ones((64, 32), dtype=np.uint8)]
    batch = processor(images, segmentation_maps=masks, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["pixel_mask"][0].sum() == 32 * 64 and batch["pixel_mask"][0, :32, :].all()
    assert (batch["labels"][0, 32:, :] == 255).all() and (batch["labels"][0, :32, :] == 1).all()


def test_different_sizes_without_padding_explain_the_fix() -> None:
    processor = CadMtlImageProcessor(size={"shortest_edge": 32})
    with pytest.raises(ValueError, match="set do_pad=True"):
        processor([Image.new("RGB", (64, 32)), Image.new("RGB", (32, 64))], return_tensors="pt")


def test_post_process_object_detection_hand_computed() -> None:
    # 3 locations, 2 classes. Location 0 and 1 predict nearly the same box of class 0 (NMS keeps the best), location 2
    # predicts class 1 below the threshold.
    logits = torch.tensor([[[logit(0.81), -9.0], [logit(0.64), -9.0], [-9.0, logit(0.2)]]])
    centerness = torch.tensor([[logit(1 - 1e-6), logit(1 - 1e-6), logit(1 - 1e-6)]])
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    outputs = CadMtlObjectDetectionOutput(logits=logits, pred_boxes=pred_boxes, centerness_logits=centerness)
    processor = CadMtlImageProcessor()
    [result] = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(100, 200)])
    # score = sqrt(0.81 * ~1) = 0.9; box (cx, cy, w, h) = (100, 50, 40, 40) px -> (80, 30, 120, 70)
    torch.testing.assert_close(result["scores"], torch.tensor([0.9]), atol=1e-5, rtol=0)
    assert result["labels"].tolist() == [0]
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))

    # Without NMS suppression (distinct classes) and without target sizes: normalised boxes, sorted by score.
    logits[0, 1] = torch.tensor([-9.0, logit(0.64)])
    [result] = processor.post_process_object_detection(
        CadMtlOutput(det_logits=logits, pred_boxes=pred_boxes, det_centerness_logits=centerness),
        threshold=0.5,
    )
    torch.testing.assert_close(result["scores"], torch.tensor([0.9, 0.8]), atol=1e-5, rtol=0)
    assert result["labels"].tolist() == [0, 1]
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_post_process_object_detection_top_k_and_clipping() -> None:
    logits = torch.full((1, 5, 1), 5.0)
    pred_boxes = torch.tensor([[[0.1 + 0.2 * i, 0.5, 0.1, 0.1] for i in range(4)] + [[0.95, 0.5, 0.2, 0.2]]])
    outputs = CadMtlObjectDetectionOutput(
        logits=logits, pred_boxes=pred_boxes
    )  # no centerness: sigmoid scores
    [result] = CadMtlImageProcessor().post_process_object_detection(outputs, 0.5, [(10, 10)], top_k=5)
    assert (
        len(result["scores"]) == 5 and result["boxes"][:, 2].max() == 10.0
    )  # the last box is clipped at x=10
    [result] = CadMtlImageProcessor().post_process_object_detection(outputs, 0.5, [(10, 10)], top_k=2)
    assert len(result["scores"]) == 2


def test_post_process_semantic_segmentation() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 5.0
    logits[0, 0, 0, 1], logits[0, 2, 0, 1] = -5.0, 5.0  # top-right cell is class 2, the rest class 0
    outputs = CadMtlOutput(seg_logits=logits)
    processor = CadMtlImageProcessor()
    [native] = processor.post_process_semantic_segmentation(outputs)
    assert native.tolist() == [[0, 2], [0, 0]]
    [resized] = processor.post_process_semantic_segmentation(outputs, target_sizes=[(4, 6)])
    assert resized.shape == (4, 6)
    assert (resized[:2, 4:] == 2).all() and (resized[2:, :3] == 0).all()


def test_post_process_image_classification_top_k() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    [result] = CadMtlImageProcessor().post_process_image_classification(
        CadMtlOutput(cls_logits=logits), top_k=2, id2label={0: "a", 1: "b", 2: "c"}
    )
    torch.testing.assert_close(result["scores"], torch.tensor([0.6, 0.3]))
    assert result["labels"].tolist() == [1, 2] and result["label_names"] == ["b", "c"]


def test_processor_round_trips_through_save_pretrained(tmp_path) -> None:
    processor = CadMtlImageProcessor(size={"height": 224, "width": 320})
    processor.save_pretrained(tmp_path)
    loaded = CadMtlImageProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    torch.testing.assert_close(
        processor(image, return_tensors="pt")["pixel_values"],
        loaded(image, return_tensors="pt")["pixel_values"],
    )
    assert loaded(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 320)
