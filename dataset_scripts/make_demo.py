"""Build ``cad100k-mini``: a small, deterministic, learnable demo repo folder with all 8 CAD configs
plus the anomaly-detection config ``exterior_ad``.

    cadmtl data make-demo OUT_DIR [--train 48] [--validation 16] [--test 16] [--seed 0]

Images are procedural close-ups (painted panel for exterior, fabric for interior, metal elsewhere, as
``surface:`` in the taxonomy says), 96-192 px per side, with defects from :mod:`dataset_scripts.synthetic`.
Each config uses a few anomaly classes of its domain whose synthesis styles look different (corrosion,
scratch, missing part, stain, ...), so a tiny model can separate them within minutes on a CPU. About 20 %
of the images are normal. Every row has ``source = synthetic``. The same arguments give the same bytes.

``exterior_ad`` (anomaly detection): train holds normal painted panels only; validation and test are half
normal, half panels with one synthetic defect of the config's classes (``defect_type``), whose mask is exact
(0 normal pixel, 1 anomalous).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .card import write_card
from .images import encode_jpeg
from .options import add_seed_option, exit_status
from .procedural import make_surface
from .schema import AD, CONFIG_SCHEMAS, ConfigSchema, Instance, features_for, task_of_config
from .synthetic import DefectSpec, PlacedDefect, place_defects
from .taxonomy import Taxonomy, load_taxonomy
from .writer import write_split

# Styles in the order the demo prefers them: the first ones differ most in colour and shape.
DEMO_STYLE_ORDER = (
    "corrosion",
    "scratch",
    "missing_part",
    "stain",
    "dent",
    "crack",
    "burn",
    "tear",
    "paint_peel",
    "bulge",
)
NORMAL_FRACTION = 0.2
AD_NORMAL_FRACTION = 0.5  # of the validation and test rows of the ad config (train is all normal)
AD_CONFIGS = ("exterior_ad",)
SIZE_RANGE = (96, 192)
JPEG_QUALITY = 90
# The card's pretty_name: how a repo (and a model trained on it, `dataset_scripts.provenance`) is known to be
# generated rather than photographed.
DEMO_PRETTY_NAME = "cad100k-mini"
INTRO = """# cad100k-mini

A small procedural stand-in for CAD 100K with all 8 configs (plus `exterior_ad`, normal-only training data
for anomaly detection), built in seconds by
`cadmtl data make-demo` of the cad-mtl project. Every image is synthetic: a procedural
surface (painted panel, fabric or metal) with procedural defects whose masks and boxes are exact. It is
meant for tests, demos and the default training run, not for measuring real-world accuracy.
"""


def demo_classes(taxonomy: Taxonomy, domain: str, count: int) -> list[str]:
    """``count`` anomalies of ``domain`` with pairwise different synthesis styles, most distinct first."""
    chosen = []
    for style in DEMO_STYLE_ORDER:
        match = next((a for a in taxonomy.anomalies(domain) if taxonomy.node(a).synthesis == style), None)
        if match is not None:
            chosen.append(match)
        if len(chosen) == count:
            return chosen
    raise ValueError(
        f"domain {domain!r} has only {len(chosen)} anomalies with distinct styles, {count} requested"
    )


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _pick_hierarchy(
    taxonomy: Taxonomy, domain: str, nodes: list[str], rng: np.random.Generator
) -> tuple[str, str, str]:
    """A (system, part) the image can show: the anomalies' own when they pin one, else a random fitting one."""
    _, system, part = taxonomy.common_lineage(nodes) if nodes else (domain, "", "")
    if not system:
        system = str(rng.choice(taxonomy.systems(domain)))
    if not part:
        part = str(rng.choice(taxonomy.parts(system=system)))
    return domain, system, part


def _specs(taxonomy: Taxonomy, names: list[str]) -> list[DefectSpec]:
    return [DefectSpec(taxonomy.node(n).synthesis, n, taxonomy.node(n).color) for n in names]


def _demo_rows(
    taxonomy: Taxonomy, config: str, split: str, count: int, classes: list[str], seed: int
) -> list[dict[str, Any]]:
    schema = CONFIG_SCHEMAS[task_of_config(config)]
    domain = taxonomy.domain_of_config(config)
    rng = _rng(seed, config, split)
    num_normal = round(NORMAL_FRACTION * count)
    # Balanced first classes so every class appears in every split, then a seeded shuffle of the order.
    plan: list[list[str]] = [[] for _ in range(num_normal)]
    for index in range(count - num_normal):
        first = classes[index % len(classes)]
        extra = (
            []
            if schema.one_label_per_image
            else [str(c) for c in rng.choice(classes, size=int(rng.integers(0, 3)))]
        )
        plan.append([first, *extra])
    order = rng.permutation(count)
    names = [*schema.leading_classes, *classes]
    class_id = {name: index for index, name in enumerate(names)}
    rows = []
    for index in range(count):
        wanted = plan[order[index]]
        height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
        normal = make_surface(taxonomy.surface(domain), height, width, rng)
        # one defect per image is drawn larger than the several of a detection or segmentation image
        radius_range = (0.24, 0.32) if schema.one_label_per_image else (0.14, 0.22)
        image, placed = place_defects(normal, _specs(taxonomy, wanted), rng, radius_range=radius_range)
        hierarchy = _pick_hierarchy(taxonomy, domain, [p.anomaly for p in placed], rng)
        rows.append(
            _demo_row(schema, f"{split}/{config}-{index:05d}", image, hierarchy, placed, class_id, index)
        )
    return rows


def _demo_row(
    schema: ConfigSchema,
    image_id: str,
    image: np.ndarray,
    hierarchy: tuple[str, str, str],
    placed: list[PlacedDefect],
    class_id: dict[str, int],
    index: int,
) -> dict[str, Any]:
    """One demo row: the common columns of a synthetic image and the label columns of its placed defects."""
    height, width = image.shape[:2]
    row = {
        "image": {"bytes": encode_jpeg(image, JPEG_QUALITY), "path": None},
        "image_id": image_id,
        "width": width,
        "height": height,
        "domain": hierarchy[0],
        "system": hierarchy[1],
        "part": hierarchy[2],
        "source": "synthetic",
        "is_normal": not placed,
    }
    instances = [Instance(class_id[p.anomaly], p.bbox, p.area, p.mask) for p in placed]
    empty_class = class_id.get(schema.normal_class) if schema.normal_class else None
    ids = [index * 10 + k for k in range(len(placed))]
    return row | schema.instance_columns(instances, (height, width), empty_class, ids)


def _demo_ad_rows(
    taxonomy: Taxonomy, config: str, split: str, count: int, classes: list[str], seed: int
) -> list[dict[str, Any]]:
    """Normal panels (train) or half normal, half one-defect panels (validation, test) with exact masks."""
    domain = config.rsplit("_", 1)[0]
    rng = _rng(seed, config, split)
    num_normal = count if split == "train" else round(AD_NORMAL_FRACTION * count)
    plan = [None] * num_normal + [classes[i % len(classes)] for i in range(count - num_normal)]
    order = rng.permutation(count)
    schema = CONFIG_SCHEMAS[AD]
    class_id = {name: index for index, name in enumerate([*schema.leading_classes, *classes])}
    rows = []
    for index in range(count):
        wanted = plan[order[index]]
        height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
        image = make_surface(taxonomy.surface(domain), height, width, rng)
        placed = []
        if wanted is not None:
            image, placed = place_defects(image, _specs(taxonomy, [wanted]), rng, radius_range=(0.14, 0.22))
        hierarchy = _pick_hierarchy(taxonomy, domain, [p.anomaly for p in placed], rng)
        rows.append(
            _demo_row(schema, f"{split}/{config}-{index:05d}", image, hierarchy, placed, class_id, index)
        )
    return rows


def build_demo_dataset(
    out_dir: str | Path,
    *,
    train: int = 48,
    validation: int = 16,
    test: int = 16,
    seed: int = 0,
    classes_per_config: int = 3,
    train_shards: int = 4,
    eval_shards: int = 2,
    configs: Sequence[str] | None = None,
    ad_configs: Sequence[str] = AD_CONFIGS,
) -> dict[str, dict[str, int]]:
    """Write the demo repo folder; returns ``{config: {split: rows}}``.

    ``configs``: CAD configs (default: all 8); ``ad_configs``: ``<domain>_ad`` anomaly-detection configs
    (default ``exterior_ad``; ``()`` for none).
    """
    taxonomy = load_taxonomy()
    configs = list(configs or taxonomy.config_names())
    counts = {"train": train, "validation": validation, "test": test}
    written: dict[str, dict[str, int]] = {}
    for config in [*configs, *ad_configs]:
        ad = task_of_config(config) == AD
        domain = config.rsplit("_", 1)[0] if ad else taxonomy.domain_of_config(config)
        if domain is None or domain not in taxonomy.domains:
            raise ValueError(
                f"{config!r} is not a CAD config or <domain>_ad; known: {taxonomy.config_names()}, "
                f"domains {list(taxonomy.domains)}"
            )
        classes = demo_classes(taxonomy, domain, classes_per_config)
        names = [*CONFIG_SCHEMAS[task_of_config(config)].leading_classes, *classes]
        features = features_for(task_of_config(config), names)
        written[config] = {}
        make_rows = _demo_ad_rows if ad else _demo_rows
        for split, count in counts.items():
            if count <= 0:
                continue
            rows = make_rows(taxonomy, config, split, count, classes, seed)
            shards = train_shards if split == "train" else eval_shards
            result = write_split(
                out_dir, config, split, rows, features, existing="replace", num_shards=min(shards, count)
            )
            written[config][split] = result.num_rows
    write_card(
        out_dir, pretty_name=DEMO_PRETTY_NAME, license="apache-2.0", intro=INTRO, repo_hint=str(out_dir)
    )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl data make-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="repo folder to write (e.g. data/cad100k-mini)")
    parser.add_argument("--train", type=int, default=48, help="train rows per config (48)")
    parser.add_argument("--validation", type=int, default=16, help="validation rows per config (16)")
    parser.add_argument("--test", type=int, default=16, help="test rows per config (16)")
    add_seed_option(parser, 0)
    parser.add_argument("--classes", type=int, default=3, help="anomaly classes per config (3)")
    parser.add_argument("--train-shards", type=int, default=4)
    parser.add_argument("--eval-shards", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def run() -> None:
        written = build_demo_dataset(
            args.out_dir,
            train=args.train,
            validation=args.validation,
            test=args.test,
            seed=args.seed,
            classes_per_config=args.classes,
            train_shards=args.train_shards,
            eval_shards=args.eval_shards,
        )
        for config, splits in written.items():
            print(f"{config:16s} " + "  ".join(f"{s} {n}" for s, n in splits.items()))
        print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")

    return exit_status(run, (ValueError,), error_status=1)


if __name__ == "__main__":
    sys.exit(main())
