"""The cleaning and validation report of one conversion (one config split).

Every problem found in the source data is recorded with its kind, the file or image it concerns and what
was done about it. Nothing is dropped silently: each skipped sample, dropped annotation or fixed image is
counted here, and the report is printed, written next to the data (``reports/<config>/<split>.json`` and
``.md``) and summarised in the dataset card. With ``strict=True`` every skip or drop becomes an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .safe_paths import safe_file_name

Action = Literal["skip", "drop", "fix", "error"]

# kind -> (action, what it means). "skip": the sample is left out; "drop": one annotation is left out;
# "fix": the sample is kept after a conversion or correction; "error": the conversion stops.
ISSUE_KINDS: dict[str, tuple[Action, str]] = {
    "missing_file": ("skip", "image or mask file referenced by the annotations does not exist"),
    "unsafe_path": ("skip", "path in the annotations escapes the source folder (or holds a NUL character)"),
    "undecodable": ("skip", "file is not an image Pillow can read"),
    "truncated": ("skip", "image data ends early (truncated file)"),
    "size_mismatch": ("skip", "image size differs from the size in the annotations"),
    "over_pixel_limit": ("skip", "image has more pixels than the limit"),
    "duplicate_image": ("skip", "exact duplicate (same stored bytes) of an image already in the config"),
    "mask_size_mismatch": ("skip", "mask size differs from its image"),
    "mask_not_single_channel": ("skip", "mask is not a single-channel (L, P or I) image"),
    "missing_mask": ("skip", "image has no mask file"),
    "unknown_category": ("drop", "annotation refers to a category id the file does not define"),
    "unmapped_label": ("drop", "source label has no taxonomy node in the mapping (dropped on request)"),
    "unlabelled_image": ("skip", "classification image outside any class folder or with an unmapped class"),
    "degenerate_box": ("drop", "box with no area or not finite after clipping to the image"),
    "degenerate_polygon": ("drop", "polygon with fewer than 3 points or no area after clipping"),
    "malformed_annotation": ("drop", "annotation line or entry cannot be parsed"),
    "ignored_label": ("drop", "annotation whose source label the mapping sends to null (not a class)"),
    "no_segmentation": ("drop", "annotation has a box but no polygon or RLE, so a mask cannot show it"),
    "not_an_image": ("skip", "file in the source tree whose extension is not an image format"),
    "anomalous_in_train": (
        "skip",
        "anomaly detection: an anomalous image in a train split (train is normal only)",
    ),
    "normal_mask_not_empty": (
        "skip",
        "anomaly detection: a normal (good) image whose mask marks anomalous pixels",
    ),
    "box_clipped": ("fix", "box reached past the image border and was clipped"),
    "polygon_clipped": ("fix", "polygon reached past the image border and was clipped"),
    "bbox_recomputed": ("fix", "box disagreed with its polygon by more than 1 px and was recomputed"),
    "crowd_ignored": ("fix", "crowd region: not a detection target, marked 255 (ignore) in masks"),
    "mask_unknown_value": ("fix", "mask pixels with a value outside the class list were set to 255 (ignore)"),
    "converted_mode": ("fix", "image converted to 8-bit RGB"),
    "exif_transposed": ("fix", "image rotated upright from its EXIF orientation"),
    "reencoded": ("fix", "image re-encoded (format not JPEG/PNG/WEBP, or pixels changed)"),
    "defect_not_placed": (
        "fix",
        "synthetic anomaly detection: no room for the planned synthetic defect, the image stays normal",
    ),
    "empty_anomaly_mask": (
        "fix",
        "anomaly detection: anomalous image whose mask marks no pixel; kept (counts for image-level metrics)",
    ),
}


class ValidationError(ValueError):
    """The conversion found errors (or skips under ``--strict``); the message lists them."""


def failures_error(where: str, failures: list[str], strict: bool) -> ValidationError:
    """The one error of a conversion that must write nothing: the first 50 failures, one a line."""
    shown = "\n  ".join(failures[:50])
    more = f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""
    mode = " (--strict: skips are errors)" if strict else ""
    return ValidationError(
        f"{where}: {len(failures)} problem(s){mode}; nothing was written:\n  {shown}{more}"
    )


@dataclass
class Issue:
    kind: str
    item: str
    detail: str = ""


@dataclass
class ValidationReport:
    """Issues found while converting one ``config``/``split``; see :data:`ISSUE_KINDS`."""

    config: str
    split: str
    strict: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # format, path, mapping, citation, licence note
    issues: list[Issue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rows_seen: int = 0
    rows_written: int = 0

    def add(self, kind: str, item: str, detail: str = "") -> None:
        if kind not in ISSUE_KINDS:
            raise KeyError(f"unknown issue kind {kind!r}; known: {sorted(ISSUE_KINDS)}")
        self.issues.append(Issue(kind, str(item), detail))

    def add_from_reader(self, kind: str, item: str, detail: str = "") -> None:
        """An issue the source reader found before the samples reached the pipeline; a skipped sample there is
        still a sample seen (so "Samples seen" counts every sample the source holds, skipped or written)."""
        self.add(kind, item, detail)
        if ISSUE_KINDS[kind][0] == "skip":
            self.rows_seen += 1

    def error(self, message: str) -> None:
        self.errors.append(message)

    def counts(self) -> Counter:
        return Counter(issue.kind for issue in self.issues)

    def count(self, kind: str) -> int:
        return sum(1 for issue in self.issues if issue.kind == kind)

    def failures(self) -> list[str]:
        """Errors, plus every skip and drop when ``strict``."""
        failures = list(self.errors)
        if self.strict:
            failures += [
                f"{issue.kind}: {issue.item}" + (f" ({issue.detail})" if issue.detail else "")
                for issue in self.issues
                if ISSUE_KINDS[issue.kind][0] in ("skip", "drop")
            ]
        return failures

    @property
    def ok(self) -> bool:
        return not self.failures()

    def raise_if_failed(self) -> None:
        failures = self.failures()
        if failures:
            raise failures_error(f"{self.config}/{self.split}", failures, self.strict)

    # ------------------------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "split": self.split,
            "strict": self.strict,
            "source": self.source,
            "rows_seen": self.rows_seen,
            "rows_written": self.rows_written,
            "counts": dict(sorted(self.counts().items())),
            "errors": self.errors,
            "issues": [asdict(issue) for issue in self.issues],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        report = cls(data["config"], data["split"], data.get("strict", False), data.get("source", {}))
        report.issues = [Issue(**issue) for issue in data.get("issues", [])]
        report.errors = list(data.get("errors", []))
        report.rows_seen = data.get("rows_seen", 0)
        report.rows_written = data.get("rows_written", 0)
        return report

    def summary_table(self) -> str:
        counts = self.counts()
        if not counts:
            return "No problems found."
        lines = ["| issue | action | count | meaning |", "|---|---|---:|---|"]
        for kind, count in sorted(counts.items()):
            action, meaning = ISSUE_KINDS[kind]
            lines.append(f"| `{kind}` | {action} | {count} | {meaning} |")
        return "\n".join(lines)

    def to_markdown(self, max_items: int = 20) -> str:
        lines = [
            f"# Validation report: {self.config} / {self.split}",
            "",
            f"Samples seen: {self.rows_seen}; rows written: {self.rows_written}.",
            "",
            self.summary_table(),
        ]
        for message in self.errors:
            lines.append(f"\n**error**: {message}")
        by_kind: dict[str, list[Issue]] = {}
        for issue in self.issues:
            by_kind.setdefault(issue.kind, []).append(issue)
        for kind, issues in sorted(by_kind.items()):
            lines += ["", f"## {kind} ({len(issues)})", ""]
            for issue in issues[:max_items]:
                lines.append(f"- `{issue.item}`" + (f": {issue.detail}" if issue.detail else ""))
            if len(issues) > max_items:
                lines.append(f"- ... and {len(issues) - max_items} more (full list in the JSON report)")
        return "\n".join(lines) + "\n"

    def save(self, repo_dir: str | Path) -> Path:
        """Write ``reports/<config>/<split>.json`` and ``.md`` under the repo folder; returns the JSON path."""
        # the split (and, through the API, the config) may come from the source's folder names: kept inside
        folder = Path(repo_dir) / "reports" / safe_file_name(self.config)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / safe_file_name(self.split, ".json")
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n", encoding="utf-8")
        (folder / safe_file_name(self.split, ".md")).write_text(self.to_markdown(), encoding="utf-8")
        return path


def load_reports(repo_dir: str | Path) -> dict[tuple[str, str], ValidationReport]:
    """All saved reports of a repo folder, keyed by ``(config, split)``."""
    reports = {}
    for path in sorted(Path(repo_dir).glob("reports/*/*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        report = ValidationReport.from_dict(data)
        reports[(report.config, report.split)] = report
    return reports
