"""The CAD 100K domain -> system -> part -> anomaly taxonomy (``taxonomy.yaml``).

Every class name of every dataset config is a node of the taxonomy, so a sample's hierarchy fields and its
labels always resolve to one place in it. Node names are unique across the whole file, which lets a label
name alone identify its domain, system and (when pinned) part.

>>> tax = load_taxonomy()
>>> tax.lineage("brake_pad_worn")
('chassis', 'brakes', 'brake_pad')
>>> tax.label_names("chassis_cls")[:3]
['normal', 'shock_absorber_leak', 'spring_broken']
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dataset_scripts.schema import BACKGROUND, CONFIG_SCHEMAS, NORMAL, TASKS

DEFAULT_TAXONOMY_PATH = Path(__file__).with_name("taxonomy.yaml")

NodeKind = Literal["domain", "system", "part", "anomaly", "special"]
SURFACES = ("panel", "metal", "fabric")
SYNTHESIS_STYLES = (
    "scratch",
    "dent",
    "crack",
    "corrosion",
    "paint_peel",
    "missing_part",
    "stain",
    "burn",
    "tear",
    "bulge",
)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class TaxonomyError(ValueError):
    """The taxonomy file is malformed, or a name is not one of its nodes."""


@dataclass(frozen=True)
class Node:
    """One taxonomy node with its position in the hierarchy (``None`` where a level does not apply)."""

    name: str
    kind: NodeKind
    domain: str | None = None
    system: str | None = None
    part: str | None = None
    description: str = ""
    synthesis: str | None = None
    color: tuple[int, int, int] | None = None


class Taxonomy:
    """Read-only view of a taxonomy file. Build it with :func:`load_taxonomy` or :meth:`from_file`."""

    def __init__(self, data: dict[str, Any], source: str = "<dict>") -> None:
        self.source = source
        self._nodes: dict[str, Node] = {}
        self._domains: dict[str, dict[str, Any]] = {}
        self._systems: dict[str, list[str]] = {}  # domain -> systems
        self._parts: dict[tuple[str, str], list[str]] = {}  # (domain, system) -> parts
        self._anomalies: dict[str, list[str]] = {}  # domain -> anomalies in file order
        self._parse(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Taxonomy:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TaxonomyError(f"{path}: taxonomy file not found") from None
        except yaml.YAMLError as err:
            raise TaxonomyError(f"{path}: not valid YAML: {err}") from None
        return cls(data, source=str(path))

    # ----------------------------------------------------------------------------------------- parsing
    def _fail(self, message: str) -> None:
        raise TaxonomyError(f"{self.source}: {message}")

    def _add(self, node: Node) -> None:
        if not isinstance(node.name, str) or not _NAME_RE.match(node.name):
            self._fail(f"node name {node.name!r} is not snake_case ([a-z][a-z0-9_]*)")
        if node.name in self._nodes:
            other = self._nodes[node.name]
            self._fail(
                f"node name {node.name!r} is used twice ({other.kind} in {other.domain or '-'} and "
                f"{node.kind} in {node.domain or '-'}); names must be unique across the taxonomy"
            )
        self._nodes[node.name] = node

    def _parse_anomalies(self, entries: Any, domain: str, system: str | None, parts: list[str]) -> None:
        where = f"{domain}.{system}" if system else domain
        if entries is None:
            return
        if not isinstance(entries, dict):
            self._fail(f"'anomalies' of {where} must be a mapping name -> options")
        for name, options in entries.items():
            options = options or {}
            if not isinstance(options, dict):
                self._fail(f"anomaly {name!r} in {where}: options must be a mapping")
            unknown = set(options) - {"part", "synthesis", "color", "description"}
            if unknown:
                self._fail(f"anomaly {name!r} in {where}: unknown keys {sorted(unknown)}")
            part = options.get("part")
            if part is not None and part not in parts:
                self._fail(f"anomaly {name!r} is pinned to part {part!r}, which is not a part of {where}")
            style = options.get("synthesis")
            if style is not None and style not in SYNTHESIS_STYLES:
                self._fail(
                    f"anomaly {name!r}: synthesis style {style!r} is not one of {list(SYNTHESIS_STYLES)}"
                )
            color = options.get("color")
            if color is not None:
                if not (
                    isinstance(color, list) and len(color) == 3 and all(0 <= int(c) <= 255 for c in color)
                ):
                    self._fail(f"anomaly {name!r}: color must be a list of three 0-255 integers")
                color = tuple(int(c) for c in color)
            self._add(
                Node(
                    name,
                    "anomaly",
                    domain,
                    system,
                    part,
                    description=str(options.get("description", "")),
                    synthesis=style,
                    color=color,
                )
            )
            self._anomalies[domain].append(name)

    def _parse(self, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
            self._fail("expected a mapping with a 'domains' mapping at the top level")
        for name, description in (data.get("special") or {}).items():
            self._add(Node(name, "special", description=str(description)))
        for required in (NORMAL, BACKGROUND):
            if required not in self._nodes:
                self._fail(f"the 'special' section must define {required!r}")
        for domain, spec in data["domains"].items():
            if not isinstance(spec, dict):
                self._fail(f"domain {domain!r} must be a mapping")
            tasks = spec.get("tasks") or []
            if not tasks or any(t not in TASKS for t in tasks):
                self._fail(
                    f"domain {domain!r}: tasks must be a non-empty subset of {list(TASKS)}, got {tasks}"
                )
            surface = spec.get("surface", "metal")
            if surface not in SURFACES:
                self._fail(f"domain {domain!r}: surface {surface!r} is not one of {list(SURFACES)}")
            self._add(Node(domain, "domain", domain, description=str(spec.get("description", ""))))
            self._domains[domain] = {"tasks": list(tasks), "surface": surface}
            self._systems[domain] = []
            self._anomalies[domain] = []
            domain_parts: list[str] = []
            systems = spec.get("systems") or {}
            if not isinstance(systems, dict) or not systems:
                self._fail(f"domain {domain!r} needs a non-empty 'systems' mapping")
            for system, sys_spec in systems.items():
                sys_spec = sys_spec or {}
                self._add(Node(system, "system", domain, system))
                self._systems[domain].append(system)
                parts = sys_spec.get("parts") or []
                if not isinstance(parts, list) or not parts:
                    self._fail(f"system {domain}.{system} needs a non-empty 'parts' list")
                for part in parts:
                    self._add(Node(part, "part", domain, system, part))
                self._parts[(domain, system)] = list(parts)
                domain_parts.extend(parts)
            # Domain-wide anomalies first, then per-system ones, in file order: this fixes the class ids.
            self._parse_anomalies(spec.get("anomalies"), domain, None, domain_parts)
            for system, sys_spec in systems.items():
                self._parse_anomalies(
                    (sys_spec or {}).get("anomalies"), domain, system, self._parts[(domain, system)]
                )
            if not self._anomalies[domain]:
                self._fail(f"domain {domain!r} has no anomalies")

    # ----------------------------------------------------------------------------------------- queries
    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, name: str) -> Node:
        """The node called ``name``; a clear error with close matches when there is none."""
        try:
            return self._nodes[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._nodes), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TaxonomyError(f"{name!r} is not a node of the taxonomy {self.source}.{hint}") from None

    def sort_names(self, names: Iterable[str]) -> list[str]:
        """``names`` (all nodes) sorted by their position in the taxonomy file, duplicates removed."""
        position = {name: index for index, name in enumerate(self._nodes)}
        unique = set(names)
        for name in unique:
            self.node(name)
        return sorted(unique, key=position.__getitem__)

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def tasks(self, domain: str) -> list[str]:
        self._require_kind(domain, "domain")
        return list(self._domains[domain]["tasks"])

    def surface(self, domain: str) -> str:
        self._require_kind(domain, "domain")
        return self._domains[domain]["surface"]

    def systems(self, domain: str | None = None) -> list[str]:
        if domain is None:
            return [s for d in self._domains for s in self._systems[d]]
        self._require_kind(domain, "domain")
        return list(self._systems[domain])

    def parts(self, domain: str | None = None, system: str | None = None) -> list[str]:
        if system is not None:
            node = self._require_kind(system, "system")
            return list(self._parts[(node.domain, system)])
        domains = [domain] if domain is not None else self.domains
        if domain is not None:
            self._require_kind(domain, "domain")
        return [p for d in domains for s in self._systems[d] for p in self._parts[(d, s)]]

    def anomalies(self, domain: str | None = None, system: str | None = None) -> list[str]:
        """Anomaly names in file order; with ``system`` also the domain-wide ones that apply to it."""
        if domain is None and system is None:
            return [a for d in self._domains for a in self._anomalies[d]]
        if system is not None:
            node = self._require_kind(system, "system")
            return [a for a in self._anomalies[node.domain] if self._nodes[a].system in (None, system)]
        self._require_kind(domain, "domain")
        return list(self._anomalies[domain])

    def lineage(self, name: str) -> tuple[str, str, str]:
        """``(domain, system, part)`` of a node; ``""`` where the node sits above that level."""
        node = self.node(name)
        return (node.domain or "", node.system or "", node.part or "")

    def common_lineage(self, names: Iterable[str]) -> tuple[str, str, str]:
        """The deepest ``(domain, system, part)`` shared by all ``names`` (``""`` below the shared level)."""
        lineages = [self.lineage(n) for n in names if self.node(n).kind != "special"]
        if not lineages:
            return ("", "", "")
        shared: list[str] = []
        for level in range(3):
            values = {lin[level] for lin in lineages}
            if len(values) != 1 or "" in values:
                break
            shared.append(values.pop())
        return tuple(shared + [""] * (3 - len(shared)))  # type: ignore[return-value]

    def config_names(self) -> list[str]:
        """The CAD configs, ``<domain>_<task>``, in taxonomy order (the first one is the default config)."""
        return [f"{d}_{t}" for d in self._domains for t in self._domains[d]["tasks"]]

    def domain_of_config(self, config: str) -> str | None:
        """The domain of a CAD config name such as ``exterior_seg``; ``None`` for other configs."""
        for domain in self._domains:
            for task in self._domains[domain]["tasks"]:
                if config == f"{domain}_{task}":
                    return domain
        return None

    def label_names(self, config: str) -> list[str]:
        """Full label list of a CAD config: ``normal`` first for cls, ``background`` first for seg."""
        domain = self.domain_of_config(config)
        if domain is None:
            raise TaxonomyError(
                f"{config!r} is not a CAD config of {self.source}; known: {', '.join(self.config_names())}"
            )
        task = config.rsplit("_", 1)[1]
        return [*CONFIG_SCHEMAS[task].leading_classes, *self.anomalies(domain)]

    def check_hierarchy(self, domain: str, system: str, part: str) -> None:
        """Raise unless the three fields name nested nodes (``""`` allowed below the given level)."""
        if domain:
            self._require_kind(domain, "domain")
        if system:
            node = self._require_kind(system, "system")
            if node.domain != domain:
                raise TaxonomyError(f"system {system!r} belongs to domain {node.domain!r}, not {domain!r}")
        elif part:
            raise TaxonomyError(f"part {part!r} given without its system")
        if part:
            node = self._require_kind(part, "part")
            if node.system != system:
                raise TaxonomyError(f"part {part!r} belongs to system {node.system!r}, not {system!r}")

    def _require_kind(self, name: str, kind: NodeKind) -> Node:
        node = self.node(name)
        if node.kind != kind:
            raise TaxonomyError(f"{name!r} is a {node.kind} of the taxonomy, not a {kind}")
        return node


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> Taxonomy:
    return Taxonomy.from_file(path)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load (and cache) a taxonomy file; the packaged ``taxonomy.yaml`` by default."""
    return _load_cached(str(Path(path or DEFAULT_TAXONOMY_PATH).resolve()))
