"""A corpus of hostile and odd uploads, each with the status it must get.

One table, one parametrized test: no answer may be a 500, every error has the one JSON shape,
and afterwards the service is still healthy and still classifies a red image as red.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from PIL import Image, features

from tests.conftest import COLOURS
from tests.serving_helpers import (
    Served,
    assert_error,
    image_bytes,
    jpeg_with_scans,
    make_settings,
    metric_value,
    serve,
)

pytest_plugins = ["tests.serving_fixtures"]
pytestmark = pytest.mark.anyio

MAX_FILES = 4
MAX_UPLOAD = 512 * 1024


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def red(size=(48, 40), mode="RGB") -> Image.Image:
    image = Image.new("RGB", size, COLOURS["red"])
    return image if mode == "RGB" else image.convert(mode)


JPEG = image_bytes("red")
PNG = pil_bytes(red(), "PNG")


def cmyk_jpeg() -> bytes:
    return pil_bytes(red(mode="CMYK"), "JPEG")


def sixteen_bit_png() -> bytes:
    return pil_bytes(Image.new("I;16", (40, 40), 40000), "PNG")


def animated_gif() -> bytes:
    frames = [red(), Image.new("RGB", (48, 40), COLOURS["blue"]), red()]
    return pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    return pil_bytes(red((60, 30)), "JPEG", exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    image = red().convert("P")
    return pil_bytes(image, "PNG", transparency=0)


def png_bomb() -> bytes:
    """10000 x 10000 1-bit: a few KiB on disk, 100 megapixels once decoded."""
    return pil_bytes(Image.new("1", (10_000, 10_000)), "PNG")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (bogus) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def gif_with_declared_size(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame claim width x height; the pixel data is missing."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.jpg", JPEG)
    return buffer.getvalue()


def tiff_bytes() -> bytes:
    return pil_bytes(red(), "TIFF")


def ico_bytes() -> bytes:
    return pil_bytes(red((32, 32)), "ICO")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect fill="red"/></svg>'
HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"
ELF = b"\x7fELF\x02\x01\x01" + b"\x00" * 200
EXE = b"MZ\x90\x00" + b"\x00" * 200


@dataclass
class Case:
    """One upload: multipart parts (name, filename, bytes, content type) or a raw body."""

    status: int
    parts: list[tuple] | None = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    method: str = "POST"
    check: Callable[[dict], None] | None = None
    error_contains: str | None = None


def upload(data: bytes | Callable[[], bytes], status: int, filename="up.jpg", ctype="image/jpeg"):
    return Case(status, parts=[("file", filename, data, ctype)])


def raw(data: bytes | Callable[[], bytes], status: int, ctype: str | None = "image/jpeg", **kw):
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return Case(status, raw=data, headers=headers, **kw)


def multipart_body(boundary: bytes, parts: list[tuple[bytes, bytes]], close=True) -> bytes:
    """Hand-made multipart: (headers, payload) per part."""
    body = b""
    for headers, payload in parts:
        body += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n"
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


FILE_HEADERS = (
    b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg'
)
ONE_JPEG = ("file", "a.jpg", JPEG, "image/jpeg")


def filename_is(expected: str | None) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        assert body["predictions"][0]["filename"] == expected

    return check


def long_filename_capped(body: dict) -> None:
    name = body["predictions"][0]["filename"]
    assert name is not None and len(name) <= 128


CASES: dict[str, Case] = {
    # -- broken or empty images: 400
    "empty_part": upload(b"", 400),
    "empty_raw_body": raw(b"", 400),
    "truncated_jpeg": upload(JPEG[: len(JPEG) // 2], 400),
    "truncated_png": upload(PNG[: len(PNG) // 2], 400),
    "jpeg_header_only": upload(JPEG[:20], 400),
    "random_garbage": upload(bytes(range(256)) * 8, 400),
    "text_named_jpg": upload(b"just some text, honestly\n" * 10, 400, "photo.jpg"),
    "html_named_jpg": upload(HTML, 415, "index.jpg"),
    # -- not an image type: 415
    "svg": upload(SVG, 415, "drawing.svg", "image/svg+xml"),
    "pdf_as_jpeg": upload(PDF, 415),
    "zip": upload(zip_bytes, 415),
    "gzip": upload(gzip.compress(JPEG), 415),
    "elf": upload(ELF, 415),
    "windows_exe": upload(EXE, 415),
    "tiff": upload(tiff_bytes, 415, "scan.tiff", "image/tiff"),
    "ico": upload(ico_bytes, 415, "favicon.ico", "image/x-icon"),
    "text_plain_part": upload(JPEG, 415, "a.jpg", "text/plain"),
    "pdf_part_type": upload(JPEG, 415, "a.jpg", "application/pdf"),
    "raw_text_plain": raw(JPEG, 415, "text/plain"),
    "raw_json": raw(b'{"image": "..."}', 415, "application/json"),
    "raw_form_urlencoded": raw(JPEG, 415, "application/x-www-form-urlencoded"),
    "raw_no_content_type": raw(JPEG, 415, None),
    "raw_svg": raw(SVG, 415, "image/svg+xml"),
    # -- too large: 413
    "png_decompression_bomb": upload(png_bomb, 413, "bomb.png", "image/png"),
    "jpeg_scan_bomb": raw(jpeg_with_scans(20_000, (1000, 1000)), 413),
    "mpo_scan_bomb": upload(jpeg_with_scans(20_000, (1000, 1000), mpo=True), 413, "3d.mpo"),
    "huge_declared_png": upload(png_with_declared_size(100_000, 100_000), 413, "x.png"),
    "wide_declared_png": upload(png_with_declared_size(60_000, 1), 413, "x.png"),
    "huge_declared_gif": upload(gif_with_declared_size(65_535, 65_535), 413, "x.gif"),
    "body_over_limit": raw(b"\xff\xd8" + b"\0" * MAX_UPLOAD, 413),
    "multipart_over_limit": upload(b"\xff\xd8" + b"\0" * MAX_UPLOAD, 413),
    "declared_length_over_limit": Case(
        413, raw=JPEG, headers={"Content-Type": "image/jpeg", "Content-Length": "99999999"}
    ),
    "too_many_files": Case(413, parts=[ONE_JPEG] * (MAX_FILES + 1), error_contains="too many"),
    "too_many_parts": Case(
        413, parts=[ONE_JPEG] + [(f"f{i}", None, b"x", None) for i in range(40)]
    ),
    # -- odd but valid images: 200
    "one_pixel": upload(lambda: pil_bytes(red((1, 1)), "JPEG"), 200),
    "grayscale_l": upload(lambda: pil_bytes(red(mode="L"), "PNG"), 200, "g.png", "image/png"),
    "grayscale_alpha_la": upload(lambda: pil_bytes(red(mode="LA"), "PNG"), 200, "g.png"),
    "cmyk_jpeg": upload(cmyk_jpeg, 200),
    "rgba_png": upload(lambda: pil_bytes(red(mode="RGBA"), "PNG"), 200, "a.png", "image/png"),
    "palette_png": upload(lambda: pil_bytes(red(mode="P"), "PNG"), 200, "p.png", "image/png"),
    "palette_transparency": upload(palette_png_with_transparency, 200, "p.png", "image/png"),
    "sixteen_bit_png": upload(sixteen_bit_png, 200, "deep.png", "image/png"),
    "animated_gif": upload(animated_gif, 200, "anim.gif", "image/gif"),
    "bmp": upload(lambda: pil_bytes(red(), "BMP"), 200, "a.bmp", "image/bmp"),
    "exif_rotated_jpeg": upload(exif_rotated_jpeg, 200),
    "tall_thin_jpeg": upload(lambda: pil_bytes(red((8, 2000)), "JPEG"), 200),
    "png_sent_as_jpeg": upload(PNG, 200, "a.jpg", "image/jpeg"),
    "octet_stream_part": upload(JPEG, 200, "a.jpg", "application/octet-stream"),
    "part_without_content_type": Case(200, parts=[("file", "a.jpg", JPEG, None)]),
    "image_with_extra_field": Case(
        200, parts=[("note", None, b"hello", None), ("file", "a.jpg", JPEG, "image/jpeg")]
    ),
    "raw_octet_stream": raw(JPEG, 200, "application/octet-stream"),
    "raw_mislabelled_png": raw(PNG, 200, "image/png; charset=utf-8"),
    # -- filenames are sanitised
    "path_traversal_filename": Case(
        200, parts=[("file", "../../etc/passwd", JPEG, "image/jpeg")], check=filename_is("passwd")
    ),
    "windows_path_filename": Case(
        200,
        parts=[("file", "C:\\Users\\eve\\rose.jpg", JPEG, "image/jpeg")],
        check=filename_is("rose.jpg"),
    ),
    "bidi_and_control_filename": Case(
        200,
        parts=[("file", "\u202egpj.exe\x07\tx.jpg", JPEG, "image/jpeg")],
        check=filename_is("gpj.exex.jpg"),
    ),
    "dot_dot_filename": Case(
        200, parts=[("file", "..", JPEG, "image/jpeg")], check=filename_is(None)
    ),
    "long_filename": Case(
        200, parts=[("file", "a" * 1000 + ".jpg", JPEG, "image/jpeg")], check=long_filename_capped
    ),
    "huge_part_header": upload(JPEG, 400, "a" * 20_000 + ".jpg"),
    # -- broken requests
    "no_file_part": Case(422, parts=[("image", "a.jpg", JPEG, "image/jpeg")]),
    "only_text_fields": Case(422, parts=[("note", None, b"hello", None)]),
    "multipart_without_boundary": raw(JPEG, 400, "multipart/form-data"),
    "multipart_wrong_boundary": raw(
        multipart_body(b"other", [(FILE_HEADERS, JPEG)]), 400, "multipart/form-data; boundary=xyz"
    ),
    "multipart_not_closed": raw(
        multipart_body(b"xyz", [(FILE_HEADERS, JPEG)], close=False),
        400,
        "multipart/form-data; boundary=xyz",
    ),
    "multipart_garbage": raw(bytes(range(256)) * 4, 400, "multipart/form-data; boundary=xyz"),
    "multipart_no_disposition": raw(
        multipart_body(b"xyz", [(b"Content-Type: image/jpeg", JPEG)]),
        400,
        "multipart/form-data; boundary=xyz",
    ),
    "one_good_one_bad": Case(
        400,
        parts=[ONE_JPEG, ("file", "bad.jpg", b"nope", "image/jpeg")],
        error_contains="bad.jpg",
    ),
    "invalid_content_length": Case(
        400, raw=JPEG, headers={"Content-Type": "image/jpeg", "Content-Length": "abc"}
    ),
    # -- query and method abuse
    "top_k_zero": Case(422, parts=[ONE_JPEG], params={"top_k": 0}),
    "top_k_negative": Case(422, parts=[ONE_JPEG], params={"top_k": -1}),
    "top_k_huge": Case(422, parts=[ONE_JPEG], params={"top_k": 10**9}),
    "top_k_bigint": Case(422, parts=[ONE_JPEG], params={"top_k": "9" * 400}),
    "top_k_text": Case(422, parts=[ONE_JPEG], params={"top_k": "abc"}),
    "top_k_float": Case(422, parts=[ONE_JPEG], params={"top_k": "1.5"}),
    "get_predict": Case(405, method="GET"),
    "put_predict": Case(405, raw=JPEG, headers={"Content-Type": "image/jpeg"}, method="PUT"),
}

if features.check("webp"):
    CASES["webp"] = upload(lambda: pil_bytes(red(), "WEBP"), 200, "a.webp", "image/webp")


def materialise(data):
    return data() if callable(data) else data


def encode_multipart(parts: list[tuple], boundary: bytes = b"hostile-boundary-1234") -> bytes:
    """Encode parts by hand so filenames and content types reach the server exactly as given."""
    pieces = []
    for name, filename, data, ctype in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        headers = b"Content-Disposition: " + disposition.encode("utf-8")
        if ctype is not None:
            headers += b"\r\nContent-Type: " + ctype.encode()
        pieces.append((headers, materialise(data)))
    return multipart_body(boundary, pieces)


@pytest.fixture(scope="module")
async def hostile(tiny_model_dir, anyio_backend) -> AsyncIterator[Served]:
    settings = make_settings(
        tiny_model_dir, "tflite", max_files=MAX_FILES, max_upload_bytes=MAX_UPLOAD
    )
    async with serve(settings) as served:
        yield served


async def send(served: Served, case: Case):
    headers = dict(case.headers)
    content = None
    if case.parts is not None:
        content = encode_multipart(case.parts)
        headers.setdefault("Content-Type", "multipart/form-data; boundary=hostile-boundary-1234")
    elif case.raw is not None:
        content = materialise(case.raw)
    return await served.client.request(
        case.method, "/predict", content=content, headers=headers, params=case.params
    )


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30
    assert {case.status for case in CASES.values()} >= {200, 400, 405, 413, 415, 422}


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_upload(hostile, name):
    case = CASES[name]
    response = await send(hostile, case)
    assert response.status_code != 500, response.text
    if case.status == 200:
        assert response.status_code == 200, (name, response.text[:300])
        body = response.json()
        assert body["predictions"], body
        if case.check is not None:
            case.check(body)
    else:
        body = assert_error(response, case.status)
        if case.error_contains:
            assert case.error_contains in body["error"]


async def test_still_healthy_afterwards(hostile):
    assert (await hostile.client.get("/health")).status_code == 200
    response = await hostile.client.post(
        "/predict", files=[("file", ("red.jpg", image_bytes("red"), "image/jpeg"))]
    )
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "red"
    metrics = (await hostile.client.get("/metrics")).text
    assert metric_value(metrics, "mobilevit_http_requests_total", status="500") == 0
