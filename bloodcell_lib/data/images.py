"""Decode any image file into RGB, or say clearly which file failed and why.

Every data set here is untrusted input (a .DS_Store file named .jpg, truncated downloads,
Git-LFS pointers instead of pictures), so each failure becomes one ``ImageLoadError``
naming the file, which loaders and the audit can report instead of crashing mid-run.
Truncated files are never decoded silently: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

Box = tuple[int, int, int, int]

# Leading bytes of files that often hide behind an image extension, so a reason reads
# "a macOS .DS_Store file" rather than a hex dump.
_KNOWN_NON_IMAGES = {
    b"\x00\x00\x00\x01Bud1": "a macOS .DS_Store file",
    b"version https://git-lfs": "a Git LFS pointer (run `git lfs pull`)",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"<": "an HTML/XML text file",
}
# Bytes a complete file of these formats ends with; a file that lacks them is decoded in
# full by probe_image(full=False) instead of being trusted on its header.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


class ImageLoadError(ValueError):
    """An image file cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _not_an_image(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(32)
    for magic, what in _KNOWN_NON_IMAGES.items():
        if head.lstrip().startswith(magic):
            return f"not an image: {what}"
    return f"not an image: unknown format (starts with {head[:12]!r})"


def _ends_cleanly(path: Path, image_format: str | None) -> bool:
    """True unless a JPEG/PNG lacks its end marker, the usual sign of a truncated file."""
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(handle.tell() - 64, 0))
        return handle.read().rstrip(b"\x00\r\n").endswith(marker)


def _describe(err: Exception, what: str) -> str:
    what = "truncated file" if "truncated" in str(err).lower() else what
    return f"{what} ({type(err).__name__}: {err})"


def _open(path: str | os.PathLike, *, full: bool) -> Image.Image:
    """PIL image for ``path``; pixels decoded when ``full`` (or when the file looks cut short).

    Every failure is turned into ImageLoadError. Decoding untrusted bytes can raise almost
    any exception type inside PIL's plugins (DecompressionBombError for a huge image, struct
    errors, SyntaxError...), hence the broad ``except Exception``.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        image = Image.open(path)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, _not_an_image(path)) from None
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - see docstring
        raise ImageLoadError(path, _describe(err, "unreadable")) from err
    try:
        if full or not _ends_cleanly(path, image.format):
            image.load()
    except Exception as err:  # noqa: BLE001 - see docstring
        image.close()
        raise ImageLoadError(path, _describe(err, "corrupt image data")) from err
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit ``L`` by rescaling the value range.

    PIL's own ``convert("L")`` clips everything above 255, which turns a 16-bit
    micrograph white. 16-bit data is divided by 257 (65535 -> 255, exposure kept); 32-bit
    integers that fit 8 or 16 bits are treated as such; anything else (floats, negative or
    wider values) is stretched from its minimum to its maximum.
    """
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" or low < 0 or high > 65535:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    elif image.mode.startswith("I;16") or high > 255:
        scaled = values / 257.0
    else:
        scaled = values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image from any PIL mode; transparent pixels are composited on white.

    White, not black, because slide backgrounds are bright: a black fill would look like
    stain to a model.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def clamp_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> Box | None:
    """``box`` as integer pixels inside an image of ``size`` (w, h); None when nothing is left.

    Coordinates are rounded outwards so a crop never loses part of the cell.
    """
    width, height = size
    xmin, ymin, xmax, ymax = box
    clamped = (max(0, math.floor(xmin)), max(0, math.floor(ymin)),
               min(width, math.ceil(xmax)), min(height, math.ceil(ymax)))
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None
    return clamped


def load_rgb(path: str | os.PathLike, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Decode ``path`` into an RGB image, cropped to ``box`` = (xmin, ymin, xmax, ymax) if given.

    The box is clamped to the image. Raises ImageLoadError for anything unusable: missing,
    empty, not an image, truncated, corrupt, unsupported mode, or a box outside the image.
    """
    with _open(path, full=True) as image:
        if box is not None:
            clamped = clamp_box(box, image.size)
            if clamped is None:
                width, height = image.size
                raise ImageLoadError(path, f"crop box {tuple(box)} lies outside the {width}x{height} image")
            image = image.crop(clamped)
        try:
            return to_rgb(image)
        except ValueError as err:
            raise ImageLoadError(path, f"unsupported image mode {image.mode}: {err}") from err


def probe_image(path: str | os.PathLike, *, full: bool = True) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` for a readable image, ``(None, reason)`` otherwise.

    ``full=True`` decodes every pixel (the audit). ``full=False`` reads the header and
    checks that a JPEG/PNG ends with its end marker, decoding only files that do not: cheap
    enough for loading 15k files while still catching truncated downloads.
    """
    try:
        with _open(path, full=full) as image:
            return image.size, None
    except ImageLoadError as err:
        return None, err.reason
