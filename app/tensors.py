"""The Open Inference Protocol's tensor encodings: JSON data, the binary tensor data extension,
BYTES elements, and compressed bodies.

Binary tensors follow the JSON header (`Inference-Header-Content-Length` bytes) in the order the
tensors are listed, each `binary_data_size` bytes, little-endian and row-major; a BYTES element is
a 4-byte little-endian length and that many bytes. Everything here raises `ApiError` (400, or 413
for a body that decompresses past the limit) with a message naming the tensor.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import math
import struct
import zlib

import numpy as np

from app.errors import ApiError

#: Datatypes of the protocol that map to numpy; BYTES is handled on its own.
NUMPY_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
DATATYPES = (*NUMPY_TYPES, "BYTES")
HEADER_LENGTH = "inference-header-content-length"
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_LENGTH = struct.Struct("<I")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body under `Content-Encoding` gzip or deflate, refusing (413) as soon as it would
    exceed `limit` bytes: a small bomb never gets to expand in memory."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _ENCODINGS:
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(_ENCODINGS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, f"request body decompresses to more than the limit of {limit} bytes")
    if not inflater.eof:
        raise ApiError(400, f"request body is truncated {encoding}")
    return out


def accepted_encodings(accept_encoding: str | None) -> set[str]:
    """The codings an Accept-Encoding header accepts: listed, and not with `q=0` (refused)."""
    accepted = set()
    for part in (accept_encoding or "").split(","):
        name, *params = (field.strip() for field in part.split(";"))
        pairs = (param.partition("=") for param in params)
        weights = [value for key, _, value in pairs if key.lower() == "q"]
        try:
            refused = bool(weights) and float(weights[0]) <= 0
        except ValueError:
            refused = True  # an unreadable weight accepts nothing
        if name and not refused:
            accepted.add(name.lower())
    return accepted


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """`body` in the first of gzip or deflate the client accepts, with its name; else as is."""
    offered = accepted_encodings(accept_encoding)
    if "gzip" in offered:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in offered:
        return zlib.compress(body, 1), "deflate"
    return body, None


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary part) of a request; all JSON without the header."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ApiError(400, "Inference-Header-Content-Length is not a number") from None
    if not 0 <= length <= len(body):
        raise ApiError(400, f"Inference-Header-Content-Length {length} is beyond the body's "
                       f"{len(body)} bytes")  # fmt: skip
    return body[:length], body[length:]


def take_binary(inputs: list, binary: bytes) -> list[bytes | None]:
    """Each input's binary block (None for a JSON one), in order; the sizes must add up to the
    binary part exactly."""
    blocks: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            blocks.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, f"input {tensor.name!r}: binary_data_size must be a byte count")
        if offset + size > len(binary):
            raise ApiError(400, f"input {tensor.name!r}: binary_data_size {size} is beyond the "
                           f"{len(binary) - offset} bytes left in the body")  # fmt: skip
        blocks.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes of binary data follow the tensors "
                       "that binary_data_size accounts for")  # fmt: skip
    return blocks


def check_shape(name: str, shape: list[int]) -> int:
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise ApiError(400, f"input {name!r}: shape {shape} must be non-negative integers")
    return math.prod(shape)


def numeric_tensor(name: str, datatype: str, shape: list[int], data, block: bytes | None):
    """A numeric input as an array of `shape`, from JSON `data` or its binary block."""
    count = check_shape(name, shape)
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if block is not None:
        if len(block) != count * dtype.itemsize:
            raise ApiError(400, f"input {name!r}: {len(block)} bytes of binary data, but shape "
                           f"{shape} of {datatype} needs {count * dtype.itemsize}")  # fmt: skip
        return np.frombuffer(block, dtype=dtype).reshape(shape)
    if data is None:
        raise ApiError(400, f"input {name!r} has neither data nor binary_data_size")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise ApiError(400, f"input {name!r}: data is ragged or not numeric") from None
    integral = dtype.kind in "iu"
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if values.dtype.kind not in allowed:
        raise ApiError(400, f"input {name!r}: {datatype} data must be numbers of that type")
    if values.size != count:
        raise ApiError(400, f"input {name!r} has {values.size} values; shape {shape} needs {count}")
    if integral and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ApiError(400, f"input {name!r}: {datatype} data must be within "
                           f"{info.min}..{info.max}")  # fmt: skip
    return values.reshape(shape).astype(dtype)


def bytes_elements(name: str, shape: list[int], data, block: bytes | None,
                   content_type: str | None) -> list[bytes]:  # fmt: skip
    """The elements of a BYTES input: length-prefixed in its binary block, or base64 strings in
    JSON (`content_type` "base64", MLServer's and KServe's convention for binary payloads)."""
    count = check_shape(name, shape)
    if block is not None:
        elements, offset = [], 0
        while offset < len(block):
            if len(elements) == count:  # stop before walking (maybe millions of) extra ones
                raise ApiError(400, f"input {name!r} has more than the {count} elements its "
                               f"shape {shape} needs")  # fmt: skip
            if offset + _LENGTH.size > len(block):
                raise ApiError(400, f"input {name!r}: element {len(elements)} has a truncated "
                               "4-byte length")  # fmt: skip
            (length,) = _LENGTH.unpack_from(block, offset)
            offset += _LENGTH.size
            if offset + length > len(block):
                raise ApiError(400, f"input {name!r}: element {len(elements)} is {length} bytes, "
                               f"past the end of its {len(block)}-byte tensor")  # fmt: skip
            elements.append(block[offset : offset + length])
            offset += length
    else:
        if content_type not in (None, "base64"):
            raise ApiError(400, f"input {name!r}: content_type {content_type!r} is not "
                           "supported; send base64 strings or binary data")  # fmt: skip
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise ApiError(400, f"input {name!r}: BYTES data in JSON must be base64 strings")
        if len(data) != count:  # before decoding any of them
            raise ApiError(400, f"input {name!r} has {len(data)} elements; shape {shape} needs "
                           f"{count}")  # fmt: skip
        try:
            elements = [base64.b64decode(v, validate=True) for v in data]
        except (binascii.Error, ValueError):
            raise ApiError(400, f"input {name!r}: data is not valid base64") from None
    if len(elements) != count:
        raise ApiError(400, f"input {name!r} has {len(elements)} elements; shape {shape} needs "
                       f"{count}")  # fmt: skip
    return elements
