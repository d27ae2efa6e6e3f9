"""The one rule for naming an output file after something in the data (image ids, pair ids, file names, class
names): the file always lands inside the output folder, whatever the id holds.

Dataset ids are data, not commands: a dataset from the Hub may hold an ``image_id`` of ``../../x/evil``,
``/abs/evil``, ``C:\\evil`` or ``evil\\x00.png``. Refusing such ids would stop a long run on one bad row, so
:func:`safe_relative_path` **encodes** them instead (the run goes on, and the file is still found under a
recognisable name):

* ``/`` and ``\\`` both separate folders; empty, ``.`` and ``..`` segments are dropped, so a leading ``/``
  (absolute path), ``a/../../evil`` and ``..\\evil`` all stay inside. Sub-folders that remain are kept
  (``test/crack/000`` -> ``test/crack/000.png``), so ids that mirror a source tree keep that tree.
* In each segment, control characters (NUL included) and the characters Windows refuses (``<>:"|?*``, so a
  drive letter ``C:`` too) become ``_``; leading spaces and trailing spaces and dots are stripped; Windows device
  names (``CON``, ``NUL``, ``COM1``, ...) get a ``_`` appended.
* A segment longer than :data:`MAX_SEGMENT_BYTES` (UTF-8, suffix included) is cut.
* Whenever any of this changed the id, ``~`` and the first :data:`HASH_CHARS` hex digits of the SHA-256 of the
  original id are added before the suffix, or, without one, before the name's own extension
  (``../../evil`` -> ``evil~0fbfd372a483.npy``): two different ids that encode alike still get different names,
  and an ordinary id keeps exactly its own name.

A stateless rule cannot see every collision (``Img`` and ``img`` are one file on macOS and Windows; an id may be
crafted to equal another id's encoded form), so writers that name many files use :class:`SafeOutputPaths`,
which remembers the names it gave and gives a later, different id that would take the same file (compared
case-insensitively) its hash suffix instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath

MAX_SEGMENT_BYTES = 200  # below the 255-byte file-name limit of common file systems, with room for the hash
HASH_CHARS = 12
_MAX_EXTENSION = 16
_SEPARATORS = re.compile(r"[/\\]")
_UNSAFE_CHARACTERS = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
_WINDOWS_DEVICES = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def name_hash(name: str) -> str:
    """The short, stable hash that tells encoded ids apart."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def _clean_segment(segment: str) -> str:
    segment = _UNSAFE_CHARACTERS.sub("_", segment).lstrip(" ").rstrip(" .")
    if segment.split(".")[0].lower() in _WINDOWS_DEVICES:
        segment += "_"
    return segment


def _cut(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def _encode(original: str, parts: list[str], suffix: str) -> PurePosixPath:
    """``parts`` (the id split into folders) cleaned and cut, ``suffix`` appended; the hash of ``original``
    added before the suffix (or, without one, before the name's own extension) if that changed the id."""
    segments = [segment for segment in map(_clean_segment, parts) if segment] or ["_"]
    folders = [_cut(segment, MAX_SEGMENT_BYTES) for segment in segments[:-1]]
    last = segments[-1]
    changed = "/".join([*folders, last]) != original
    stem, extension = last, suffix
    if not suffix and len(PurePosixPath(last).suffix) <= _MAX_EXTENSION:  # `x.png` -> `x~<hash>.png`
        extension = PurePosixPath(last).suffix
        stem = last[: len(last) - len(extension)]
    room = MAX_SEGMENT_BYTES - len(extension.encode("utf-8", "surrogatepass"))
    if changed or len(stem.encode("utf-8", "surrogatepass")) > room:
        stem = f"{_cut(stem, room - HASH_CHARS - 1)}~{name_hash(original)}"
    return PurePosixPath(*folders, stem + extension)


def _text(name: str | os.PathLike | int) -> str:
    return os.fspath(name) if isinstance(name, os.PathLike) else str(name)


def safe_relative_path(name: str | os.PathLike | int, suffix: str = "") -> PurePosixPath:
    """The relative path (sub-folders kept, never leaving its folder) that the id ``name`` gets, with ``suffix``
    (e.g. ``".npy"``) appended to its last part; see the module docstring for the rule."""
    original = _text(name)
    return _encode(original, [p for p in _SEPARATORS.split(original) if p not in ("", ".", "..")], suffix)


def safe_file_name(name: str | os.PathLike | int, suffix: str = "") -> str:
    """One file name (no sub-folders) for ``name``, e.g. a class name in ``0_<class>.png``: the same rule, with
    ``/`` and ``\\`` turned into ``_`` instead of separating folders."""
    original = _text(name)
    return _encode(original, [_SEPARATORS.sub("_", original)], suffix).as_posix()


def _inside(folder: Path, relative: PurePosixPath, name: object) -> Path:
    path = folder.joinpath(*relative.parts)
    # The rule cannot leave the folder; this check keeps it that way if the rule is ever edited.
    if os.path.commonpath([os.path.abspath(folder), os.path.abspath(path)]) != os.path.abspath(folder):
        raise ValueError(f"safe_output_path: {name!r} would leave {folder}")
    return path


def safe_output_path(folder: str | os.PathLike, name: str | os.PathLike | int, suffix: str = "") -> Path:
    """``folder / safe_relative_path(name, suffix)``: the file an id names, always inside ``folder``.

    Example: ``safe_output_path("OUT/maps", "../../evil", ".npy")`` is ``OUT/maps/evil~<hash>.npy``.
    """
    return _inside(Path(folder), safe_relative_path(name, suffix), name)


class SafeOutputPaths:
    """The output files of one writer in ``folder``: :func:`safe_output_path`, plus a memory of the names given,
    so two different ids never share a file, not even on a case-insensitive file system.

    The same id asked twice gets the same path; a different id whose name is taken (case-insensitively) gets the
    hash suffix of its own id.
    """

    def __init__(self, folder: str | os.PathLike, suffix: str = "") -> None:
        self.folder, self.suffix = Path(folder), suffix
        self._owners: dict[str, str] = {}  # case-folded relative path -> the id it was given to

    def __call__(self, name: str | os.PathLike | int) -> Path:
        original = _text(name)
        relative = safe_relative_path(original, self.suffix)
        owner = self._owners.setdefault(relative.as_posix().casefold(), original)
        if owner != original:
            extension = self.suffix or (relative.suffix if len(relative.suffix) <= _MAX_EXTENSION else "")
            stem = relative.name[: len(relative.name) - len(extension)]
            stem = _cut(stem, MAX_SEGMENT_BYTES - len(extension.encode("utf-8")) - 2 * (HASH_CHARS + 1))
            relative = relative.with_name(f"{stem}~{name_hash(original)}{extension}")
            owner = self._owners.setdefault(relative.as_posix().casefold(), original)
            if owner != original:
                raise ValueError(f"output names of {owner!r} and {original!r} collide in {self.folder}")
        return _inside(self.folder, relative, original)
