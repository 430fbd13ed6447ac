"""The shared preprocessing contract: decoding, limits, the resize rule, and decoder fuzzing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contract.preprocess import (
    DecodeLimits,
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageType,
    jpeg_scans,
    load_rgb,
    preprocess_bytes,
    resize_for_model,
)
from tests.serving_helpers import jpeg_with_scans


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_resize_rule_is_shorter_side_then_centre_crop():
    # A wide image: left third red, middle green, right third blue. The centre crop keeps green.
    pixels = np.zeros((60, 180, 3), np.uint8)
    pixels[:, :60, 0] = pixels[:, 60:120, 1] = pixels[:, 120:, 2] = 255
    out = resize_for_model(Image.fromarray(pixels), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 4:28, 1].min() > 200 and out[:, 4:28, 0].max() < 50


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif)
    image = load_rgb(data)
    assert image.size == (20, 40)  # portrait after transpose
    top = np.asarray(image)[:10].mean()
    bottom = np.asarray(image)[-10:].mean()
    assert top > 200 > 50 > bottom


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (16, 12), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out = preprocess_bytes(encode(image, fmt), 8)
    assert out.shape == (8, 8, 3)


def test_sixteen_bit_grey_keeps_its_contrast():
    array = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    out = preprocess_bytes(encode(Image.fromarray(array), "PNG"), 16)
    assert out.max() > 200 and out.min() < 30


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = preprocess_bytes(buffer.getvalue(), 8)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_pixel_limit_is_enforced_from_the_header():
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")  # a few kB, 64 Mpx
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        load_rgb(bomb, limits=DecodeLimits(max_pixels=40_000_000))
    with pytest.raises(ImageTooLarge):
        load_rgb(encode(Image.new("RGB", (300, 300)), "PNG"), limits=DecodeLimits(max_pixels=1000))


@pytest.mark.parametrize("mpo", [False, True], ids=["jpeg", "mpo"])
def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(mpo):
    # 20,000 scans of a megapixel: 246 kB, about 10 s of decoding if it were let through.
    bomb = jpeg_with_scans(20_000, size=(1000, 1000), mpo=mpo)
    assert len(bomb) < 300_000
    assert Image.open(io.BytesIO(bomb)).format == ("MPO" if mpo else "JPEG")
    with pytest.raises(ImageTooLarge, match="over 100 scans"):
        load_rgb(bomb)
    # A repeated scan is still a valid JPEG: at the limit it decodes as usual.
    assert preprocess_bytes(jpeg_with_scans(100, mpo=mpo), 16)[..., 0].mean() > 200
    with pytest.raises(ImageTooLarge):
        load_rgb(jpeg_with_scans(11, mpo=mpo), limits=DecodeLimits(max_jpeg_scans=10))


def test_only_the_scans_of_the_first_image_count():
    rng = np.random.default_rng(0)
    photo = encode(Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)), "JPEG")
    assert jpeg_scans(photo, stop_after=100) == 1
    # A motion photo's video after the image, or any trailer, holds marker-like bytes.
    trailer = b"\xff\xda" * 500 + rng.bytes(200_000)
    assert preprocess_bytes(photo + trailer, 16).shape == (16, 16, 3)
    # An EXIF thumbnail is a whole JPEG inside a segment: skipped with the segment.
    thumbnail = encode(Image.new("RGB", (16, 16)), "JPEG")
    app1 = b"Exif\0\0" + thumbnail * 100  # 100 more SOS markers, inside one segment
    assert len(app1) < 65_533
    with_exif = photo[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + photo[2:]
    assert jpeg_scans(with_exif, stop_after=100) == 1


def test_garbage_between_segments_hides_no_scan():
    # libjpeg skips stray bytes before a marker (with a warning) and decodes on: so must the count.
    bomb = jpeg_with_scans(300)
    end = bomb.index(b"\xff\xd9")
    hidden = bomb[:end].replace(b"\xff\xc4", b"\x17\xff\xc4").replace(b"\xff\xda", b"\x17\xff\xda")
    assert jpeg_scans(hidden + bomb[end:], stop_after=1000) == 300
    with pytest.raises(ImageTooLarge):
        load_rgb(hidden + bomb[end:])
    assert load_rgb(hidden + bomb[end:], limits=DecodeLimits(max_jpeg_scans=300)).size == (64, 64)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", UndecodableImage),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, UndecodableImage),
        (b"%PDF-1.7 fake", UnsupportedImageType),
        (b"PK\x03\x04zipdata", UnsupportedImageType),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", UnsupportedImageType),
        (b"hello, I am text", UndecodableImage),
    ],
)
def test_broken_and_foreign_data_raise_typed_errors(data, error):
    with pytest.raises(error):
        load_rgb(data)


def test_tiff_is_an_unsupported_type():
    with pytest.raises(UnsupportedImageType):
        load_rgb(encode(Image.new("RGB", (4, 4)), "TIFF"))


def test_truncated_jpeg_is_undecodable():
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(UndecodableImage):
        load_rgb(data[: len(data) // 2])


JPEG = encode(Image.new("RGB", (24, 16), (120, 30, 200)), "JPEG")
PNG = encode(Image.new("RGBA", (16, 24), (0, 200, 10, 100)), "PNG")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_escape_as_other_errors(data):
    try:
        out = preprocess_bytes(data, 16)
    except ImageError:
        return
    assert out.shape == (16, 16, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([JPEG, PNG]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_images_decode_or_fail_cleanly(base, edits, cut):
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        out = preprocess_bytes(bytes(data[: max(1, cut % (len(data) + 1))]), 16)
    except ImageError:
        return
    assert out.shape == (16, 16, 3)


def test_decoding_in_many_threads_leaves_the_warning_filters_as_they_were():
    """The decode pool runs this in several threads; Pillow's bomb check is read through
    `warnings.catch_warnings`, which swaps process-wide state and, interleaved, once left every
    warning of the process ignored."""
    import sys
    import threading
    import warnings

    png, tiff = encode(Image.new("RGB", (8, 8)), "PNG"), encode(Image.new("RGB", (8, 8)), "TIFF")
    before = list(warnings.filters)

    def decode_both() -> None:
        for _ in range(500):
            preprocess_bytes(png, 4)
            with pytest.raises(UnsupportedImageType):  # the foreign-format check: nested
                preprocess_bytes(tiff, 4)

    threads = [threading.Thread(target=decode_both) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads)
    assert warnings.filters == before
