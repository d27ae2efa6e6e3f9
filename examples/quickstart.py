"""Quickstart: build a small CadMtl model, run all three heads on an image, save a Hub-ready folder.

Runs offline on a CPU in seconds (a random tiny DINOv3 backbone: predictions are meaningless until trained).
Usage: python examples/quickstart.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image
from transformers import DINOv3ViTConfig

from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel


def main(output_dir: str = "outputs/quickstart") -> None:
    torch.manual_seed(0)
    backbone = DINOv3ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_register_tokens=4, out_indices=[2, 3, 4], pos_embed_rescale=None,
    )  # fmt: skip
    config = CadMtlConfig(
        backbone_config=backbone,
        cls_labels=["normal", "brake_pad_worn", "tire_flat"],
        det_labels=["dent", "scratch", "crack"],
        seg_labels=["background", "dent", "scratch", "crack"],
        neck_channels=32,
        seg_channels=32,
    )
    model = CadMtlModel(config).eval()
    processor = CadMtlImageProcessor(size={"height": 256, "width": 256})

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)  # task=None: all three heads in one forward pass

    target_sizes = [(image.height, image.width)]
    [top] = processor.post_process_image_classification(outputs, top_k=3, id2label=config.id2label)
    [detections] = processor.post_process_object_detection(outputs, threshold=0.05, target_sizes=target_sizes)
    [mask] = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    print(f"classification top-3: {top['label_names']} {[round(s, 3) for s in top['scores'].tolist()]}")
    print(f"detection: {len(detections['boxes'])} boxes above 0.05")
    print(f"segmentation: mask {tuple(mask.shape)}, classes {mask.unique().tolist()}")

    model.save_pretrained(output_dir, image_processor=processor)
    print(f"saved a Hub-ready model folder to {output_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])
