"""Label mapping files: source label name -> taxonomy node (the paper's re-mapping into the hierarchy).

Two YAML forms are accepted. The short one is a plain mapping (``damage: dent``). The long one adds
sample-level hierarchy defaults for every image of the source::

    labels:
      damage: dent
      scratch: scratch
      _background_: null        # null: not a class, annotations with it are ignored (and counted)
    hierarchy:                  # optional; overrides what is derived from the labels
      domain: exterior
      system: body
      part: whole_vehicle

Source names the file does not list (or all of them, without a file) map to themselves in snake_case
(``"BRAKE PAD"`` -> ``brake_pad``) when that is a taxonomy node. Source labels that map nowhere are an error listing all of them, unless the user asks
to drop them (``--drop-unmapped``), in which case every dropped annotation is counted in the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .taxonomy import Taxonomy, TaxonomyError

IGNORED = object()


def read_class_names(path: str | Path) -> list[str]:
    """A class list file (``classes.txt``): one name a line, in id order; blank lines are skipped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def snake_case(name: str) -> str:
    """``"BRAKE PAD"`` -> ``brake_pad``; ``"Front-Left Door"`` -> ``front_left_door``."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


class MappingError(ValueError):
    """The mapping file is malformed or source labels cannot be mapped."""


@dataclass
class LabelMapping:
    """Maps source label names to taxonomy node names; see the module docstring for the file format."""

    labels: dict[str, str | None] = field(default_factory=dict)
    hierarchy: dict[str, str] = field(default_factory=dict)
    source: str = "<identity>"

    @classmethod
    def from_file(cls, path: str | Path, taxonomy: Taxonomy) -> LabelMapping:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise MappingError(f"{path}: mapping file not found") from None
        except yaml.YAMLError as error:
            raise MappingError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise MappingError(f"{path}: expected a mapping of source label -> taxonomy node")
        structured = isinstance(data.get("labels"), dict) and set(data) <= {"labels", "hierarchy"}
        labels = data["labels"] if structured else data
        hierarchy = (data.get("hierarchy") or {}) if structured else {}
        mapping = cls(
            {str(k): (None if v is None else str(v)) for k, v in labels.items()}, dict(hierarchy), str(path)
        )
        mapping.validate(taxonomy)
        return mapping

    def validate(self, taxonomy: Taxonomy) -> None:
        problems = []
        for source_name, target in self.labels.items():
            if target is None:
                continue
            if target not in taxonomy:
                try:
                    taxonomy.node(target)
                except TaxonomyError as error:
                    problems.append(f"{source_name!r} -> {error}")
                continue
            kind = taxonomy.node(target).kind
            if kind in ("domain", "system"):
                problems.append(
                    f"{source_name!r} -> {target!r} is a {kind}; map labels to anomalies or parts"
                )
        unknown_levels = set(self.hierarchy) - {"domain", "system", "part"}
        if unknown_levels:
            problems.append(f"hierarchy has unknown keys {sorted(unknown_levels)} (use domain, system, part)")
        else:
            try:
                taxonomy.check_hierarchy(*(self.hierarchy.get(k, "") for k in ("domain", "system", "part")))
            except TaxonomyError as error:
                problems.append(f"hierarchy: {error}")
        if problems:
            raise MappingError(f"{self.source}: " + "; ".join(problems))

    def target(self, source_name: str, taxonomy: Taxonomy) -> str | object | None:
        """The node for ``source_name``; ``None`` if it maps nowhere; ``IGNORED`` if mapped to null."""
        for key in (source_name, snake_case(source_name)):
            if key in self.labels:
                return IGNORED if self.labels[key] is None else self.labels[key]
        # Names the file does not list map to themselves when they already are nodes.
        name = snake_case(source_name)
        return (
            name if name in taxonomy and taxonomy.node(name).kind in ("anomaly", "part", "special") else None
        )

    def resolve(
        self, source_names: Iterable[str], taxonomy: Taxonomy
    ) -> tuple[dict[str, str], set[str], list[str]]:
        """Split ``source_names`` into ``({source: node}, {ignored}, [unmapped])``."""
        mapped, ignored, unmapped = {}, set(), []
        for name in source_names:
            target = self.target(name, taxonomy)
            if target is IGNORED:
                ignored.add(name)
            elif target is None:
                unmapped.append(name)
            else:
                mapped[name] = target
        return mapped, ignored, unmapped


def load_mapping(path: str | Path | None, taxonomy: Taxonomy) -> LabelMapping:
    """The mapping in ``path``, or the identity (snake_case) mapping when ``path`` is ``None``."""
    return LabelMapping.from_file(path, taxonomy) if path else LabelMapping()
