"""From an HTTP request to model inputs: bounded body, multipart parts, decode in a thread pool.

Order of checks, cheapest first: content type (415), declared `Content-Length` (413 before a
byte is read; 503 if the process's `BodyBudget` cannot hold it), the body counted while it
streams in (413 at the limit, 503 past the budget), then multipart parsing
of the buffered body (400 broken, 413 too many files, 415 a part that is not an image, 422 no
`file` part), then decoding with the pixel limit checked from the image header (413) in
`DECODE_THREADS` threads via `contract.preprocess.preprocess_bytes`, under the card's rule (a
lone request's on the event loop's thread, just before its inference, `Decoder.decode_here`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.types import Receive

from app.batcher import NotForAlone
from app.errors import ApiError
from contract.preprocess import (
    DecodeLimits,
    ImageError,
    ImageTooLarge,
    PreprocessingSpec,
    UnsupportedImageType,
    preprocess_bytes,
)

FILE_FIELD = "file"
MAX_FILENAME_CHARS = 128
#: Non-file form fields tolerated next to the files (they are ignored).
MAX_EXTRA_PARTS = 8
RAW_TYPES = ("application/octet-stream",)
#: Largest image a lone request decodes on the event loop's thread, while everything waits.
#: Decode + resize, timed once beside a training run: a megapixel took 5 ms as JPEG, 22 as WebP,
#: 28 as PNG; a 12-MP phone photo 38 ms as JPEG, 660 as WebP. Larger ones go through the decode
#: pool, so nothing waits on them.
ALONE_MAX_PIXELS = 1_000_000
#: Most scans of a JPEG a lone request decodes there: encoders write about 10, and each is a pass
#: over the image (a megapixel of 100 scans took 66 ms). More go through the decode pool.
ALONE_MAX_JPEG_SCANS = 16


def image_error_status(error: ImageError) -> int:
    """The HTTP status of a decode failure: 413 too large, 415 not an image, else 400."""
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, UnsupportedImageType):
        return 415
    return 400


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


def sanitize_filename(name: str | bytes | None) -> str | None:
    """Basename only, no control or format characters, at most MAX_FILENAME_CHARS; None if empty."""
    if name is None:
        return None
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    name = name.strip()
    if name in ("", ".", ".."):
        return None
    return name[:MAX_FILENAME_CHARS]


def media_type(header: str | None) -> tuple[str, dict[bytes, bytes]]:
    kind, options = parse_options_header(header or "")
    return kind.decode("latin-1").strip().lower(), options


def is_image_type(kind: str) -> bool:
    return kind.startswith("image/") or kind in RAW_TYPES


class BodyBudget:
    """Bytes of request bodies one process may hold at once (MAX_INFLIGHT_UPLOAD_BYTES).

    Bodies are buffered whole, then decoded. Without a bound, many large uploads at once could
    take all the memory and get the process killed, with every request in it. A request takes
    its share before reading (its Content-Length, or chunk by chunk without one) and gives it
    back once its images are decoded; one that does not fit gets 503 with Retry-After at once.
    Used from the event loop only, so plain integers need no lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def reserve(self) -> BodyReservation:
        return BodyReservation(self)


class BodyReservation:
    """One request's share of a `BodyBudget`; `with` gives it all back."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        budget = self.budget
        if budget.used + size > budget.limit:
            raise ApiError(
                503,
                f"too many uploads in progress ({budget.used} of {budget.limit} bytes buffered); "
                "retry shortly",
                code="overloaded",
            )
        budget.used += size
        self.held += size

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0

    def __enter__(self) -> BodyReservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


async def read_body(
    headers: Headers, receive: Receive, limit: int, reservation: BodyReservation
) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit` bytes, and (503)
    when `reservation` cannot take it."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit} bytes")
        reservation.take(max(0, size))
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ApiError(499, "client disconnected before sending the whole body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        if len(body) > reservation.held:  # no (or a short) Content-Length
            reservation.take(len(body) - reservation.held)
        if not message.get("more_body", False):
            return bytes(body)


async def read_uploads(
    headers: Headers, receive: Receive, max_bytes: int, max_files: int, reservation: BodyReservation
) -> list[Upload]:
    """Images of a `/predict` request: multipart `file` parts, or one raw `image/*` body."""
    kind, options = media_type(headers.get("content-type"))
    if kind == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "multipart/form-data without a boundary parameter")
        body = await read_body(headers, receive, max_bytes, reservation)
        return parse_multipart(body, boundary, max_files)
    if is_image_type(kind):
        body = await read_body(headers, receive, max_bytes, reservation)
        if not body:
            raise ApiError(400, "empty request body; send the image bytes")
        disposition = headers.get("content-disposition")
        filename = media_type(disposition)[1].get(b"filename") if disposition else None
        return [Upload(sanitize_filename(filename), body)]
    shown = kind or "none"
    raise ApiError(
        415,
        f"Content-Type {shown!r} is not accepted; send multipart/form-data with '{FILE_FIELD}' "
        "parts, or the raw image with an image/* (or application/octet-stream) Content-Type",
    )


class _PartCollector:
    """python-multipart callbacks collecting parts; enforces the part and file limits early."""

    def __init__(self, max_files: int):
        self.max_files = max_files
        self.files: list[Upload] = []
        self.parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data = bytearray()
        self._is_file = False
        self._filename: str | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_files + MAX_EXTRA_PARTS:
            raise ApiError(413, f"too many multipart parts (limit {self.max_files} files)")
        self._headers = {}
        self._data = bytearray()
        self._is_file = False
        self._filename = None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data":
            raise ApiError(400, "multipart part without 'Content-Disposition: form-data'")
        name = params.get(b"name", b"").decode("utf-8", errors="replace")
        self._is_file = name == FILE_FIELD
        if not self._is_file:
            return
        if len(self.files) >= self.max_files:
            raise ApiError(413, f"too many files: at most {self.max_files} per request")
        self._filename = sanitize_filename(params.get(b"filename"))
        kind, _ = media_type(self._headers.get(b"content-type", b"").decode("latin-1"))
        if kind and not is_image_type(kind):
            shown = self._filename or "part"
            raise ApiError(415, f"{shown}: content type {kind!r} is not an image")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._data.extend(data[start:end])

    def _part_end(self) -> None:
        if self._is_file:
            self.files.append(Upload(self._filename, bytes(self._data)))
            self._is_file = False

    def _end(self) -> None:
        self.ended = True


def parse_multipart(body: bytes, boundary: bytes, max_files: int) -> list[Upload]:
    """The `file` parts of a buffered multipart/form-data body, in order."""
    collector = _PartCollector(max_files)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, FormParserError, ValueError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    if not collector.ended:
        raise ApiError(400, "malformed multipart body: no closing boundary")
    if not collector.files:
        raise ApiError(
            422, f"no multipart part named '{FILE_FIELD}'; send the image(s) as '{FILE_FIELD}'"
        )
    return collector.files


#: Formats decoded once at startup (those this Pillow build can write).
WARM_UP_FORMATS = ("JPEG", "PNG", "WEBP")


def _warm_up_samples() -> list[bytes]:
    samples = []
    for fmt in WARM_UP_FORMATS:
        buffer = io.BytesIO()
        try:
            Image.new("RGB", (64, 48), (120, 160, 80)).save(buffer, format=fmt)
        except (KeyError, OSError):  # a format this Pillow build lacks
            continue
        samples.append(buffer.getvalue())
    return samples


def upload_error(upload: Upload, error: BaseException) -> BaseException:
    """What a failed decode raises: an ApiError naming the upload for a bad image, else itself."""
    if isinstance(error, ImageError):
        where = f"{upload.filename}: " if upload.filename else ""
        return ApiError(image_error_status(error), f"{where}{error}")
    return error


class Decoder:
    """Decode + resize under the model card's rule, in a thread pool sized by DECODE_THREADS."""

    def __init__(self, size: int, limits: DecodeLimits, threads: int, spec: PreprocessingSpec):
        self.size = size
        self.limits = limits
        self.threads = threads
        self.spec = spec
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._alone_limits = replace(
            limits,
            max_pixels=min(limits.max_pixels, ALONE_MAX_PIXELS),
            max_jpeg_scans=min(limits.max_jpeg_scans, ALONE_MAX_JPEG_SCANS),
        )

    async def warm_up(self) -> None:
        """Decode a small image of each common format in every pool thread, so that the first
        request does not pay for Pillow loading its format plugins and the threads starting
        (15 ms for the first JPEG in a process, against under 1 ms after)."""
        samples = _warm_up_samples()
        # Each job holds its thread until all have decoded, so every job gets a thread of its own.
        everyone = threading.Barrier(self.threads)

        def decode_all() -> None:
            for data in samples:
                self.decode_one(data)
            with contextlib.suppress(threading.BrokenBarrierError):
                everyone.wait(timeout=10)

        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, decode_all) for _ in range(self.threads))
        )

    def decode_one(self, data: bytes) -> np.ndarray:
        return preprocess_bytes(data, self.size, self.limits, self.spec)

    async def decode(self, uploads: Sequence[Upload]) -> list[np.ndarray]:
        """uint8 [size, size, 3] per upload, in order; the first failing upload sets the error."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, self.decode_one, u.data) for u in uploads]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for upload, result in zip(uploads, results, strict=True):
            if isinstance(result, BaseException):
                raise upload_error(upload, result)
        return list(results)  # type: ignore[arg-type]

    def decode_here(self, uploads: Sequence[Upload]) -> np.ndarray:
        """`decode`, in the calling thread, stacked: [N, size, size, 3] (a lone request's, on
        the event loop's thread just before its inference, `Batcher.run_alone`). An image over
        ALONE_MAX_PIXELS, or a JPEG of more than ALONE_MAX_JPEG_SCANS scans, declines that path
        (`NotForAlone`) before decoding."""
        images = []
        for upload in uploads:
            try:
                images.append(preprocess_bytes(upload.data, self.size, self._alone_limits,
                                               self.spec))  # fmt: skip
            except ImageTooLarge:  # maybe not for the real limits: the usual path will tell
                raise NotForAlone from None
            except ImageError as exc:
                raise upload_error(upload, exc) from None
        return np.stack(images)

    async def run(self, func, *args):
        """Run other CPU work (e.g. parsing a large JSON body) in the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
