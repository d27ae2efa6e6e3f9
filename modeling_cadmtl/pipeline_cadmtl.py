"""`CadMtlInspectionPipeline`: the OK / NG verdict of a CadMtl model on an image, with its classes and detections.

Shipped next to the weights and named in config.json (`custom_pipelines`), so a saved or Hub model serves it
through transformers' own `pipeline()` (remote code, also offline from a local folder or the cache):

```python
>>> from transformers import pipeline
>>> inspect = pipeline("cadmtl-inspection", model="outputs/cadmtl-demo/model", trust_remote_code=True)
>>> inspect("part.jpg")
{'verdict': 'NG', 'anomaly_score': 0.93, 'head_scores': {'cls': 0.93, 'det': 0.71, 'seg': 0.04},
 'source': 'max', 'threshold': 0.41, 'classes': [{'label': 'scratch', 'score': 0.88}, ...],
 'detections': [{'label': 'scratch', 'score': 0.71, 'box': {'xmin': 12, 'ymin': 40, 'xmax': 96, 'ymax': 77}}]}
```

With the `modeling_cadmtl` package installed, `pipeline(model=..., pipeline_class=CadMtlInspectionPipeline)`
runs the same code without `trust_remote_code` (transformers insists on it for a task a repo's config declares).
Each head runs at the input size it was trained at (the processor's `task_sizes`); the verdict uses the config's
`verdict_source` and calibrated `verdict_threshold` (`threshold=` overrides it per call).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline
from transformers.image_utils import load_image

from .configuration_cadmtl import PIPELINE_TASK


class CadMtlInspectionPipeline(Pipeline):
    """OK / NG inspection of images with a multi-task `CadMtlModel`.

    Call arguments: `threshold` (the verdict threshold, default the config's `verdict_threshold`),
    `det_threshold` (minimum detection score, default 0.3), `top_k` (classes listed, default 5), `timeout` (for
    image URLs). Returns per image `{"verdict", "anomaly_score", "head_scores", "source", "threshold", "classes",
    "detections"}` (a list of them for a list of images); boxes are in the image's pixels.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.image_processor, "post_process_verdict", None) is None:
            raise ValueError(
                f"{PIPELINE_TASK} needs a CadMtlImageProcessor (preprocessor_config.json of a CadMtl model), got "
                f"{type(self.image_processor).__name__}."
            )
        # the trained heads, one forward pass per distinct input size (the processor's one inference path)
        self.tasks = self.model.config.trained_tasks
        self.size_groups = self.image_processor.size_groups(self.tasks)

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        det_threshold: float | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"timeout": timeout} if timeout is not None else {}
        postprocess: dict[str, Any] = {}
        if threshold is not None:
            postprocess["threshold"] = float(threshold)
        if det_threshold is not None:
            postprocess["det_threshold"] = float(det_threshold)
        if top_k is not None:
            postprocess["top_k"] = int(top_k)
        return preprocess, {}, postprocess

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        if not isinstance(image, torch.Tensor):
            image = load_image(image, timeout=timeout)
        height, width = (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[-2:])
        groups = self.image_processor.preprocess_size_groups(image, self.tasks)
        return {"target_size": torch.tensor([[height, width]]), "groups": groups}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self.image_processor.forward_size_groups(
            self.model, model_inputs["groups"], self.tasks, device=self.device, dtype=self.dtype
        )
        return {"target_size": model_inputs["target_size"], **outputs}

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        threshold: float | None = None,
        det_threshold: float = 0.3,
        top_k: int = 5,
    ) -> dict[str, Any]:
        config = self.model.config
        processor = self.image_processor
        outputs = {key: value for key, value in model_outputs.items() if key != "target_size"}
        sizes = model_outputs["target_size"].tolist()
        (verdict,) = processor.post_process_verdict(outputs, config, threshold=threshold)
        result: dict[str, Any] = {
            "verdict": verdict["verdict"],
            "anomaly_score": verdict["anomaly_score"],
            "head_scores": verdict["head_scores"],
            "source": config.verdict_source,
            "threshold": config.verdict_threshold if threshold is None else threshold,
            "classes": [],
            "detections": [],
        }
        if "cls_logits" in outputs:
            (ranked,) = processor.post_process_image_classification(outputs, top_k=top_k)
            result["classes"] = [
                {"label": config.cls_labels[int(label)], "score": float(score)}
                for score, label in zip(ranked["scores"], ranked["labels"])
            ]
        if "det_logits" in outputs:
            (found,) = processor.post_process_object_detection(
                outputs, threshold=det_threshold, target_sizes=sizes
            )
            result["detections"] = [
                {
                    "label": config.det_labels[int(label)],
                    "score": float(score),
                    "box": dict(
                        zip(("xmin", "ymin", "xmax", "ymax"), (int(v) for v in box.round().tolist()))
                    ),
                }
                for score, label, box in zip(found["scores"], found["labels"], found["boxes"])
            ]
        return result
