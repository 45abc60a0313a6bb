"""Decoding untrusted image bytes into RGB pictures, with guards.

Every failure is an :class:`ImageError` with a stable code (``image_unreadable``,
``image_too_large``, ``format_not_allowed``); nothing here can take a batch down.

Memory is bounded before any pixel is decoded: the header's width x height, its longest
side and its aspect ratio are checked against ``WORKER_IMAGE__MAX_PIXELS``,
``WORKER_IMAGE__MAX_SIDE`` and ``WORKER_IMAGE__MAX_ASPECT_RATIO``. The aspect cap is
what bounds the model's resize too: open_clip's ``shortest`` preprocessing scales the
*short* side to the model input ``S``, so its intermediate picture is ``S x S*aspect``
pixels (a 100000x1 strip would become 6.4 million x 64 at the tiny model's size);
``longest`` and ``squash`` never exceed ``S x S``. The decoded picture itself is not
cropped or resized here: a centre-square crop is not what ``shortest`` keeps exactly
(torchvision truncates the resized long side, so the sampling grid shifts by a fraction of
a pixel and ordinary photos would score differently), and it would change what
``squash``/``longest`` models (SigLIP) see; this module does not know the model.

After the checks, decoding holds at most the file's own mode plus the RGB result
(RGBA/CMYK/``I;16`` are converted before the EXIF rotation, which is applied only when
there is one). libwebp needs about 15 bytes a pixel while decoding (two RGBA canvases and
a copy), so a WebP at the pixel cap costs several times a PNG of the same size.

:func:`decode_image` gives the first frame of an animation and the first page of a
multi-page TIFF or MPO. The later frames of an animated GIF, WebP or APNG are
:mod:`worker.animation`'s job; it builds on :func:`open_checked` (the header guards),
:func:`decode_first_frame`, :func:`to_rgb` and :func:`decoding_errors`, and this module
imports nothing from it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from worker.errors import ImageError

# A truncated file is an error, never a silently half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Defaults of ``ImageSettings.max_side`` / ``max_aspect_ratio``, for callers without settings.
DEFAULT_MAX_SIDE = 32_768
DEFAULT_MAX_ASPECT_RATIO = 50.0

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def install_decompression_bomb_guard(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb check agree with ``max_pixels`` and raise, not warn."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, possibly JPEG-draft reduced
    width: int  # of the original picture
    height: int
    format: str
    sha256: str


def check_dimensions(
    width: int,
    height: int,
    *,
    max_pixels: int,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> None:
    """Check a header's size: ``image_too_large`` over a cap, ``image_unreadable`` if empty."""
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height}: no pixels", code="image_unreadable")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the cap of {max_pixels} "
            "(WORKER_IMAGE__MAX_PIXELS)",
            code="image_too_large",
        )
    if max(width, height) > max_side:
        raise ImageError(
            f"image is {width}x{height}: a side is over the cap of {max_side} pixels "
            "(WORKER_IMAGE__MAX_SIDE)",
            code="image_too_large",
        )
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect_ratio:
        raise ImageError(
            f"image is {width}x{height}: aspect ratio {_ratio(aspect)}:1 is over the cap of "
            f"{_ratio(max_aspect_ratio)}:1 (WORKER_IMAGE__MAX_ASPECT_RATIO)",
            code="image_too_large",
        )


def _ratio(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP file declares, read from its first chunk; None if not WebP.

    Pillow creates libwebp's decoder, which allocates the whole canvas, while *opening*
    a WebP, so its size is checked here first.
    """
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    return None


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose the EXIF (or XMP) orientation asks for; a broken EXIF block asks none."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return _ORIENTATION.get(value) if isinstance(value, int) else None
    except Exception:
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale is scaled (Pillow alone would clip it to white)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    return img.convert("RGB")


def _too_large(exc: Exception) -> ImageError:
    return ImageError(f"image too large: {exc} (WORKER_IMAGE__MAX_PIXELS)", code="image_too_large")


@contextmanager
def decoding_errors() -> Iterator[None]:
    """Pillow's many exception types while decoding -> an :class:`ImageError` with a code."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(exc) from None
    except Exception as exc:
        raise ImageError(
            f"corrupt or truncated image data: {exc}", code="image_unreadable"
        ) from None


def open_checked(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str],
    max_side: int,
    max_aspect_ratio: float,
) -> tuple[ImageFile.ImageFile, str, str]:
    """Open ``data`` and check its header: ``(image, format, sha256)``, no pixel decoded."""
    if not data:
        raise ImageError("the file is empty", code="image_unreadable")
    digest = hashlib.sha256(data).hexdigest()
    canvas = webp_canvas_size(data)
    if canvas is not None:
        if "WEBP" not in allowed_formats:
            raise ImageError(
                f"image format WEBP is not allowed (allowed: {', '.join(sorted(allowed_formats))})",
                code="format_not_allowed",
            )
        check_dimensions(
            *canvas, max_pixels=max_pixels, max_side=max_side, max_aspect_ratio=max_aspect_ratio
        )
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format", code="image_unreadable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(exc) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise ImageError(f"cannot read image header: {exc}", code="image_unreadable") from None
    fmt = (img.format or "").upper()
    if fmt not in allowed_formats:
        raise ImageError(
            f"image format {fmt or 'unknown'} is not allowed (allowed: "
            f"{', '.join(sorted(allowed_formats))})",
            code="format_not_allowed",
        )
    width, height = img.size
    check_dimensions(
        width, height, max_pixels=max_pixels, max_side=max_side, max_aspect_ratio=max_aspect_ratio
    )
    return img, fmt, digest


def decode_first_frame(
    img: Image.Image, fmt: str, draft_size: tuple[int, int] | None, *, keep_open: bool = False
) -> tuple[Image.Image, Image.Transpose | None]:
    """Decode the current (first) frame: RGB, EXIF-rotated, and the rotation it took.
    With ``keep_open`` the result never shares pixels with ``img``, which seeks on."""
    with decoding_errors():
        if draft_size is not None and fmt == "JPEG":
            img.draft("RGB", draft_size)
        img.load()  # the first frame of an animation or a multi-page TIFF
        method = _orientation(img)
        rgb = to_rgb(img)
        if keep_open and rgb is img:
            rgb = img.copy()
        if method is not None:
            rgb = rgb.transpose(method)
    return rgb, method


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str],
    draft_size: tuple[int, int] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> DecodedImage:
    """Decode ``data``; ``draft_size`` lets JPEG decode at a reduced scale no smaller than it."""
    img, fmt, digest = open_checked(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        max_side=max_side,
        max_aspect_ratio=max_aspect_ratio,
    )
    width, height = img.size
    rgb, _ = decode_first_frame(img, fmt, draft_size)
    del img
    return DecodedImage(rgb, width, height, fmt, digest)
