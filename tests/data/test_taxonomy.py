"""The taxonomy file: coverage, uniqueness, lineage, config label lists, and open-set edits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dataset_scripts.mapping import LabelMapping, MappingError, load_mapping, snake_case
from dataset_scripts.taxonomy import (
    DEFAULT_TAXONOMY_PATH,
    SYNTHESIS_STYLES,
    Taxonomy,
    TaxonomyError,
    load_taxonomy,
)

MAPPINGS = Path(__file__).resolve().parents[2] / "dataset_scripts" / "mappings"
CAD_CONFIGS = [
    "exterior_seg",
    "exterior_det",
    "interior_det",
    "general_det",
    "chassis_cls",
    "engine_bay_cls",
    "electrical_cls",
    "ev_specific_cls",
]


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def test_covers_the_paper_hierarchy(taxonomy: Taxonomy) -> None:
    assert taxonomy.domains == [
        "exterior",
        "interior",
        "general",
        "chassis",
        "engine_bay",
        "electrical",
        "ev_specific",
    ]
    assert len(taxonomy.systems()) >= 23
    assert len(taxonomy.anomalies()) >= 78
    # The paper's named systems and anomalies are all nodes.
    for system in (
        "suspension",
        "brakes",
        "tires",
        "fluids",
        "consumables",
        "engine",
        "battery_pack",
        "charging",
    ):
        assert taxonomy.node(system).kind == "system"
    for anomaly in (
        "dent",
        "scratch",
        "crack",
        "glass_shatter",
        "lamp_broken",
        "tire_flat",
        "engine_oil_leak",
        "coolant_leak",
        "belt_aging",
        "camshaft_worn",
        "cylinder_carbon_deposit",
        "fastener_loose",
    ):
        assert taxonomy.node(anomaly).kind == "anomaly"
    assert {taxonomy.node(a).synthesis for a in taxonomy.anomalies()} <= set(SYNTHESIS_STYLES)


def test_tasks_and_config_names_follow_the_paper(taxonomy: Taxonomy) -> None:
    assert taxonomy.config_names() == CAD_CONFIGS
    assert taxonomy.tasks("exterior") == ["seg", "det"]
    assert taxonomy.domain_of_config("ev_specific_cls") == "ev_specific"
    assert taxonomy.domain_of_config("parts_cls") is None


def test_lineage_and_common_lineage(taxonomy: Taxonomy) -> None:
    assert taxonomy.lineage("brake_pad_worn") == ("chassis", "brakes", "brake_pad")
    assert taxonomy.lineage("dent") == ("exterior", "", "")  # domain-wide anomaly
    assert taxonomy.lineage("alternator") == ("electrical", "charging_starting", "alternator")
    assert taxonomy.common_lineage(["brake_pad_worn", "brake_rotor_rust"]) == ("chassis", "brakes", "")
    assert taxonomy.common_lineage(["brake_pad_worn", "brake_pad_worn"]) == ("chassis", "brakes", "brake_pad")
    assert taxonomy.common_lineage(["dent", "brake_pad_worn"]) == ("", "", "")
    assert taxonomy.common_lineage(["normal"]) == ("", "", "")
    assert "dent" in taxonomy.anomalies(system="glass") and "glass_shatter" in taxonomy.anomalies(
        system="glass"
    )
    assert "lamp_broken" not in taxonomy.anomalies(system="glass")


def test_config_label_lists(taxonomy: Taxonomy) -> None:
    cls = taxonomy.label_names("chassis_cls")
    assert cls[0] == "normal" and cls[1:] == taxonomy.anomalies("chassis")
    seg = taxonomy.label_names("exterior_seg")
    assert seg[0] == "background" and seg[1:] == taxonomy.anomalies("exterior")
    assert taxonomy.label_names("interior_det") == taxonomy.anomalies("interior")
    with pytest.raises(TaxonomyError, match="not a CAD config"):
        taxonomy.label_names("parts_cls")


def test_unknown_names_suggest_close_matches(taxonomy: Taxonomy) -> None:
    with pytest.raises(TaxonomyError, match=r"'brake_pad_wron' is not a node.*'brake_pad_worn'"):
        taxonomy.node("brake_pad_wron")


def test_check_hierarchy(taxonomy: Taxonomy) -> None:
    taxonomy.check_hierarchy("chassis", "brakes", "brake_pad")
    taxonomy.check_hierarchy("exterior", "", "")
    with pytest.raises(TaxonomyError, match="belongs to domain 'chassis'"):
        taxonomy.check_hierarchy("exterior", "brakes", "")
    with pytest.raises(TaxonomyError, match="belongs to system 'brakes'"):
        taxonomy.check_hierarchy("chassis", "tires", "brake_pad")


def test_public_benchmark_mappings_target_part_nodes(taxonomy: Taxonomy) -> None:
    dsmlr = load_mapping(MAPPINGS / "carparts_dsmlr.yaml", taxonomy)
    parts50 = load_mapping(MAPPINGS / "carparts50.yaml", taxonomy)
    assert len([v for v in dsmlr.labels.values() if v]) == 18
    assert len(parts50.labels) == 50
    for target in [*filter(None, dsmlr.labels.values()), *parts50.labels.values()]:
        assert taxonomy.node(target).kind == "part"
    assert dsmlr.hierarchy == {"domain": "exterior", "system": "body", "part": "whole_vehicle"}
    assert parts50.target("CARBERATOR", taxonomy) == "carburetor"


def _edited_copy(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(DEFAULT_TAXONOMY_PATH.read_text())
    edit(data)
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_new_category_is_a_yaml_edit(tmp_path: Path) -> None:
    def add(data):
        data["domains"]["chassis"]["systems"]["brakes"]["anomalies"]["brake_pad_glazed"] = {
            "part": "brake_pad",
            "synthesis": "stain",
        }
        data["domains"]["chassis"]["systems"]["steering"] = {
            "parts": ["tie_rod"],
            "anomalies": {"tie_rod_bent": {}},
        }

    taxonomy = Taxonomy.from_file(_edited_copy(tmp_path, add))
    assert taxonomy.lineage("brake_pad_glazed") == ("chassis", "brakes", "brake_pad")
    assert taxonomy.lineage("tie_rod_bent") == ("chassis", "steering", "")
    labels = taxonomy.label_names("chassis_cls")
    assert "brake_pad_glazed" in labels and labels[-1] == "tie_rod_bent"
    assert len(labels) == len(load_taxonomy().label_names("chassis_cls")) + 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["domains"]["chassis"]["systems"]["brakes"]["parts"].append("dent"),
            "'dent' is used twice",
        ),
        (
            lambda d: d["domains"]["chassis"]["systems"]["brakes"]["anomalies"].update(
                x_y={"synthesis": "melt"}
            ),
            "synthesis style 'melt'",
        ),
        (
            lambda d: d["domains"]["chassis"]["systems"]["brakes"]["anomalies"].update(x_y={"part": "tire"}),
            "pinned to part 'tire'",
        ),
        (lambda d: d["domains"]["chassis"].update(tasks=["cls", "ocr"]), "tasks must be a non-empty subset"),
        (
            lambda d: d["domains"]["chassis"]["systems"]["brakes"]["parts"].append("Brake Disc"),
            "not snake_case",
        ),
        (lambda d: d.pop("special"), "must define 'normal'"),
    ],
)
def test_malformed_taxonomy_names_the_file_and_problem(tmp_path: Path, edit, message: str) -> None:
    path = _edited_copy(tmp_path, edit)
    with pytest.raises(TaxonomyError, match=message) as info:
        Taxonomy.from_file(path)
    assert str(path) in str(info.value)


def test_mapping_file_forms_and_errors(tmp_path: Path, taxonomy: Taxonomy) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("damage: dent\nscratchy: scratch\n")
    mapping = load_mapping(flat, taxonomy)
    mapped, ignored, unmapped = mapping.resolve(["damage", "scratchy", "Crack", "blob"], taxonomy)
    assert mapped == {"damage": "dent", "scratchy": "scratch", "Crack": "crack"}  # Crack maps to itself
    assert unmapped == ["blob"] and not ignored
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "labels:\n  damage: dnet\n  thing: exterior\nhierarchy:\n  domain: exterior\n  system: brakes\n"
    )
    with pytest.raises(MappingError) as info:
        load_mapping(bad, taxonomy)
    text = str(info.value)
    assert (
        str(bad) in text
        and "'dnet' is not a node" in text
        and "is a domain" in text
        and "belongs to domain 'chassis'" in text
    )
    assert snake_case("Front-Left  Door") == "front_left_door"
    assert LabelMapping().target("BRAKE PAD", taxonomy) == "brake_pad"
