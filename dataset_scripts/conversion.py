"""From format-neutral source samples to the rows of one config split: mapping, cleaning, writing.

Every converter (COCO, YOLO, class folders, mask folders) reads its format into :class:`SourceData`;
:func:`convert_source` then does the rest the same way for all of them: map source labels onto taxonomy
nodes, check and normalise each image, clip or drop bad annotations, rasterise masks, drop exact duplicate
images, write the shards, save the validation report and regenerate the dataset card.

Anomaly-detection (``*_ad``) sources hold several splits at once (the MVTec AD layout says which image is
train and which test): :func:`convert_ad_source` sends each sample through the same cleaning into the split
its reader assigned, excludes (and counts) anomalous images from train, and writes every split or none.

Segmentation overlap rule: instances are painted from the largest area to the smallest, so a small part
lying on a big one (a lamp on a bumper) stays visible; crowd regions are painted last as 255 (ignore).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from datasets import Features
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from .card import write_card
from .images import DEFAULT_MAX_PIXELS, StoredImage, encode_png, read_image, read_mask
from .mapping import LabelMapping
from .raster import mask_values
from .report import ValidationError, ValidationReport, failures_error
from .schema import (
    AD,
    CONFIG_SCHEMAS,
    GOOD,
    IGNORE_INDEX,
    SOURCES,
    ConfigKind,
    features_for,
    kind_of_config,
    label_names,
    task_of_config,
)
from .taxonomy import BACKGROUND, NORMAL, Taxonomy, load_taxonomy
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SPLITS,
    ExistingPolicy,
    SplitWriter,
    SplitWriteResult,
    iter_split_batches,
    read_split_features,
    shard_files,
    split_names,
)

LabelSet = Literal["taxonomy", "present"]


@dataclass
class SourceAnnotation:
    """One object as the source states it: a label name plus a box (xywh px) and/or polygons / RLE."""

    label: str
    bbox: list[float] | None = None
    polygons: list[list[float]] | None = None  # flat [x1, y1, x2, y2, ...] in pixels, one list per part
    rle: dict | None = None  # COCO RLE (counts as list or string)
    iscrowd: bool = False
    source_id: int | None = None
    normalized: bool = False  # coordinates in [0, 1] of the image size (YOLO); scaled once it is decoded


@dataclass
class SourceSample:
    """One source image with its annotations (det/seg), class name (cls) or mask file (seg)."""

    image_path: Path
    key: str  # relative path used for the image id and in the report
    annotations: list[SourceAnnotation] = field(default_factory=list)
    label: str | None = None
    mask_path: Path | None = None
    mask_values: dict[int, str] | None = None  # mask pixel value -> source class name
    expected_size: tuple[int, int] | None = None  # (width, height) stated by the annotations
    split: str | None = None  # ad sources: the split the reader assigned (None: ConvertOptions.split)
    source: str | None = (
        None  # ad sources: this row's ``source`` (e.g. synthetic), else ConvertOptions.source_kind
    )


@dataclass
class SourceData:
    samples: list[SourceSample]
    label_names: list[str]  # every source class name, in source order
    info: dict[str, Any]  # format, path, description, citation, license_note: shown in the report and card
    # (kind, item, detail) of problems the reader found, e.g. annotations pointing at unknown images; ad
    # readers may add a 4th element, the split whose report counts it (default: the first split written)
    pre_issues: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class ConvertOptions:
    """Everything :func:`convert_source` needs besides the source data (CLI flags map 1:1 onto these)."""

    repo_dir: Path
    config: str
    split: str = "train"
    mapping: LabelMapping = field(default_factory=LabelMapping)
    taxonomy: Taxonomy | None = None
    strict: bool = False
    drop_unmapped: bool = False
    existing: ExistingPolicy = "error"
    label_set: LabelSet | None = None  # default: "taxonomy" for CAD configs, "present" otherwise
    id_prefix: str | None = None  # default: "<split>/"
    hierarchy: dict[str, str] = field(default_factory=dict)  # domain/system/part overrides
    source_kind: str = "converted"
    max_pixels: int = DEFAULT_MAX_PIXELS
    bbox_from: Literal["annotation", "segmentation"] = "annotation"
    num_shards: int | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    show_progress: bool = True
    update_card: bool = True
    mask_threshold: int = 128  # ad: mask pixels >= this are anomalous (soft / anti-aliased masks)


@dataclass
class ConversionResult:
    report: ValidationReport
    written: SplitWriteResult
    label_names: list[str]


# ---------------------------------------------------------------------------------------------- labels
def choose_label_names(
    task: ConfigKind,
    targets: list[str],
    config: str,
    taxonomy: Taxonomy,
    label_set: LabelSet | None = None,
    old_names: list[str] | None = None,
) -> list[str]:
    """The class list of ``config``: the CAD domain's full list (``label_set="taxonomy"``, default for CAD
    configs) or the ``targets`` in taxonomy order (``"present"``); classes the config already has keep
    their ids (``old_names`` first, new ones appended). For ad configs the names are the source's defect
    types, ``good`` first, then sorted (they are not taxonomy nodes)."""
    if task == AD:
        names = [GOOD, *sorted(set(targets) - {GOOD})]
        return names if old_names is None else old_names + [n for n in names if n not in old_names]
    cad_domain = taxonomy.domain_of_config(config)
    label_set = label_set or ("taxonomy" if cad_domain else "present")
    schema = CONFIG_SCHEMAS[task]
    # normal and background are special classes: a kind may hold only its own (normal: cls; background: seg)
    forbidden = {NORMAL, BACKGROUND} - set(schema.leading_classes)
    bad = sorted(set(targets) & forbidden)
    if bad:
        raise ValueError(f"{config}: {bad} cannot be a {task} class (check the mapping)")
    if label_set == "taxonomy":
        if cad_domain is None:
            raise ValueError(
                f"--label-set taxonomy needs a CAD config name (<domain>_<task>), not {config!r}"
            )
        names = taxonomy.label_names(config)
        outside = sorted(set(targets) - set(names))
        if outside:
            raise ValueError(
                f"{config}: mapped labels {outside} are not classes of domain {cad_domain!r}; map them to "
                f"anomalies of that domain or use --label-set present"
            )
    else:
        # the background is always a class (mask value 0); the normal class when some images are normal
        prefix = [name for name in schema.leading_classes if name == schema.background or name in targets]
        names = prefix + [n for n in taxonomy.sort_names(targets) if n not in prefix]
    if old_names is not None:
        names = old_names + [n for n in names if n not in old_names]
    return names


# ------------------------------------------------------------------------------------------ geometry
def _clip_box(box: list[float], width: int, height: int) -> tuple[list[float] | None, bool]:
    x, y, w, h = (float(v) for v in box)
    if not all(np.isfinite([x, y, w, h])):
        return None, False
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None, clipped
    return [x0, y0, x1 - x0, y1 - y0], clipped


def _to_pixels(ann: SourceAnnotation, width: int, height: int) -> SourceAnnotation:
    """Scale normalised (YOLO) coordinates to pixels of the decoded image."""
    if not ann.normalized:
        return ann
    bbox = None if ann.bbox is None else [v * s for v, s in zip(ann.bbox, (width, height, width, height))]
    polygons = None
    if ann.polygons is not None:
        polygons = [[v * (width if i % 2 == 0 else height) for i, v in enumerate(p)] for p in ann.polygons]
    return replace(ann, bbox=bbox, polygons=polygons, normalized=False)


def _annotation_rle(
    ann: SourceAnnotation, width: int, height: int, report: ValidationReport, item: str
) -> Any:
    """Merged COCO RLE of an annotation's polygons or RLE; ``None`` when it has no usable shape."""
    if ann.rle is not None:
        rle = ann.rle
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        if list(rle.get("size", [])) != [height, width]:
            report.add(
                "degenerate_polygon",
                item,
                f"RLE size {rle.get('size')} differs from the image {height}x{width}",
            )
            return None
        return rle
    if not ann.polygons:
        return None
    usable = []
    for polygon in ann.polygons:
        coords = [float(v) for v in polygon]
        if len(coords) < 6 or len(coords) % 2 or not np.all(np.isfinite(coords)):
            report.add("degenerate_polygon", item, f"{ann.label}: polygon with {len(coords) // 2} points")
            continue
        xs, ys = coords[0::2], coords[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
            report.add("polygon_clipped", item, f"{ann.label}: polygon reaches past {width}x{height}")
        usable.append(coords)
    if not usable:
        return None
    # Rasterising the unclipped polygon into the image frame *is* the clip: pixels outside do not exist.
    rle = mask_utils.merge(mask_utils.frPyObjects(usable, height, width))
    if mask_utils.area(rle) == 0:
        report.add("degenerate_polygon", item, f"{ann.label}: polygon covers no pixel")
        return None
    return rle


def config_domain(taxonomy: Taxonomy, config: str) -> str:
    """The taxonomy domain a config name stands for: a CAD config's, or ``<domain>`` of ``<domain>_ad``."""
    domain = taxonomy.domain_of_config(config)
    if domain is None and kind_of_config(config) == AD and config.rsplit("_", 1)[0] in taxonomy.domains:
        domain = config.rsplit("_", 1)[0]
    return domain or ""


# ------------------------------------------------------------------------------------------ conversion
class _RowBuilder:
    """Builds one dataset row per source sample for the config's task."""

    def __init__(
        self,
        task: ConfigKind,
        names: list[str],
        label_to_node: dict[str, str],
        ignored: set[str],
        options: ConvertOptions,
        taxonomy: Taxonomy,
        report: ValidationReport,
    ) -> None:
        self.task, self.names, self.options, self.taxonomy, self.report = (
            task,
            names,
            options,
            taxonomy,
            report,
        )
        self.class_id = {name: index for index, name in enumerate(names)}
        self.label_to_node, self.ignored = label_to_node, ignored
        self.next_object_id = 0
        self.config_domain = config_domain(taxonomy, options.config)
        self.defaults = {**options.mapping.hierarchy, **options.hierarchy}

    def node_of(self, label: str, item: str) -> str | None:
        """Taxonomy node of a source label, recording why an annotation is dropped when it has none."""
        if label in self.label_to_node:
            return self.label_to_node[label]
        if label in self.ignored:
            self.report.add("ignored_label", item, label)
        else:
            self.report.add("unmapped_label", item, label)
        return None

    def hierarchy(self, nodes: list[str]) -> tuple[str, str, str]:
        if self.defaults:
            domain, system, part = (self.defaults.get(k, "") for k in ("domain", "system", "part"))
        else:
            domain, system, part = self.taxonomy.common_lineage(nodes)
        return (domain or self.config_domain, system, part)

    def base_row(
        self, image: StoredImage, image_id: str, nodes: list[str], is_normal: bool
    ) -> dict[str, Any]:
        domain, system, part = self.hierarchy(nodes)
        return {
            "image": image.feature(),
            "image_id": image_id,
            "width": image.width,
            "height": image.height,
            "domain": domain,
            "system": system,
            "part": part,
            "source": self.options.source_kind,
            "is_normal": is_normal,
        }

    def build(self, sample: SourceSample, image: StoredImage, image_id: str) -> dict[str, Any] | None:
        """The row of `sample` (None when it is dropped): `_<kind>` builds the label columns of the config kind."""
        return getattr(self, f"_{self.task}")(sample, image, image_id)

    def _cls(self, sample: SourceSample, image: StoredImage, image_id: str) -> dict[str, Any] | None:
        node = self.label_to_node.get(sample.label or "")
        if node is None:
            reason = "mapped to null" if sample.label in self.ignored else "no taxonomy node"
            self.report.add("unlabelled_image", sample.key, f"class {sample.label!r}: {reason}")
            return None
        row = self.base_row(image, image_id, [node], node == NORMAL)
        row["label"] = self.class_id[node]
        return row

    def _det(self, sample: SourceSample, image: StoredImage, image_id: str) -> dict[str, Any]:
        objects: dict[str, list] = {"bbox": [], "category": [], "area": [], "id": []}
        nodes = []
        for ann in sample.annotations:
            node = self.node_of(ann.label, sample.key)
            if node is None:
                continue
            if ann.iscrowd:
                self.report.add("crowd_ignored", sample.key, ann.label)
                continue
            ann = _to_pixels(ann, image.width, image.height)
            rle = None
            if ann.polygons or ann.rle is not None:
                rle = _annotation_rle(ann, image.width, image.height, self.report, sample.key)
            box = ann.bbox
            if rle is not None and (box is None or self.options.bbox_from == "segmentation"):
                shape_box = [float(v) for v in mask_utils.toBbox(rle)]
                if (
                    box is not None
                    and max(abs(a - b) for a, b in zip(_corners(box), _corners(shape_box))) > 1.0
                ):
                    self.report.add(
                        "bbox_recomputed", sample.key, f"{ann.label}: {_fmt(box)} -> {_fmt(shape_box)}"
                    )
                box = shape_box
            if box is None:
                self.report.add("degenerate_box", sample.key, f"{ann.label}: no box and no usable shape")
                continue
            clipped_box, was_clipped = _clip_box(box, image.width, image.height)
            if clipped_box is None:
                self.report.add(
                    "degenerate_box", sample.key, f"{ann.label}: {_fmt(box)} in {image.width}x{image.height}"
                )
                continue
            if was_clipped:
                self.report.add("box_clipped", sample.key, f"{ann.label}: {_fmt(box)} -> {_fmt(clipped_box)}")
            area = float(mask_utils.area(rle)) if rle is not None else clipped_box[2] * clipped_box[3]
            objects["bbox"].append(clipped_box)
            objects["category"].append(self.class_id[node])
            objects["area"].append(area)
            objects["id"].append(int(ann.source_id) if ann.source_id is not None else self.next_object_id)
            self.next_object_id += 1
            nodes.append(node)
        row = self.base_row(image, image_id, nodes, not objects["category"])
        row["objects"] = objects
        return row

    def _seg_row(
        self, image: StoredImage, image_id: str, canvas: np.ndarray, nodes: list[str]
    ) -> dict[str, Any]:
        present = [v for v in mask_values(canvas) if v != IGNORE_INDEX]
        row = self.base_row(image, image_id, nodes, not any(v != 0 for v in present))
        row["mask"] = {"bytes": encode_png(canvas), "path": None}
        row["mask_classes"] = present
        return row

    def _seg(self, sample: SourceSample, image: StoredImage, image_id: str) -> dict[str, Any]:
        if sample.mask_path:
            return self._seg_from_mask(sample, image, image_id)
        return self._seg_from_annotations(sample, image, image_id)

    def _seg_from_annotations(
        self, sample: SourceSample, image: StoredImage, image_id: str
    ) -> dict[str, Any]:
        canvas = np.zeros((image.height, image.width), np.uint8)
        instances, crowds, nodes = [], [], []
        for order, ann in enumerate(sample.annotations):
            node = self.node_of(ann.label, sample.key)
            if node is None:
                continue
            if not ann.polygons and ann.rle is None:
                self.report.add("no_segmentation", sample.key, ann.label)
                continue
            ann = _to_pixels(ann, image.width, image.height)
            rle = _annotation_rle(ann, image.width, image.height, self.report, sample.key)
            if rle is None:
                continue
            if ann.iscrowd:
                self.report.add("crowd_ignored", sample.key, ann.label)
                crowds.append(rle)
                continue
            instances.append((-float(mask_utils.area(rle)), order, self.class_id[node], rle))
            nodes.append(node)
        for _, _, class_id, rle in sorted(instances, key=lambda t: (t[0], t[1])):
            canvas[mask_utils.decode(rle).astype(bool)] = class_id
        for rle in crowds:
            canvas[mask_utils.decode(rle).astype(bool)] = IGNORE_INDEX
        return self._seg_row(image, image_id, canvas, nodes)

    def _seg_from_mask(
        self, sample: SourceSample, image: StoredImage, image_id: str
    ) -> dict[str, Any] | None:
        values = read_mask(sample.mask_path, sample.key, image, self.report)
        if values is None:
            return None
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        nodes = []
        for value, source_name in (sample.mask_values or {}).items():
            node = self.label_to_node.get(source_name)
            if node is None:
                continue  # unmapped / ignored classes stay 255; counted below per image
            lut[value] = self.class_id[node]
            if node != BACKGROUND:
                nodes.append(node)
        present_values = mask_values(values)
        unknown = [int(v) for v in present_values if v != IGNORE_INDEX and lut[v] == IGNORE_INDEX]
        if unknown:
            names = sample.mask_values or {}
            detail = ", ".join(f"{v} ({names.get(v, 'not in the class list')})" for v in unknown)
            self.report.add("mask_unknown_value", sample.key, f"values {detail} -> 255")
        canvas = lut[values]
        painted = set(mask_values(canvas))
        used = [n for n in nodes if self.class_id[n] in painted]
        return self._seg_row(image, image_id, canvas, used)

    def _ad(self, sample: SourceSample, image: StoredImage, image_id: str) -> dict[str, Any] | None:
        """Anomaly detection: mask 0 = normal, 1 = anomalous (source mask >= threshold), 255 = ignore (an
        anomalous image without a mask: image-level label only)."""
        defect = sample.label or GOOD
        normal = defect == GOOD
        shape = (image.height, image.width)
        if sample.mask_path is None:
            canvas = np.full(shape, 0 if normal else IGNORE_INDEX, np.uint8)
        else:
            values = read_mask(sample.mask_path, sample.key, image, self.report)
            if values is None:
                return None
            anomalous = values >= self.options.mask_threshold
            count = int(anomalous.sum())
            if normal and count:
                self.report.add(
                    "normal_mask_not_empty",
                    sample.key,
                    f"{count} pixels >= {self.options.mask_threshold} in {sample.mask_path.name}",
                )
                return None
            if not normal and not count:
                self.report.add(
                    "empty_anomaly_mask",
                    sample.key,
                    f"{defect}: no pixel >= {self.options.mask_threshold} in {sample.mask_path.name}",
                )
            canvas = anomalous.astype(np.uint8)
        row = self.base_row(image, image_id, [], normal)
        if sample.source is not None:
            row["source"] = sample.source
        row["mask"] = {"bytes": encode_png(canvas), "path": None}
        row["defect_type"] = self.class_id[defect]
        return row


def _corners(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def _existing_hashes_and_ids(
    repo_dir: Path, config: str, splits: Iterable[str]
) -> tuple[dict[str, str], set[str]]:
    hashes, ids = {}, set()
    for split in splits:
        for batch in iter_split_batches(repo_dir, config, split, columns=["image", "image_id"]):
            images = batch.column("image").field("bytes").to_pylist()
            for data, image_id in zip(images, batch.column("image_id").to_pylist()):
                hashes.setdefault(hashlib.sha1(data).hexdigest(), f"{split}:{image_id}")
                ids.add(image_id)
    return hashes, ids


def _image_id(prefix: str, key: str, used: set[str]) -> str:
    stem = str(PurePosixPath(key).with_suffix(""))
    image_id = prefix + stem
    return prefix + key if image_id in used else image_id


class SplitTarget:
    """The config split being written: its class list (what the config already has, plus the new
    classes appended), the images and ids already in the config (duplicates and id clashes are checked
    against them) and the staged shard writer. Nothing replaces existing shards before :meth:`finish`."""

    def __init__(
        self,
        repo_dir: str | Path,
        config: str,
        split: str,
        targets: list[str],
        taxonomy: Taxonomy,
        *,
        existing: ExistingPolicy = "error",
        label_set: LabelSet | None = None,
        num_shards: int | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        siblings: Iterable[str] = (),
    ) -> None:
        """``siblings``: the other splits written in the same run (their existing rows count as reference
        only when appending, and they are not relabelled: they are being rewritten)."""
        self.repo_dir, self.config, self.split = Path(repo_dir), config, split
        self.task = task_of_config(config)
        siblings = set(siblings) - {split}
        existing_splits = split_names(self.repo_dir, config)
        self.other_splits = [s for s in existing_splits if s != split and s not in siblings]
        written = [split, *sorted(siblings & set(existing_splits))]
        reference = self.other_splits + (written if existing == "append" else [])
        old_features = next(
            (f for s in reference if (f := read_split_features(self.repo_dir, config, s)) is not None), None
        )
        self.old_names = label_names(old_features, self.task) if old_features is not None else None
        self.names = choose_label_names(self.task, targets, config, taxonomy, label_set, self.old_names)
        self.class_id = {name: index for index, name in enumerate(self.names)}
        self.features = features_for(self.task, self.names)
        self.known_hashes, self.used_ids = _existing_hashes_and_ids(self.repo_dir, config, reference)
        self.writer = SplitWriter(
            self.repo_dir,
            config,
            split,
            self.features,
            existing=existing,
            num_shards=num_shards,
            max_shard_size=max_shard_size,
        )

    def duplicate_of(self, image: StoredImage) -> str | None:
        """Where the same image bytes already are in the config (``split:image_id``), if anywhere."""
        return self.known_hashes.get(image.sha1)

    def add(self, row: dict[str, Any], image: StoredImage, report: ValidationReport) -> None:
        self.writer.add(row)
        self.known_hashes[image.sha1] = f"{self.split}:{row['image_id']}"
        self.used_ids.add(row["image_id"])
        report.rows_written += 1

    def abort(self, report: ValidationReport) -> None:
        self.writer.abort()
        report.save(self.repo_dir)

    def finish(
        self, report: ValidationReport, *, update_card: bool = True, show_progress: bool = False
    ) -> SplitWriteResult:
        """Fail (writing nothing) on errors or strict skips; else write the shards, the report and the card."""
        if report.rows_written == 0:
            report.error("no usable samples: every sample was skipped (see the counts above)")
        try:
            report.raise_if_failed()
        except ValidationError:
            self.abort(report)
            raise
        written = self.writer.close(show_progress=show_progress)
        report.save(self.repo_dir)
        if self.old_names is not None and self.names != self.old_names:
            for split in self.other_splits:
                _relabel_split(self.repo_dir, self.config, split, self.features)
        if update_card:
            write_card(self.repo_dir)
        return written


def convert_source(data: SourceData, options: ConvertOptions) -> ConversionResult:
    """Map, clean and write ``data`` as ``options.config``/``options.split``; see the module docstring.

    Raises :class:`~dataset_scripts.report.ValidationError` (writing nothing) when there are errors, or
    any skip under ``strict``; the report is saved in either case.
    """
    taxonomy = options.taxonomy or load_taxonomy()
    repo_dir = Path(options.repo_dir)
    task = task_of_config(options.config)
    if task == AD:
        raise ValueError(
            f"{options.config} is an anomaly-detection config: convert it with convert_ad_source "
            "(formats mvtec, magnetic_tile, ad_folders)"
        )
    _check_options(options, taxonomy)
    report = ValidationReport(options.config, options.split, options.strict, dict(data.info))
    report.source.setdefault("mapping", options.mapping.source)
    for issue in data.pre_issues:
        report.add_from_reader(*issue[:3])

    label_to_node, ignored, unmapped = options.mapping.resolve(data.label_names, taxonomy)
    if unmapped and not options.drop_unmapped:
        report.error(
            f"source labels without a taxonomy node: {sorted(unmapped)}; add them to the mapping file "
            "(source name: taxonomy node) or pass --drop-unmapped to drop their annotations"
        )
        report.save(repo_dir)
        report.raise_if_failed()

    target = SplitTarget(
        repo_dir,
        options.config,
        options.split,
        list(label_to_node.values()),
        taxonomy,
        existing=options.existing,
        label_set=options.label_set,
        num_shards=options.num_shards,
        max_shard_size=options.max_shard_size,
    )
    builder = _RowBuilder(task, target.names, label_to_node, ignored, options, taxonomy, report)
    prefix = f"{options.split}/" if options.id_prefix is None else options.id_prefix
    try:
        _convert_samples(data.samples, target, builder, report, options, prefix)
    except BaseException:
        target.abort(report)
        raise
    written = target.finish(report, update_card=options.update_card, show_progress=options.show_progress)
    return ConversionResult(report, written, target.names)


def _check_options(options: ConvertOptions, taxonomy: Taxonomy) -> None:
    if options.source_kind not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {options.source_kind!r}")
    if options.hierarchy:
        taxonomy.check_hierarchy(*(options.hierarchy.get(k, "") for k in ("domain", "system", "part")))


def _convert_samples(
    samples: list[SourceSample],
    target: SplitTarget,
    builder: _RowBuilder,
    report: ValidationReport,
    options: ConvertOptions,
    prefix: str,
) -> None:
    """Read, check, deduplicate and build every sample into ``target`` (the loop all converters share)."""
    for sample in tqdm(
        samples, desc=f"{target.config}/{target.split}", disable=not options.show_progress, unit="img"
    ):
        report.rows_seen += 1
        if target.split == "train" and target.task == AD and (sample.label or GOOD) != GOOD:
            report.add("anomalous_in_train", sample.key, f"defect type {sample.label!r}")
            continue
        image = read_image(
            sample.image_path,
            sample.key,
            report,
            max_pixels=options.max_pixels,
            expected_size=sample.expected_size,
        )
        if image is None:
            continue
        duplicate = target.duplicate_of(image)
        if duplicate is not None:
            report.add("duplicate_image", sample.key, f"same bytes as {duplicate}")
            continue
        image_id = _image_id(prefix, sample.key, target.used_ids)
        if image_id in target.used_ids:
            report.error(
                f"image id {image_id!r} of {sample.key} is already used in {target.config}; set --id-prefix"
            )
            continue
        row = builder.build(sample, image, image_id)
        if row is not None:
            target.add(row, image, report)


def convert_ad_source(data: SourceData, options: ConvertOptions) -> dict[str, ConversionResult]:
    """Clean and write an anomaly-detection source as the splits its reader assigned (``sample.split``).

    ``defect_type`` names are the source's defect types (``good`` first), the same for every split. Anomalous
    images in train are excluded and counted (``anomalous_in_train``; an error under ``strict``). Image ids
    are the source-relative paths without extension (``options.id_prefix`` prepended, default none), unique
    across the splits, and exact duplicate images are checked across them. Every split is written, or none
    (:class:`~dataset_scripts.report.ValidationError`; the reports are saved in either case).
    """
    taxonomy = options.taxonomy or load_taxonomy()
    repo_dir = Path(options.repo_dir)
    if kind_of_config(options.config) != AD:
        raise ValueError(f"anomaly-detection sources make *_ad configs, not {options.config!r}")
    _check_options(options, taxonomy)
    by_split: dict[str, list[SourceSample]] = {}
    for sample in data.samples:
        by_split.setdefault(sample.split or options.split, []).append(sample)
    splits = sorted(by_split, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    if not splits:
        raise ValueError(f"{data.info.get('path', 'the source')}: no images found")
    info = {**data.info, "mask_threshold": options.mask_threshold}
    reports = {s: ValidationReport(options.config, s, options.strict, dict(info)) for s in splits}
    for issue in data.pre_issues:
        split = issue[3] if len(issue) > 3 and issue[3] in reports else splits[0]
        reports[split].add_from_reader(*issue[:3])
    # Defect types of the evaluation splits (train's anomalous images are excluded, so they add no class).
    types = [s.label or GOOD for split in splits if split != "train" for s in by_split[split]]
    targets: dict[str, SplitTarget] = {}
    try:
        for split in splits:
            targets[split] = SplitTarget(
                repo_dir,
                options.config,
                split,
                [GOOD, *types],
                taxonomy,
                existing=options.existing,
                num_shards=options.num_shards,
                max_shard_size=options.max_shard_size,
                siblings=splits,
            )
    except BaseException:  # e.g. a split exists already: nothing was converted, keep the old reports
        for target in reversed(targets.values()):  # the first writer, which made the folder, last
            target.writer.abort()
        raise
    try:
        known_hashes = {k: v for t in targets.values() for k, v in t.known_hashes.items()}
        used_ids = {i for t in targets.values() for i in t.used_ids}
        for target in targets.values():  # one shared set: duplicates and id clashes across splits
            target.known_hashes, target.used_ids = known_hashes, used_ids
        prefix = options.id_prefix or ""
        for split in splits:
            builder = _RowBuilder(AD, targets[split].names, {}, set(), options, taxonomy, reports[split])
            _convert_samples(by_split[split], targets[split], builder, reports[split], options, prefix)
        for split in splits:
            if reports[split].rows_written == 0:
                reports[split].error("no usable samples: every sample was skipped (see the counts above)")
        failures = [f"{s}: {f}" for s in splits for f in reports[s].failures()]
        if failures:
            raise failures_error(options.config, failures, options.strict)
    except BaseException:
        for split, target in reversed(targets.items()):  # the first writer, which made the folder, last
            target.abort(reports[split])
        for split in splits:
            reports[split].save(repo_dir)
        raise
    results = {}
    for split in splits:
        written = targets[split].finish(
            reports[split], update_card=False, show_progress=options.show_progress
        )
        results[split] = ConversionResult(reports[split], written, targets[split].names)
    if options.update_card:
        write_card(repo_dir)
    return results


def _relabel_split(repo_dir: Path, config: str, split: str, features: Features) -> None:
    """Rewrite a split's shards with ``features`` whose label lists grew at the end (ids unchanged)."""
    count = len(shard_files(repo_dir, config, split))
    SplitWriter(
        repo_dir, config, split, features, existing="append", num_shards=count, shuffle_rows=False
    ).close()
