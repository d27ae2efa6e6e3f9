"""Reading, checking and normalising source images before they are embedded in a dataset.

:func:`read_image` turns one source file into the bytes that are stored (``StoredImage``) or records why it
cannot be used in the :class:`~dataset_scripts.report.ValidationReport`: missing, undecodable or truncated
files, a size that disagrees with the annotation, too many pixels. Grayscale, palette, CMYK, RGBA and
16-bit images are converted to 8-bit RGB and EXIF-rotated images are turned upright (both counted). Images
that need no change keep their original bytes (JPEG, PNG and WEBP), so nothing is recompressed needlessly.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .report import ValidationReport

DEFAULT_MAX_PIXELS = 40_000_000
KEEP_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}
JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class StoredImage:
    """The bytes that go into the ``image`` column, with their size and content hash."""

    data: bytes
    width: int
    height: int
    format: str
    sha1: str

    def feature(self) -> dict:
        return {"bytes": self.data, "path": None}


def image_extensions() -> set[str]:
    """Lower-case file extensions Pillow can open (``.jpg``, ``.png``, ``.tif``, ...)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def resolve_inside(root: str | Path, relative: str | Path) -> Path | None:
    """``root / relative`` resolved, or ``None`` when it escapes ``root`` (``..``, absolute paths, links) or cannot
    name a file at all (a NUL character)."""
    if "\x00" in os.fspath(relative):
        return None
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate == root or root in candidate.parents else None


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def stored_from_array(array: np.ndarray, fmt: str = "PNG") -> StoredImage:
    """Encode an ``H x W x 3`` uint8 array as a ``StoredImage`` (PNG or JPEG)."""
    data = encode_jpeg(array) if fmt == "JPEG" else encode_png(array)
    return StoredImage(data, array.shape[1], array.shape[0], fmt, hashlib.sha1(data).hexdigest())


def _is_16_bit(image: Image.Image) -> bool:
    if image.mode.startswith("I;16") or image.mode == "I":
        return True
    tile = getattr(image, "tile", None)  # only files not yet loaded know their raw (on-disk) mode
    rawmode = tile[0].args[0] if tile and isinstance(tile[0].args, tuple) else ""
    return isinstance(rawmode, str) and ";16" in rawmode


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: the project's one image -> RGB rule.

    The dataset builder, the training data pipeline and the pictures use this function;
    ``modeling_cadmtl.image_processing_cadmtl`` keeps a copy (Hub files are self-contained) that a test keeps
    equal. The rules:

    * RGB: unchanged. Grayscale (``L``, ``1``): the gray value in all three channels.
    * Palette (``P``): the palette colours; a palette with a transparent entry is treated as alpha (below).
    * CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
    * 16-bit grayscale (``I;16*``): scaled by the full range, ``v * 255 / 65535`` rounded. 32-bit integer
      (``I``, how Pillow opens most 16-bit PNGs) and float (``F``): the same scaling when any value exceeds
      255, else the values are taken as 8-bit; out-of-range values are clipped. The scale never depends on the
      image's own minimum, so dark and bright images keep their difference.
    * Alpha (``RGBA``, ``LA``, ``PA``, transparent palettes): composited onto white, as a viewer shows the
      image and as transformers' ``convert_to_rgb`` does; the alpha channel is then dropped.

    EXIF orientation is not applied here: readers decide (the builder and the pictures turn images upright).
    """
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode in _SIXTEEN_BIT_MODES or np.nanmax(values, initial=0) > 255 else 255.0
        gray = np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()


def read_image(
    source: str | Path | bytes,
    item: str,
    report: ValidationReport,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expected_size: tuple[int, int] | None = None,
) -> StoredImage | None:
    """Check and normalise one image; ``None`` (with the reason recorded under ``item``) if unusable.

    ``expected_size`` is ``(width, height)`` from the annotations. EXIF orientation is applied when the
    upright size matches it (or when there is none); when only the raw size matches, the annotations were
    made on the raw pixels and the image is kept as stored.
    """
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            report.add("missing_file", item, str(source))
            return None
        except OSError as error:
            report.add("undecodable", item, _describe_error(error))
            return None
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format or "PNG"
        width, height = image.size
        sixteen_bit = _is_16_bit(image)
        if width * height > max_pixels:
            report.add("over_pixel_limit", item, f"{width}x{height} > {max_pixels} pixels")
            return None
        image.load()
    except Image.DecompressionBombError as error:
        report.add("over_pixel_limit", item, _describe_error(error))
        return None
    except UnidentifiedImageError:
        report.add("undecodable", item, "not an image format Pillow recognises")
        return None
    except OSError as error:
        kind = (
            "truncated"
            if "truncated" in str(error).lower() or "broken data" in str(error).lower()
            else "undecodable"
        )
        report.add(kind, item, _describe_error(error))
        return None
    except (SyntaxError, ValueError, EOFError) as error:
        report.add("undecodable", item, _describe_error(error))
        return None
    if width == 0 or height == 0:
        report.add("undecodable", item, f"image has size {width}x{height}")
        return None

    changed = False
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in range(2, 9):
        upright = (height, width) if orientation >= 5 else (width, height)
        if expected_size is None or tuple(expected_size) == upright:
            image = ImageOps.exif_transpose(image)
            width, height = image.size
            changed = True
            report.add("exif_transposed", item, f"EXIF orientation {orientation}")
        else:
            # The annotations match the raw pixels: keep them, but drop the tag by re-encoding, or every
            # reader that honours EXIF (datasets.Image, the training decoder) would rotate the image away.
            changed = True
            report.add(
                "reencoded", item, f"EXIF orientation {orientation} dropped: annotations fit the raw pixels"
            )
    if expected_size is not None and tuple(expected_size) != (width, height):
        report.add(
            "size_mismatch",
            item,
            f"image is {width}x{height}, annotations say {expected_size[0]}x{expected_size[1]}",
        )
        return None
    if image.mode != "RGB" or sixteen_bit:
        detail = f"{image.mode}{' 16-bit' if sixteen_bit and image.mode == 'RGB' else ''} -> RGB"
        report.add("converted_mode", item, detail)
        image = to_rgb(image)
        changed = True
    if changed or fmt not in KEEP_FORMATS:
        if not changed:
            report.add("reencoded", item, f"{fmt} stored as PNG")
        array = np.asarray(image.convert("RGB"))
        return stored_from_array(array, "JPEG" if fmt in ("JPEG", "MPO") else "PNG")
    return StoredImage(data, width, height, "JPEG" if fmt == "MPO" else fmt, hashlib.sha1(data).hexdigest())


def relative_key(path: Path, root: Path) -> str:
    """Forward-slash path of ``path`` relative to ``root``, used in image ids and reports."""
    return Path(os.path.relpath(path, root)).as_posix()


def read_mask(path: Path, item: str, image: StoredImage, report: ValidationReport) -> np.ndarray | None:
    """Class-id values (uint8, H x W) of a single-channel mask file that matches ``image`` in size.

    L, P (palette indices), 1 and I/I;16 masks are read as values; RGB masks are accepted only when all
    three channels are equal. Values above 255 become 255 (ignore) and are counted.
    """
    try:
        mask = Image.open(path)
        mask.load()
    except FileNotFoundError:
        report.add("missing_mask", item, str(path))
        return None
    except (OSError, SyntaxError, ValueError) as error:
        report.add("undecodable", item, f"mask {path.name}: {_describe_error(error)}")
        return None
    if mask.size != (image.width, image.height):
        report.add(
            "mask_size_mismatch",
            item,
            f"mask is {mask.size[0]}x{mask.size[1]}, image {image.width}x{image.height}",
        )
        return None
    if mask.mode in ("RGB", "RGBA"):
        channels = np.asarray(mask.convert("RGB"))
        if not (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            report.add("mask_not_single_channel", item, f"{path.name} is a colour {mask.mode} mask")
            return None
        values = channels[..., 0].astype(np.int64)
    elif mask.mode in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(mask).astype(np.int64)
    else:
        report.add("mask_not_single_channel", item, f"{path.name} has mode {mask.mode}")
        return None
    if values.max(initial=0) > 255:
        report.add("mask_unknown_value", item, f"{int((values > 255).sum())} pixels above 255 -> 255")
        values = np.minimum(values, 255)
    return values.astype(np.uint8)
