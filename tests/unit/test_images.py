"""Decoding untrusted bytes: every failure is a stable code, never an exception escaping."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Collection
from typing import TypedDict, Unpack

import pytest
from PIL import Image

from tests.helpers import image_bytes, shape_image
from worker.errors import ImageError
from worker.images import DecodedImage, decode_image

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


class DecodeOptions(TypedDict, total=False):
    """The keyword options of :func:`decode_image`."""

    max_pixels: int
    allowed_formats: Collection[str]
    draft_size: tuple[int, int] | None
    max_side: int
    max_aspect_ratio: float


def decode(data: bytes, **kwargs: Unpack[DecodeOptions]) -> DecodedImage:
    options: DecodeOptions = {"max_pixels": 10_000_000, "allowed_formats": FORMATS}
    options.update(kwargs)
    return decode_image(data, **options)


def code_of(data: bytes, **kwargs: Unpack[DecodeOptions]) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, **kwargs)
    return info.value.code


@pytest.mark.parametrize("fmt", FORMATS)
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    img = shape_image("circle", "red", size=80).convert("P" if fmt == "GIF" else "RGB")
    decoded = decode(image_bytes(img, fmt))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height, decoded.format) == (80, 80, fmt)


def test_rgba_and_greyscale_are_converted() -> None:
    for mode in ("RGBA", "L", "LA", "I;16", "CMYK"):
        img = Image.new(mode, (10, 12))
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
        assert decode(image_bytes(img, fmt)).image.mode == "RGB"


def test_corrupt_bytes() -> None:
    assert code_of(b"\x00\x01garbage" * 100) == "image_unreadable"


def test_not_an_image() -> None:
    assert code_of(b"name,value\nthis is a csv file\n") == "image_unreadable"


def test_empty_file() -> None:
    assert code_of(b"") == "image_unreadable"


def test_truncated_jpeg() -> None:
    data = image_bytes(shape_image("square", "blue", size=256), "JPEG", quality=95)
    assert code_of(data[: len(data) // 2]) == "image_unreadable"


def test_format_outside_the_allowlist() -> None:
    data = image_bytes(shape_image("square", "blue", size=32), "PNG")
    assert code_of(data, allowed_formats=["JPEG"]) == "format_not_allowed"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    assert code_of(ico.getvalue()) == "format_not_allowed"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_cap_is_an_error_before_decoding() -> None:
    assert code_of(_png_header_only(20_000, 20_000)) == "image_too_large"
    assert code_of(_png_header_only(4000, 3000), max_pixels=10_000_000) == "image_too_large"


def test_jpeg_draft_decodes_large_photos_at_reduced_scale() -> None:
    data = image_bytes(shape_image("circle", "green", size=1024), "JPEG")
    decoded = decode(data, draft_size=(224, 224))
    assert (decoded.width, decoded.height) == (1024, 1024)
    assert min(decoded.image.size) >= 224
    assert decoded.image.size[0] < 1024


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    data = image_bytes(img, "JPEG", exif=exif.tobytes())
    assert decode(data).image.size == (20, 40)
