"""The preprocessing rule as data (`PreprocessingSpec`, recorded in model.json) and its one
implementation: decode with limits, EXIF orientation, RGB, resize, crop.

Training (evaluation transform), export (parity checks), evaluation and serving all call
`load_rgb` and `resize_for_model`, so what the model sees at training time is what it sees when
served. Errors say what is wrong and carry no HTTP status: the service maps them (app.decoding).
Only Pillow, numpy and pydantic: the serving image needs neither TensorFlow nor Keras.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000

# Signatures of common non-image uploads, so they get 415 (wrong type) rather than 400 (broken).
_BINARY_SIGNATURES = (b"%PDF", b"PK\x03\x04", b"\x7fELF", b"MZ", b"\x1f\x8b")
_TEXT_SIGNATURES = (b"<?xml", b"<svg", b"<html", b"<!doctype")  # compared case-insensitively


class PreprocessingSpec(BaseModel):
    """The rule from encoded image to model input, as model.json records it (`preprocessing`).

    Every field names one step; each value here is one this code implements, so a card asking
    for anything else (another interpolation, a squash resize, BGR) fails validation, naming
    the field, instead of being served with the wrong transform.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: Literal["shorter_side"] = "shorter_side"
    """Scale so that the shorter side covers the crop, keeping the aspect ratio."""
    interpolation: Literal["bilinear"] = "bilinear"
    crop: Literal["center"] = "center"
    crop_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of the resized shorter side the centred crop keeps (timm's `crop_pct`)."""
    color: Literal["RGB"] = "RGB"
    exif_transpose: Literal[True] = True
    jpeg_draft: bool = True
    """Large JPEGs are decoded at a reduced scale (Pillow `draft`) that still covers the crop."""
    input_range: tuple[Literal[0], Literal[255]] = (0, 255)
    """uint8 pixels; any rescaling happens inside the model."""


#: The rule every model of this project is trained and exported with.
DEFAULT_PREPROCESSING = PreprocessingSpec()


class ImageError(ValueError):
    """Base class of every decode failure."""


class UndecodableImage(ImageError):
    """The bytes claim to be an accepted image but cannot be decoded (empty, broken, truncated)."""


class UnsupportedImageType(ImageError):
    """The bytes are something other than an accepted image format (PDF, SVG, TIFF, ...)."""


class ImageTooLarge(ImageError):
    """The image is beyond the pixel limits, refused from its header before decoding."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 30_000
    #: Each scan of a progressive JPEG is a pass over the whole image, and a small file can
    #: hold thousands (libjpeg-turbo's LJT-01-003): here a 126 kB one-megapixel JPEG of 10,000
    #: scans took 5 s to decode, 606 kB of 50,000 took 27 s. Encoders write about 10.
    max_jpeg_scans: int = 100


def _looks_foreign(data: bytes) -> bool:
    text = data[:512].lstrip().lower()
    return (
        data.startswith(_BINARY_SIGNATURES)
        or text.startswith(_TEXT_SIGNATURES)
        or (b"<svg" in text[:256])
    )


#: `warnings.catch_warnings` swaps the process-wide filter list on entry and puts back what it
#: saw on exit, so two decode threads interleaving leave one's filters in place for good (seen:
#: "ignore every warning"). Only the header is read under it, so holding it is brief.
_WARNING_FILTERS = threading.Lock()


def _open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open from the header only and refuse before any pixel is decoded."""
    if not data:
        raise UndecodableImage("empty image data")
    with _WARNING_FILTERS, warnings.catch_warnings():
        # Pillow's own bomb check warns; make it an error we map to 413.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageTooLarge(f"image exceeds the pixel limit: {exc}") from None
        except UnidentifiedImageError:
            image = None
        except Exception as exc:
            raise UndecodableImage(f"cannot read image header: {type(exc).__name__}") from None
    if image is None:
        if _looks_foreign(data) or _identifies_as_other_format(data):
            raise UnsupportedImageType(
                f"unsupported image type; accepted: {', '.join(ACCEPTED_FORMATS)}"
            )
        raise UndecodableImage("cannot identify image data")
    width, height = image.size
    if width < 1 or height < 1:
        raise UndecodableImage("image has no pixels")
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; limit is {limits.max_pixels}"
        )
    if image.format in ("JPEG", "MPO"):  # MPO: a JPEG whose first frame is the one decoded
        scans = jpeg_scans(data, stop_after=limits.max_jpeg_scans)
        if scans > limits.max_jpeg_scans:
            raise ImageTooLarge(f"JPEG has over {limits.max_jpeg_scans} scans (the limit)")
    return image


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Scans (SOS segments) of a JPEG's first image, walking its marker segments up to its
    end-of-image marker, so that metadata (EXIF thumbnails), an MPO's later frames and bytes
    appended after the image (motion photos) do not count. Markers are found as libjpeg's
    `next_marker` finds them, so that no scan it would decode is missed. Stops once past
    `stop_after`."""
    scans, at = 0, 2  # after the start-of-image marker
    while scans <= stop_after:
        at = _next_marker(data, at)
        if at + 1 >= len(data) or data[at + 1] == 0xD9:  # the end, or the end-of-image marker
            break
        if data[at + 1] == 0x01:  # TEM: no length field
            at += 2
            continue
        if data[at + 1] == 0xDA:
            scans += 1
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return scans


def _next_marker(data: bytes, at: int) -> int:
    """Where the next marker starts, from `at`: the first 0xFF followed by neither a stuffed
    0x00, a restart marker (0xD0-0xD7: inside a scan's data) nor a fill byte 0xFF; other bytes
    (a scan's entropy-coded data, garbage) are skipped, as libjpeg skips them. len(data) if
    none. `bytes.find` skips at memchr speed."""
    at = data.find(b"\xff", at)
    while 0 <= at < len(data) - 1:
        follower = data[at + 1]
        if follower != 0 and not 0xD0 <= follower <= 0xD7 and follower != 0xFF:
            return at
        at = data.find(b"\xff", at + 1)
    return len(data)


def _identifies_as_other_format(data: bytes) -> bool:
    try:
        with _WARNING_FILTERS, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data))
        return True
    except Exception:
        return False


def load_rgb(
    data: bytes,
    target_size: int | None = None,
    limits: DecodeLimits | None = None,
    jpeg_draft: bool = True,
) -> Image.Image:
    """Decode bytes into an upright RGB image, first frame only.

    With `target_size` and `jpeg_draft`, large JPEGs are decoded at a reduced scale (Pillow
    `draft`) that still leaves the shorter side at least `target_size`, which is much cheaper
    than a full decode.
    """
    limits = limits or DecodeLimits()
    image = _open_checked(data, limits)
    try:
        if target_size and jpeg_draft and image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image.seek(0)
        image.load()
        # In place: without an orientation tag the default would still copy the whole image.
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:
        raise UndecodableImage(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: scale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        array = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)  # uint8 2-D: mode L
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_bounded(data: bytes, shorter_side: int) -> Image.Image:
    """Decode for keeping in memory: the shorter side brought down to at most `shorter_side`.

    Training keeps every photo decoded; a 12-megapixel photo is 36 MB as RGB, but augmentation
    at a few hundred pixels never needs more than about twice the input size. JPEGs are drafted
    (decoded at 1/2, 1/4 or 1/8 scale), then any image still larger is downscaled (bilinear).
    """
    image = load_rgb(data, target_size=shorter_side)
    width, height = image.size
    if min(width, height) > shorter_side:
        scale = shorter_side / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return image


def resize_for_model(
    image: Image.Image, size: int, spec: PreprocessingSpec = DEFAULT_PREPROCESSING
) -> np.ndarray:
    """Apply `spec`: shorter side to size / crop_fraction (bilinear), then a centred size x size
    crop; uint8 [size, size, 3]."""
    width, height = image.size
    scale = size / spec.crop_fraction / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # Map the crop box back to source coordinates so Pillow crops and resizes in one pass.
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)


def preprocess_bytes(
    data: bytes,
    size: int,
    limits: DecodeLimits | None = None,
    spec: PreprocessingSpec = DEFAULT_PREPROCESSING,
) -> np.ndarray:
    """Bytes to the model's input: uint8 [size, size, 3]."""
    draft_to = math.ceil(size / spec.crop_fraction)
    image = load_rgb(data, target_size=draft_to, limits=limits, jpeg_draft=spec.jpeg_draft)
    return resize_for_model(image, size, spec)


def preprocess_file(
    path: str | os.PathLike, size: int, spec: PreprocessingSpec = DEFAULT_PREPROCESSING
) -> np.ndarray:
    with open(path, "rb") as handle:
        return preprocess_bytes(handle.read(), size, spec=spec)
