"""CAD-MTL evaluation metrics as a 🤗 Evaluate module: classification, detection and segmentation.

Load it offline from its folder (or this file) with a config name:

    evaluate.load("/abs/path/cadmtl_metrics", "classification")   # acc@1, acc@5
    evaluate.load("/abs/path/cadmtl_metrics", "detection")        # COCO AP ... AR@100 via pycocotools
    evaluate.load("/abs/path/cadmtl_metrics", "segmentation")     # mIoU, mFscore, mPrecision, mRecall, aAcc

Every number is computed by `cadmtl.evaluation.metrics` (imported absolutely, because `evaluate.load`
copies this script into its modules cache), so it is identical to what the trainer and the evaluation command
report. Multi-process use follows evaluate's own protocol (`num_process` / `process_id`); for
`torch.distributed` training loops prefer the metric classes themselves, which all-reduce across ranks.
"""

from typing import Any

import datasets
import evaluate
import numpy as np

from cadmtl.evaluation.metrics import (
    DEFAULT_SCORE_THRESHOLD,
    ClassificationMetrics,
    DetectionMetrics,
    SegmentationMetrics,
)
from dataset_scripts.schema import IGNORE_INDEX

_DESCRIPTION = """\
CAD-MTL metrics for multi-task visual anomaly detection on cars. Config `classification`: top-k accuracy
(`acc@1`, `acc@5`). Config `detection`: COCO `AP`, `AP50`, `AP75`, `APs`, `APm`, `APl`, `AR@100` computed by
pycocotools' COCOeval (NaN where COCOeval reports -1, i.e. nothing to average). Config `segmentation`: `mIoU`,
`mFscore`, `mPrecision`, `mRecall`, `aAcc` from one confusion matrix over all images (mmsegmentation's
definitions; classes absent from both ground truth and predictions are left out of the means). All values are
fractions in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args (config `classification`):
    predictions: logits, one list of C floats per sample.
    references: target class ids (ints in [0, C)).
    num_classes (int, optional): C; defaults to the length of the first logit row.
    label_names (list[str], optional), top_k (tuple[int], default (1, 5)).
Args (config `detection`):
    predictions: one dict per image, as `post_process_object_detection` returns it: `boxes` (xyxy, absolute
        pixels), `scores`, `labels`; optional `image_id` (int or str).
    references: one dict per image: `boxes` (xyxy, absolute), `labels`; optional `image_id`, `iscrowd`, `area`.
    label_names (list[str], optional), max_dets (int, default 100), score_threshold (float, default 0.3: the
    operating point of the per-class precision / recall and the confusion matrix). Boxes only (iou_type "bbox").
Args (config `segmentation`):
    predictions: predicted class-id maps (2-D arrays or PIL images; uint8 avoids a datasets down-cast warning).
    references: ground-truth class-id maps with `ignore_index` for unlabelled pixels.
    num_classes (int, required), ignore_index (int, default 255), label_names (list[str], optional),
    reduce_zero_label (bool, default False).
All configs:
    detailed (bool, default False): also return `per_class`, `counts`, `extra_metrics`, `confusion_matrix` and
        `analysis` (detection curves and confusion matrix; JSON-safe: NaN becomes None there).
Returns:
    dict of metric name -> fraction in [0, 1] (plus the detail keys when `detailed=True`).
Examples:
    >>> metric = evaluate.load(CADMTL_METRICS_PATH, "classification")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=(1,))
    {'acc@1': 0.5}
"""

_CITATION = """\
@inproceedings{lin2014coco,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and others},
  booktitle={ECCV},
  year={2014}
}
@misc{mmseg2020,
  title={{MMSegmentation}: OpenMMLab Semantic Segmentation Toolbox and Benchmark},
  author={MMSegmentation Contributors},
  howpublished={\\url{https://github.com/open-mmlab/mmsegmentation}},
  year={2020}
}
"""

CONFIG_NAMES = ("classification", "detection", "segmentation")


def _box_features(with_target_fields: bool, image_id: datasets.Value) -> dict[str, Any]:
    fields = {
        "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
        "labels": datasets.List(datasets.Value("int64")),
        "image_id": image_id,
    }
    if with_target_fields:
        fields["iscrowd"] = datasets.List(datasets.Value("int64"))
        fields["area"] = datasets.List(datasets.Value("float64"))
    else:
        fields["scores"] = datasets.List(datasets.Value("float64"))
    return fields


def _features(config_name: str) -> datasets.Features | list[datasets.Features]:
    if config_name == "classification":
        return datasets.Features(
            {"predictions": datasets.List(datasets.Value("float64")), "references": datasets.Value("int64")}
        )
    if config_name == "detection":
        # image ids may be ints (COCO) or strings; evaluate picks the first feature set the inputs encode into
        return [
            datasets.Features(
                {
                    "predictions": _box_features(False, datasets.Value(id_type)),
                    "references": _box_features(True, datasets.Value(id_type)),
                }
            )
            for id_type in ("int64", "string")
        ]
    return datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()})


_OPTIONAL_PREDICTION_FIELDS = ("image_id",)
_OPTIONAL_REFERENCE_FIELDS = ("image_id", "iscrowd", "area")


def _with_optional_fields(entries: Any, optional: tuple[str, ...]) -> Any:
    # evaluate's input check needs every schema key in every dict; absent optional fields are stored as null
    if entries is None or isinstance(entries, dict):
        return entries
    return [
        {**{key: None for key in optional}, **entry} if isinstance(entry, dict) else entry
        for entry in entries
    ]


def _present_fields(entry: dict[str, Any]) -> dict[str, Any]:
    # optional fields come back from Arrow as None when they were not given
    return {key: value for key, value in entry.items() if value is not None}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CadmtlMetrics(evaluate.Metric):
    """Classification, detection and segmentation metrics of CAD-MTL, selected by `config_name`."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise ValueError(
                f"cadmtl_metrics: unknown config {self.config_name!r}; pass one of {list(CONFIG_NAMES)}, e.g. "
                'evaluate.load(path, "detection")'
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=[
                "https://github.com/cocodataset/cocoapi/blob/master/PythonAPI/pycocotools/cocoeval.py",
                "https://github.com/open-mmlab/mmsegmentation/blob/main/mmseg/evaluation/metrics/iou_metric.py",
            ],
        )

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Add a batch of predictions and references (detection dicts may leave out the optional fields)."""
        if self.config_name == "detection":
            predictions = _with_optional_fields(predictions, _OPTIONAL_PREDICTION_FIELDS)
            references = _with_optional_fields(references, _OPTIONAL_REFERENCE_FIELDS)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Add one prediction and its reference (detection dicts may leave out the optional fields)."""
        if self.config_name == "detection":
            prediction = _with_optional_fields([prediction], _OPTIONAL_PREDICTION_FIELDS)[0]
            reference = _with_optional_fields([reference], _OPTIONAL_REFERENCE_FIELDS)[0]
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions: list, references: list, detailed: bool = False, **options: Any) -> dict:
        if self.config_name == "classification":
            metric = self._classification(predictions, options)
            if predictions:
                metric.update(
                    np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.int64)
                )
        elif self.config_name == "detection":
            metric = DetectionMetrics(
                label_names=options.pop("label_names", None),
                max_dets=options.pop("max_dets", 100),
                score_threshold=options.pop("score_threshold", DEFAULT_SCORE_THRESHOLD),
                sync_on_compute=False,
            )
            metric.update([_present_fields(p) for p in predictions], [_present_fields(r) for r in references])
        else:
            if "num_classes" not in options:
                raise ValueError(
                    "cadmtl_metrics (segmentation): pass num_classes=<number of classes> to compute()"
                )
            metric = SegmentationMetrics(
                num_classes=options.pop("num_classes"),
                ignore_index=options.pop("ignore_index", IGNORE_INDEX),
                label_names=options.pop("label_names", None),
                reduce_zero_label=options.pop("reduce_zero_label", False),
                sync_on_compute=False,
            )
            metric.update([np.asarray(p) for p in predictions], [np.asarray(r) for r in references])
        if options:
            raise ValueError(
                f"cadmtl_metrics ({self.config_name}): unexpected compute() arguments {sorted(options)}"
            )

        report = metric.compute_detailed()
        result: dict[str, Any] = dict(report.metrics)
        if detailed:
            details = report.to_dict()
            for key in ("per_class", "counts", "extra_metrics", "confusion_matrix", "analysis"):
                result[key] = details[key]
        return result

    @staticmethod
    def _classification(predictions: list, options: dict[str, Any]) -> ClassificationMetrics:
        num_classes = options.pop("num_classes", None)
        if num_classes is None:
            if not predictions:
                raise ValueError("cadmtl_metrics (classification): no predictions and no num_classes given")
            num_classes = len(predictions[0])
        return ClassificationMetrics(
            num_classes=num_classes,
            label_names=options.pop("label_names", None),
            top_k=options.pop("top_k", (1, 5)),
            sync_on_compute=False,
        )
